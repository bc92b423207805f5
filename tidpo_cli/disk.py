"""Faults of the disk, as the user reads them: a write that fails because the file system is full, read-only, over
quota or not ours to write becomes one line naming the path and the system's own words for it (a `DiskError`).

Libraries report the same fault in different clothes: Python's `OSError` carries the errno; `torch.save` raises a
`RuntimeError` ("file write failed") and safetensors its own error, both without one. For those the file system is
asked afterwards (free space, read-only flag, write permission), so a full disk is named as such; an error with no
disk fault behind it is not ours to explain and propagates with its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# errnos that are the machine's or the user's, not a bug of ours.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EIO,
               errno.EFBIG, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
LOW_SPACE = 1 << 20  # below this many free bytes a failed write is taken for a full disk


class DiskError(UserError):
    """A write the machine refused: the message names the path, the errno text and what to do."""


def fault_of(exc: BaseException, path: Path) -> str | None:
    """The errno text of the disk fault behind `exc`, raised while writing at or under `path`; None when there
    is none (then `exc` is a bug, not the machine)."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.errno is not None:
        return None
    place = nearest_existing(Path(path))
    try:
        stat = os.statvfs(place)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if stat.f_bavail * stat.f_frsize < LOW_SPACE:
        return os.strerror(errno.ENOSPC)
    if not os.access(place, os.W_OK):
        return os.strerror(errno.EACCES)
    return None


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def message(what: str, path: Path, fault: str, option: str = "hydra.run.dir") -> str:
    """One line: what could not be written where, the system's words for why, and the fix in terms of `option`
    (the setting that picks the place: hydra.run.dir for a run, --out or OUT for the other commands)."""
    hint = {os.strerror(errno.ENOSPC): f"free space there, or point {option} at another disk",
            os.strerror(errno.EDQUOT): f"free space within your quota there, or point {option} elsewhere",
            os.strerror(errno.EROFS): f"point {option} at a file system mounted read-write",
            os.strerror(errno.ENOTDIR): f"a part of the path is a file, not a directory: give {option} another path"}
    return f"cannot write {what} {path}: {fault}; {hint.get(fault, f'check its permissions, or point {option} elsewhere')}"


@contextmanager
def writing(what: str, path: Path, option: str = "hydra.run.dir", name: Path | None = None):
    """Turn a disk fault raised inside into a one-line `DiskError` about `what` at `path`; the message names `name`
    when given (the path the user typed), else the file the error names, else `path`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        fault = fault_of(e, path)
        if fault is None:
            raise
        raise DiskError(message(what, name or getattr(e, "filename", None) or path, fault, option)) from None


def check_writable(directory: Path, what: str = "the run directory", option: str = "hydra.run.dir",
                   create: bool = True, shown: Path | None = None) -> None:
    """Create `directory` (with its parents; with `create=False` it must exist) and write, sync and remove a small
    file in it: a path through a file, a read-only mount or a full disk shows here, before a model loads, not at
    the first checkpoint. The message names `shown` (default: `directory`), the path the user gave."""
    directory = Path(directory)
    probe = directory / f".tidpo-write-test-{os.getpid()}"
    with writing(what, directory, option, name=shown or directory):
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)


def stop_on_log_write_errors() -> None:
    """A log file's handler (Hydra's train.log) reports a failed write by printing a traceback and carrying on; make
    it stop the run with one line instead. The handler is taken off first, so nothing logs into the failed file."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and not getattr(handler, "tidpo_guarded", False):
            handler.handleError = _stop_on_error(root, handler, handler.handleError)
            handler.tidpo_guarded = True


def _stop_on_error(root: logging.Logger, handler: logging.FileHandler, report):
    def handle_error(record: logging.LogRecord) -> None:
        problem = sys.exc_info()[1]
        fault = fault_of(problem, Path(handler.baseFilename)) if problem is not None else None
        if fault is None:
            return report(record)
        root.removeHandler(handler)
        raise DiskError(message("the log", handler.baseFilename, fault))
    return handle_error
