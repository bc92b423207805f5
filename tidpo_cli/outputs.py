"""Where `tidpo eval`, `explain`, `export` and `benchmark` write what they make: an output is claimed before any
model loads (an existing one is refused unless --overwrite; a small write shows a full or read-only disk), and its
files appear all together or not at all.

A path the user names (--out DIR, export's OUT) is never written over without --overwrite; the default folders
(RUN/eval, RUN/explain, RUN/benchmark, ./eval, ...) hold the latest report and are rewritten, saying so. A directory
made for the files is removed again when nothing came of it.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .disk import check_writable, nearest_existing, writing
from .errors import UserError


def claim_output(out: Path, names: Sequence[str], *, given: bool, overwrite: bool) -> None:
    """Before any work: refuse an output directory that is a file, or a given one that holds one of `names`
    already (unless --overwrite), and try a small write where the files will go, so that a full, read-only or
    foreign disk stops the command now rather than after the evaluation."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file: give a directory path")
    existing = [name for name in names if (out / name).exists()]
    if existing and given and not overwrite:
        raise UserError(f"--out {out} already holds {', '.join(existing)}: pick another --out, or add --overwrite "
                        f"to replace {'it' if len(existing) == 1 else 'them'}")
    probe_writable(out, "--out")


def probe_writable(out: Path, flag: str) -> None:
    """Write, sync and remove a small file in `out`, or in its nearest existing parent when it is not made yet
    (nothing is created here)."""
    place = nearest_existing(out)
    if not place.is_dir():
        raise UserError(f"{flag} '{out}' goes through {place}, which is a file: pick another path")
    check_writable(place, "the output", option=flag, create=False, shown=out)


@contextmanager
def made_dir(out: Path, what: str, flag: str = "--out") -> Iterator[Path]:
    """`out` made (with its parents) for the block; when the block fails, what was made here and is still empty
    is removed again."""
    made = []
    place = out
    while not place.exists() and place != place.parent:
        made.append(place)
        place = place.parent
    try:
        with writing(what, out, option=flag):
            out.mkdir(parents=True, exist_ok=True)
        yield out
    except BaseException:
        for directory in made:  # deepest first; a directory that holds something stays
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def write_files(out: Path, writers: dict[str, Callable[[Path], None]], what: str, prog: str,
                flag: str = "--out") -> list[Path]:
    """Each `writers[name](path)` writes to a temporary name in `out`; once every file is written and synced,
    they take their names (`prog` says so on stderr when earlier ones are replaced). On a failure the temporary
    files (and a directory made for them) are removed and the earlier files, if any, are as they were. A disk
    fault is a one-line DiskError naming the file."""
    done: list[tuple[Path, Path]] = []
    earlier = [name for name in writers if (out / name).exists()]
    with made_dir(out, what, flag):
        try:
            for name, write in writers.items():
                tmp, final = out / f".tidpo-tmp-{os.getpid()}-{name}", out / name  # the suffix kept (savefig)
                done.append((tmp, final))
                with writing(what, final, option=flag):
                    write(tmp)
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())  # a full disk may show only here (NFS, delayed allocation)
            for tmp, final in done:
                with writing(what, final, option=flag):
                    os.replace(tmp, final)
        except BaseException:
            for tmp, _ in done:
                tmp.unlink(missing_ok=True)
            raise
    if earlier:
        print(f"{prog}: replaced the earlier {', '.join(earlier)} in {out}", file=sys.stderr)
    return [final for _, final in done]
