"""One run per run directory: `run.lock` names the run that holds it (host, pid, the process's start time, the SLURM
job), is created exclusively (O_EXCL, which shared file systems honour) and is removed when the run ends.

A second run into a held directory stops, naming the holder. A lock left behind by a run that is gone is taken
over, saying so: on the same host, when no process of that pid and start time lives; on any host, when it names
this SLURM job (a requeued job starts again under its own id, after the old one ended). Only rank 0 takes it;
every rank learns whether it got it.

Hydra writes its record of a start (`.hydra-incoming/`: config, overrides) before tidpo runs; it becomes the run's
`.hydra/` only once this start holds the directory, so a refused second start leaves the holder's record intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import psutil

from .disk import writing
from .errors import UserError

LOCK = "run.lock"
INCOMING, RECORD = ".hydra-incoming", ".hydra"  # hydra.output_subdir (conf/train.yaml), and where it belongs
log = logging.getLogger("tidpo")


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _alive(holder: dict) -> bool:
    """Whether the process `holder` names still runs (only answerable on its own host)."""
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["started"])) < 1e-3
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


def _gone(holder: dict | None) -> str | None:
    """Why the run `holder` names is known to be gone (None: it may still run)."""
    if holder is None:
        return "the lock file is unreadable"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"it is this SLURM job ({job}) before its requeue"
    if holder.get("host") == socket.gethostname() and not _alive(holder):
        return f"no process {holder.get('pid')} of that start runs on {holder.get('host')}"
    return None


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """`with RunLock(run_dir, dist):` holds the run directory for the run's lifetime."""

    def __init__(self, run_dir: Path, dist) -> None:
        self.path, self.dist, self.mine = Path(run_dir) / LOCK, dist, None

    def __enter__(self) -> "RunLock":
        problem = None
        if self.dist.main:
            try:
                self.acquire()
                adopt_hydra_record(self.path.parent)
            except UserError as e:
                problem = e
        if self.dist.max(int(problem is not None)):
            raise problem or UserError(f"{self.path.parent} is in use by another run (rank 0 says which)")
        return self

    def acquire(self) -> None:
        me = _me()
        with writing("the run lock", self.path):
            for _ in range(3):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = _read(self.path)
                    if holder is None:
                        time.sleep(0.2)  # perhaps being written right now
                        holder = _read(self.path)
                    why = _gone(holder)
                    if why is None:
                        raise UserError(
                            f"run dir {self.path.parent} is in use by another run ({_describe(holder)}): wait for it "
                            f"to end, or train in another run dir (hydra.run.dir=...); if that run is gone, delete "
                            f"{self.path}") from None
                    log.warning("taking over %s: %s (%s)", self.path, why, _describe(holder) if holder else "")
                    self.path.unlink(missing_ok=True)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
                self.mine = me
                return
        raise UserError(f"cannot take {self.path}: other runs keep taking it; train in another run dir")

    def release(self) -> None:
        """Remove the lock if it is still this run's (safe to call twice, and from a signal handler)."""
        if self.mine is not None and _read(self.path) == self.mine:
            self.path.unlink(missing_ok=True)
        self.mine = None

    def __exit__(self, *exc) -> None:
        self.release()


def adopt_hydra_record(run_dir: Path) -> None:
    """Hydra's record of this start becomes the run's `.hydra/` (replacing an earlier start's)."""
    incoming, record = Path(run_dir) / INCOMING, Path(run_dir) / RECORD
    if not incoming.is_dir():
        return  # not started through Hydra (train() called from Python)
    with writing("the run's config record", record):
        if record.exists():
            shutil.rmtree(record)
        incoming.rename(record)


def drop_hydra_record(run_dir: Path) -> None:
    """A start that stops before it holds the run dir leaves no record (the holder's `.hydra/` stays as it is)."""
    shutil.rmtree(Path(run_dir) / INCOMING, ignore_errors=True)

