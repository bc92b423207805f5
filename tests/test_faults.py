"""What goes wrong after the first run, for real: unreadable and incompatible checkpoints, full, read-only and unwritable
disks (a small tmpfs), Ctrl-C, two runs in one directory. Each fault ends in one line and exit code 2 (130 for a
Ctrl-C that saved), and what was written before stays usable: a resume equals an uninterrupted run."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from helpers import QUICK, RUN, assert_same_run, run_tidpo, start, train_rows, wait_for
from tidpo_cli.checkpoint import list_checkpoints
from tidpo_cli.distributed import Dist
from tidpo_cli.errors import UserError
from tidpo_cli.manifest import check_files
from tidpo_cli.runlock import LOCK, RunLock
from tidpo_cli.trainer import INTERRUPTED_EXIT_CODE, REPEAT_WINDOW_S


def error_line(output: str, *needles: str) -> str:
    """The one `tidpo: error:` line of `output`, which has no traceback and names every needle."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("tidpo: error: ")]
    assert len(lines) == 1, output[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextmanager
def small_disk(path: Path, size: str = "64m", options: str = ""):
    """A real file system of `size` at `path` (tmpfs; needs root), unmounted afterwards."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


def metric_rows_parse(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl but a last one cut by the fault is a JSON object."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows.append(json.loads(lines[-1]))
    except ValueError:
        pass
    return rows


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))


# -- checkpoints that cannot be used ------------------------------------------------------------------------------

def test_unreadable_newest_checkpoints_fall_back_to_an_older_one_and_resume_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dpo"], run_dir)
    shutil.rmtree(run_dir / "final")
    flip_byte(run_dir / "checkpoints" / "step-40" / "optimizer.pt", 1000)          # a flipped byte
    weights = run_dir / "checkpoints" / "step-35" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)                               # a truncated file
    result = run_tidpo(["train", *RUN, "loss=dpo", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-40 cannot be read: optimizer.pt does not match its checksum" in result.stdout
    assert "step-35 cannot be read: model.safetensors has" in result.stdout
    assert "resuming from the older checkpoint" in result.stdout and "steps 31-40 are trained again" in result.stdout
    aside = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".unreadable"))
    assert aside == ["step-35.unreadable", "step-40.unreadable"]  # kept for a look, never resumed from
    assert_same_run(run_dir, uninterrupted["dpo"])
    assert all(check_files(p) is None for p in list_checkpoints(run_dir))


def test_an_unreadable_explicit_checkpoint_stops_with_one_line(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dpo"], run_dir)
    damaged = run_dir / "checkpoints" / "step-20"
    os.truncate(damaged / "rng-rank0.safetensors", 10)
    result = run_tidpo(["train", *RUN, "loss=dpo", f"trainer.resume={damaged}", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path)
    assert result.returncode == 2
    error_line(result.stderr, f"trainer.resume={damaged}", "rng-rank0.safetensors", "trainer.resume=never")
    assert damaged.is_dir()  # an explicit choice is not set aside


def test_a_checkpoint_of_another_model_shape_stops_naming_the_differences(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dpo"], run_dir)
    before = {p.name: check_files(p) for p in list_checkpoints(run_dir)}
    result = run_tidpo(["train", *RUN, "loss=dpo", "model.config.hidden_size=32", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result.stderr, "step-40 does not fit this run", "parameters differ",
                      "model.embed_tokens.weight is [262, 64] there, [262, 32] here", "trainer.resume=never")
    assert "size mismatch" not in result.stderr and len(line) < 1000
    assert {p.name: check_files(p) for p in list_checkpoints(run_dir)} == before  # nothing touched
    assert all(v is None for v in before.values())


def test_another_engine_or_number_of_processes_is_named_with_what_to_do(tmp_path, uninterrupted):
    """The layout a checkpoint records, against this run's (the DeepSpeed and multi-process runs write theirs
    in test_distributed; here the comparison and its advice)."""
    from tidpo_cli.checkpoint import choose_checkpoint
    from tidpo_cli.manifest import Layout

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dpo"], run_dir)
    written = Layout.read(run_dir / "checkpoints" / "step-40")
    assert written.engine == "plain" and written.world == 1 and written.parameters
    for here, needles in [
        (Layout("deepspeed-zero3", 1, written.parameters), ["plain PyTorch (deepspeed=none)", "DeepSpeed ZeRO-3"]),
        (Layout("plain", 2, written.parameters), ["written by 1 processes, this run has 2", "resume with 1 processes",
                                                  "tidpo export"]),
    ]:
        with pytest.raises(UserError) as caught:
            choose_checkpoint(run_dir, "auto", here)
        for needle in needles:
            assert needle in str(caught.value)
    assert choose_checkpoint(run_dir, "auto", written) == run_dir / "checkpoints" / "step-40"


# -- the disk -----------------------------------------------------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_removes_it_and_keeps_the_last_good_one(tmp_path, uninterrupted):
    with small_disk(tmp_path / "disk") as disk:
        run_dir = disk / "run"
        args = [*RUN, "loss=dpo", "trainer.keep_last=1"]
        proc = start(args, run_dir, env={"TIDPO_TEST_PAUSE_IN_CHECKPOINT": "10:3"})
        partial = run_dir / "checkpoints" / "step-10.tmp"
        wait_for(lambda: (partial / "model.safetensors").exists(), proc)
        filler = fill(disk)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, output[-3000:]
        error_line(output, "step-10.tmp", "No space left on device", "earlier ones are intact")
        assert not partial.exists()
        assert [p.name for p in list_checkpoints(run_dir)] == ["step-5"]  # keep_last=1 kept the last good one
        assert check_files(run_dir / "checkpoints" / "step-5") is None
        assert [r["step"] for r in metric_rows_parse(run_dir) if "loss" in r] == list(range(1, 11))
        assert not (run_dir / LOCK).exists()
        filler.unlink()
        result = run_tidpo(["train", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_run(run_dir, uninterrupted["dpo"])


def test_a_full_disk_mid_run_stops_with_one_line_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    with small_disk(tmp_path / "disk") as disk:
        run_dir = disk / "run"
        proc = start([*RUN, "loss=dpo"], run_dir)
        wait_for(lambda: len(list_checkpoints(run_dir)) >= 1 and len(train_rows(run_dir)) >= 6, proc)
        filler = fill(disk)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, output[-3000:]
        line = error_line(output, "No space left on device", str(run_dir))
        assert "metrics.jsonl" in line or "checkpoint" in line, line  # whichever write came first
        metric_rows_parse(run_dir)
        assert not any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
        filler.unlink()
        result = run_tidpo(["train", *RUN, "loss=dpo", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_run(run_dir, uninterrupted["dpo"])


def test_a_run_dir_that_cannot_be_made_or_written_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    through_a_file = run_tidpo(["train", *QUICK, f"hydra.run.dir={tmp_path / 'a-file' / 'run'}"], cwd=tmp_path)
    assert through_a_file.returncode == 2
    error_line(through_a_file.stderr, "a-file", "Not a directory")
    with small_disk(tmp_path / "ro", size="1m", options=",ro") as read_only:
        result = run_tidpo(["train", *QUICK, f"hydra.run.dir={read_only / 'run'}"], cwd=tmp_path)
        assert result.returncode == 2
        error_line(result.stderr, str(read_only), "Read-only file system")
    with small_disk(tmp_path / "full", size="1m") as full:
        fill(full)
        result = run_tidpo(["train", *QUICK, f"hydra.run.dir={full / 'run'}"], cwd=tmp_path)
        assert result.returncode == 2
        error_line(result.stderr, str(full), "No space left on device")


def test_the_run_dir_check_comes_before_any_model_loads(tmp_path):
    """`train` itself (not only the CLI, whose Hydra makes the directory first) checks the run dir for writing."""
    from helpers import compose_config
    from tidpo_cli.disk import DiskError
    from tidpo_cli.trainer import train

    with small_disk(tmp_path / "full", size="1m") as full:
        (full / "run").mkdir()
        fill(full)
        with pytest.raises(DiskError, match="run directory .*No space left on device"):
            train(compose_config([*QUICK, "loss=dpo"]), full / "run")
        assert sorted(p.name for p in (full / "run").iterdir()) == []  # no model, reference or log written


def test_a_failed_write_to_the_log_file_stops_with_one_line(tmp_path):
    from tidpo_cli.disk import DiskError, stop_on_log_write_errors

    root = logging.getLogger()
    with small_disk(tmp_path / "disk", size="64k") as disk:
        handler = logging.FileHandler(disk / "train.log")
        root.addHandler(handler)
        try:
            stop_on_log_write_errors()
            fill(disk)
            with pytest.raises(DiskError, match=r"train\.log: No space left on device"):
                for _ in range(200):
                    logging.getLogger("tidpo").warning("x" * 1000)
            assert handler not in root.handlers  # the rest of the run logs nowhere into the failed file
        finally:
            root.removeHandler(handler)
            try:
                handler.close()
            except OSError:
                pass


# -- Ctrl-C -------------------------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_continues_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = [*RUN, "loss=dpo", "trainer.save_every=0"]
    proc = start(args, run_dir)
    wait_for(lambda: len(train_rows(run_dir)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "tidpo: Ctrl-C: saving a checkpoint after this step" in output
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1 and "the same command resumes from it" in output
    assert train_rows(run_dir)[-1]["step"] == int(saved[0].name.split("-")[1])
    assert not (run_dir / LOCK).exists()
    result = run_tidpo(["train", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted["dpo"])


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint_or_traceback(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start([*RUN, "loss=dpo"], run_dir, env={"TIDPO_TEST_PAUSE_IN_CHECKPOINT": "5:60"})
    wait_for(lambda: (run_dir / "checkpoints" / "step-5.tmp" / "model.safetensors").exists(), proc)
    proc.send_signal(signal.SIGINT)  # recorded: the run would checkpoint after the one it is writing
    time.sleep(REPEAT_WINDOW_S + 0.5)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - began < 20  # not after the 60 s pause
    assert proc.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "tidpo: second Ctrl-C: stopped at once" in output and "Traceback" not in output
    assert list_checkpoints(run_dir) == [] and not (run_dir / LOCK).exists()
    result = run_tidpo(["train", *RUN, "loss=dpo", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" not in result.stdout  # the half-written step-5.tmp is no checkpoint
    assert_same_run(run_dir, uninterrupted["dpo"])


# -- two runs, one directory --------------------------------------------------------------------------------------

def test_a_second_run_or_sweep_into_a_held_directory_stops_naming_the_holder(tmp_path):
    sweep = tmp_path / "sweep"
    long = [*QUICK, "loss=dpo", "trainer.max_steps=100000", "trainer.save_every=0", "trainer.save_final=false",
            "trainer.eval_before=false"]
    holder = subprocess.Popen([sys.executable, "-m", "tidpo_cli.cli", "train", "-m", *long, "seed=1,2",
                               f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (sweep / "0" / LOCK).exists() and len(train_rows(sweep / "0")) >= 1, holder)
        held = json.loads((sweep / "0" / LOCK).read_text())
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname()
        record = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
        assert "seed=1" in record
        again = run_tidpo(["train", "-m", *long, "seed=3,4", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
        assert again.returncode == 2
        error_line(again.stderr, f"{sweep / '0'} is in use by another run", f"pid {holder.pid}", "hydra.run.dir")
        one = run_tidpo(["train", *long, "seed=5", f"hydra.run.dir={sweep / '0'}"], cwd=tmp_path)
        assert one.returncode == 2
        error_line(one.stderr, f"pid {holder.pid}")
        assert holder.poll() is None  # the holder trains on, its lock and its record of the config untouched
        assert json.loads((sweep / "0" / LOCK).read_text()) == held
        assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text() == record
        assert not (sweep / "0" / ".hydra-incoming").exists()
    finally:
        holder.kill()
        holder.wait()


def _lock_file(run_dir: Path, **holder) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"since": "2026-12-01 10:00:00", "slurm_job_id": None, **holder}))


def test_stale_locks_are_taken_over_and_live_or_foreign_ones_are_not(tmp_path, monkeypatch, caplog):
    here = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    _lock_file(tmp_path, host=here, pid=gone.pid, started=started)
    with caplog.at_level(logging.WARNING, logger="tidpo"), RunLock(tmp_path, Dist()):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over" in caplog.text and f"no process {gone.pid} of that start runs on {here}" in caplog.text
    assert not (tmp_path / LOCK).exists()  # released at exit

    alive = psutil.Process()
    _lock_file(tmp_path, host=here, pid=alive.pid, started=alive.create_time())
    with pytest.raises(UserError, match=f"in use by another run \\(pid {alive.pid} on {here}"):
        RunLock(tmp_path, Dist()).__enter__()
    _lock_file(tmp_path, host="elsewhere", pid=1, started=0.0, slurm_job_id="41")
    with pytest.raises(UserError, match="pid 1 on elsewhere, SLURM job 41"):
        RunLock(tmp_path, Dist()).__enter__()
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, requeued onto another node: the old one is gone
    with RunLock(tmp_path, Dist()):
        assert json.loads((tmp_path / LOCK).read_text())["slurm_job_id"] == "41"
    assert not (tmp_path / LOCK).exists()


# -- the checkpoint reader, against any damage --------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run dir with checkpoints of steps 5 and 10 of the tiny model (plain engine), and what loads them."""
    from helpers import compose_config
    from tidpo_cli.checkpoint import TrainState, save_checkpoint
    from tidpo_cli.distributed import PlainEngine
    from tidpo_cli.manifest import layout_of
    from tidpo_cli.modeling import load_policy, load_tokenizer
    from tidpo_cli.schedule import build_optimizer, build_scheduler

    cfg = compose_config([*QUICK, "loss=dpo"])
    policy = load_policy(cfg.model, load_tokenizer(cfg.model))
    optimizer = build_optimizer(policy, cfg.trainer)
    engine = PlainEngine(policy, optimizer, build_scheduler(optimizer, cfg.trainer, 10), cfg.trainer.max_grad_norm)
    layout = layout_of(policy, cfg.deepspeed, 1)
    run_dir = tmp_path_factory.mktemp("two") / "run"
    for step in (5, 10):
        save_checkpoint(run_dir, TrainState(step=step, epoch=0, position=8 * step), engine, cfg, None, layout=layout)
    return run_dir, layout, engine


def _damage(path: Path, how: str, at: int, xor: int) -> None:
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, at % max(size, 1))
    elif size:
        flip = bytearray(path.read_bytes())
        flip[at % size] ^= xor
        path.write_bytes(bytes(flip))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAMES = ["config.yaml", "layout.json", "manifest-rank0.json", "model.safetensors", "optimizer.pt",
         "rng-rank0.json", "rng-rank0.safetensors", "scheduler.pt", "state.json"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NAMES), how=st.sampled_from(["truncate", "flip"]), at=st.integers(0, 2**31),
       xor=st.integers(1, 255))
def test_any_truncation_or_flipped_byte_is_caught_before_loading(two_checkpoints, name, how, at, xor):
    """A damaged newest checkpoint: named resume stops with a one-line UserError; auto falls back to the intact older
    one, which then loads; nothing else is ever raised."""
    import tempfile

    from tidpo_cli.checkpoint import choose_checkpoint, load_checkpoint

    source, layout, engine = two_checkpoints
    assert sorted(p.name for p in (source / "checkpoints" / "step-10").iterdir()) == NAMES
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(source, run_dir)
        newest = run_dir / "checkpoints" / "step-10"
        _damage(newest / name, how, at, xor)
        with pytest.raises(UserError) as caught:
            choose_checkpoint(run_dir, str(newest), layout)
        assert "cannot be read" in str(caught.value) and "\n" not in str(caught.value)
        chosen = choose_checkpoint(run_dir, "auto", layout)
        assert chosen == run_dir / "checkpoints" / "step-5"
        assert (run_dir / "checkpoints" / "step-10.unreadable").is_dir()
        assert load_checkpoint(chosen, engine).step == 5
