"""scripts/slurm/ and the hydra/launcher=slurm sweep on a real one-node SLURM cluster on this machine.

The session fixture starts the cluster with scripts/slurm/local_cluster.sh (installing slurm-wlm and munge with
apt-get when they are missing) and stops it at the end if it started it. Where SLURM cannot be installed (not root,
no apt-get, or apt-get could not install it: no package index) every test here is skipped with the reason. Any other
failure to start the cluster is skipped too on a developer's machine, but under CI (the CI environment variable set
to true, as CI services do) it fails every test here: there SLURM is installed and the cluster must come up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import QUICK, REPO

SLURM_DIR = REPO / "scripts" / "slurm"
CLUSTER = SLURM_DIR / "local_cluster.sh"
SBATCH_SCRIPT = SLURM_DIR / "train.sbatch"
# The local node has no GPUs and few CPUs: override the script's GPU-cluster defaults.
LOCAL_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00"]
LOCAL_LAUNCHER = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.timeout_min=15"]
# DPO: fast steps. No periodic checkpoint before the signal, so a resume must use the one the signal made.
STEPS = 100
LONG = [*QUICK, "loss=dpo", f"trainer.max_steps={STEPS}", "trainer.save_every=50", "trainer.keep_last=null"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


# What local_cluster.sh needs installed (its have_binaries).
SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "munge", "sinfo", "sbatch", "scontrol")


def slurm_installed() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in SLURM_BINARIES)


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (apt-get install, slurmctld/slurmd)")
    if not (shutil.which("apt-get") or slurm_installed()):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    try:
        setup = subprocess.run(["bash", str(CLUSTER), "setup"], capture_output=True, text=True, timeout=900)
        failed = setup.returncode != 0
        why = f"exited {setup.returncode}: {(setup.stderr.strip().splitlines() or ['no output'])[-1]}"
    except subprocess.TimeoutExpired:
        failed, why = True, "did not finish in 900 s"
    if failed:
        message = f"could not start a local SLURM cluster (local_cluster.sh setup {why})"
        if not slurm_installed():  # the one reason to skip everywhere: SLURM could not be installed here
            pytest.skip(f"{message}; SLURM is not installed")
        if under_ci():
            pytest.fail(f"{message}; SLURM is installed, and under CI the cluster must start", pytrace=False)
        pytest.skip(message)
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "teardown"], capture_output=True, timeout=300)


@pytest.fixture(autouse=True)
def _cluster(slurm_cluster):
    """Every test in this module runs on the cluster (or is skipped with the fixture's reason)."""


def job_env(**extra) -> dict:
    # sbatch passes the caller's environment on to the job: the interpreter this test runs in has tidpo.
    return {**os.environ, "TIDPO_PYTHON": sys.executable, **extra}


def submit(args: list[str], cwd: Path, env: dict | None = None, sbatch: tuple[str, ...] = ()) -> str:
    result = subprocess.run(["sbatch", "--parsable", *LOCAL_SBATCH, *sbatch, str(SBATCH_SCRIPT), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=60, env=env or job_env())
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, timeout: float = 300) -> dict[str, str]:
    """Poll until the job has finished for good (sbatch --wait polls only every 32 s)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job_info(job_id)}")


def wait_for(condition, what: str, timeout: float = 180, job_id: str | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if job_id is not None:
            assert job_info(job_id).get("JobState") not in FINISHED, f"job {job_id} ended while waiting for {what}"
        time.sleep(0.1)
    if job_id is not None:
        subprocess.run(["scancel", job_id])
    raise AssertionError(f"timed out waiting for {what}")


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r["step"] for r in rows if "loss" in r]


def assert_final_model_loads(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_sbatch_wait_trains_and_keeps_the_log_in_the_run_dir(tmp_path):
    result = subprocess.run(["sbatch", "--wait", "--parsable", *LOCAL_SBATCH, str(SBATCH_SCRIPT), *QUICK, "loss=dpo"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=job_env())
    job_id = result.stdout.strip().split(";")[0]
    assert result.returncode == 0, (result.stderr, list(tmp_path.glob("*.out")) and
                                    next(tmp_path.glob("*.out")).read_text()[-3000:])
    run_dir = tmp_path / "runs" / f"slurm-{job_id}"  # the default run dir, derived from the job id
    assert_final_model_loads(run_dir)
    assert train_steps(run_dir) == [1, 2, 3]
    assert (run_dir / "train.log").exists()
    job_log = run_dir / f"tidpo-{job_id}.out"  # the job's SLURM log (%x-%j.out), linked into the run dir
    assert job_log.resolve() == (tmp_path / f"tidpo-{job_id}.out").resolve()
    text = job_log.read_text()
    assert f"job {job_id} (restart 0)" in text
    assert re.search(r"launch: srun .* -m tidpo_cli\.cli train .*hydra\.run\.dir=runs/slurm-" + job_id, text)
    assert "torch.distributed.run" not in text  # one process: plain tidpo train
    assert f"run dir: {run_dir}" in text  # the training's own summary went to the job log
    assert "the training exited with code 0" in text


@pytest.mark.parametrize("how", ["usr1_before_time_limit", "scontrol_requeue"])
def test_preempted_job_is_requeued_and_resumes_in_the_same_run_dir(tmp_path, how):
    """usr1_before_time_limit: what --signal=B:USR1@120 does before the time limit (the script requeues the job).
    scontrol_requeue: SIGTERM to the job, as an admin's requeue or a preemption does (SLURM requeues it)."""
    run_dir = tmp_path / "run"
    job_id = submit([*LONG, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wait_for(lambda: len(train_steps(run_dir)) >= 2, "the first training steps", job_id=job_id)
    if how == "usr1_before_time_limit":
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = wait_job(job_id)
    log = (tmp_path / f"tidpo-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]

    signal_name = "SIGUSR1" if how == "usr1_before_time_limit" else "SIGTERM"
    saved = re.search(rf"received {signal_name}: checkpoint saved at step (\d+); exiting with code 75", log)
    assert saved, log[-4000:]
    step = int(saved.group(1))
    assert 2 <= step < STEPS
    if how == "usr1_before_time_limit":
        assert f"requeueing job {job_id}" in log
    assert f"job {job_id} (restart 1)" in log
    train_log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir}/checkpoints/step-{step} (step {step} of {STEPS})" in train_log
    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # every step exactly once
    assert_final_model_loads(run_dir)
    assert (run_dir / f"tidpo-{job_id}.out").exists()


def test_sweep_on_slurm_runs_one_job_per_point_and_requeues_only_a_preempted_one(tmp_path):
    sweep_dir = tmp_path / "sweep"
    name = f"tidpo-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidpo_cli.cli", "train", "-m", "hydra/launcher=slurm", "loss.beta=0.05,0.1", *LONG,
         f"hydra.sweep.dir={sweep_dir}", f"hydra.launcher.name={name}", *LOCAL_LAUNCHER],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env())
    try:
        # Preempt the second point mid-run: USR1 to the job's training process, as --signal=USR1@120 sends it.
        wait_for(lambda: len(train_steps(sweep_dir / "1")) >= 2 or proc.poll() is not None, "the first steps of job 1")
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        array_task = next((sweep_dir / ".submitit").glob("*_1")).name  # e.g. 12_1
        subprocess.run(["scancel", "--signal=USR1", array_task], check=True)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "--name", name])
    assert proc.returncode == 0, output[-4000:]

    betas = []
    for num in ("0", "1"):
        job_dir = sweep_dir / num
        assert train_steps(job_dir) == list(range(1, STEPS + 1)), num  # every step exactly once
        assert_final_model_loads(job_dir)
        betas.append(float(re.search(r"beta: ([0-9.]+)", (job_dir / ".hydra" / "config.yaml").read_text()).group(1)))
    assert sorted(betas) == [0.05, 0.1]

    logs = {num: next((sweep_dir / ".submitit").glob(f"*_{num}/*_log.out")).read_text() for num in ("0", "1")}
    assert logs["0"].count("Starting with JobEnvironment") == 1  # the other point was left alone
    assert logs["1"].count("Starting with JobEnvironment") == 2, logs["1"][-4000:]
    assert f"requeueing job {array_task}" in logs["1"]
    assert re.search(rf"resumed from .*/checkpoints/step-\d+ \(step \d+ of {STEPS}\)", (sweep_dir / "1" / "train.log").read_text())


def test_launch_commands_and_early_errors(tmp_path):
    """The multi-process launch line (TIDPO_DRY_RUN=1 prints it) and the script's one-line errors."""
    torchrun = submit(["loss=dpo"], cwd=tmp_path, env=job_env(GPUS_PER_NODE="2", TIDPO_DRY_RUN="1"))
    bad_python = submit([], cwd=tmp_path, env=job_env(TIDPO_PYTHON="/nonexistent/python"))
    sweep_flag = submit(["-m", "loss.beta=0.1,0.2"], cwd=tmp_path)
    states = {job: wait_job(job, timeout=120)["JobState"] for job in (torchrun, bad_python, sweep_flag)}

    text = (tmp_path / f"tidpo-{torchrun}.out").read_text()
    assert states[torchrun] == "COMPLETED", text
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    port = 20000 + int(torchrun) % 20000
    assert (f"launch: srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 {sys.executable} -m "
            f"torch.distributed.run --nnodes 1 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint {host}:{port} "
            f"--rdzv_id {torchrun} -m tidpo_cli.cli train loss=dpo hydra.run.dir=runs/slurm-{torchrun}") in text
    assert "1 node(s) x 2 process(es)" in text

    text = (tmp_path / f"tidpo-{bad_python}.out").read_text()
    assert states[bad_python] == "FAILED"
    assert "'/nonexistent/python' cannot import tidpo_cli: set TIDPO_PYTHON" in text

    text = (tmp_path / f"tidpo-{sweep_flag}.out").read_text()
    assert states[sweep_flag] == "FAILED"
    assert "tidpo train -m hydra/launcher=slurm" in text


def test_two_process_deepspeed_job_checkpoints_on_usr1_and_resumes_after_requeue(tmp_path):
    """2 tasks' worth of training in one job: torchrun starts 2 processes (DeepSpeed ZeRO-2, gloo). USR1 before
    the time limit reaches both through torchrun; they agree on the step, checkpoint together and stop; the
    script requeues the job and the 2 processes of the next start resume from that checkpoint."""
    run_dir = tmp_path / "run"
    job_id = submit([*LONG, "deepspeed=zero2", "trainer.micro_batch_size=4", f"hydra.run.dir={run_dir}"],
                    cwd=tmp_path, env=job_env(GPUS_PER_NODE="2"), sbatch=("--cpus-per-task=2",))
    wait_for(lambda: len(train_steps(run_dir)) >= 3, "the first training steps", timeout=240, job_id=job_id)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = wait_job(job_id, timeout=400)
    log = (tmp_path / f"tidpo-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "torch.distributed.run" in log and "1 node(s) x 2 process(es)" in log
    saved = re.search(r"received SIGUSR1: checkpoint saved at step (\d+)", log)
    assert saved, log[-4000:]
    step = int(saved.group(1))
    train_log = (run_dir / "train.log").read_text()
    assert "2 processes, DeepSpeed ZeRO-2" in train_log
    assert f"resumed from {run_dir}/checkpoints/step-{step} (step {step} of {STEPS})" in train_log
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "rng-rank1.json").is_file()
    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # every step exactly once
    assert_final_model_loads(run_dir)


def test_one_srun_task_per_process_reads_rank_and_rendezvous_from_slurm(tmp_path):
    """`srun --ntasks=2 tidpo train ...`: no torchrun; each task finds its rank, the world size and the first node
    (MASTER_ADDR) in SLURM's variables, and both write into one run dir named after the job."""
    command = (f"srun --ntasks=2 {sys.executable} -m tidpo_cli.cli train {' '.join(QUICK)} loss=dpo "
               "deepspeed=zero2 trainer.micro_batch_size=4")
    result = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--time=00:10:00",
                             "--output=srun-%j.out", "--wrap", command], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=job_env())
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    info = wait_job(job_id, timeout=300)
    output = (tmp_path / f"srun-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", output[-4000:]
    run_dir = tmp_path / "runs" / "distributed" / job_id
    assert "2 processes, DeepSpeed ZeRO-2" in (run_dir / "train.log").read_text()
    assert train_steps(run_dir) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step-3" / "rng-rank1.json").is_file()
    assert_final_model_loads(run_dir)


def test_a_requeued_job_takes_over_the_lock_its_earlier_start_left_on_another_node(tmp_path):
    """A job killed hard (node failure) leaves RUN/run.lock behind; SLURM requeues it, possibly onto another node,
    under the same job id. Made here with a held job: the lock names another host and this job, then the job runs."""
    run_dir = tmp_path / "run"
    job_id = submit([*QUICK, "loss=dpo", f"hydra.run.dir={run_dir}"], cwd=tmp_path, sbatch=("--hold",))
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({"host": "node-that-failed", "pid": 4242, "started": 0.0,
                                                  "since": "2026-12-01 03:00:00", "slurm_job_id": job_id}))
    subprocess.run(["scontrol", "release", job_id], check=True)
    info = wait_job(job_id)
    log = (tmp_path / f"tidpo-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"it is this SLURM job ({job_id}) before its requeue" in log
    assert "pid 4242 on node-that-failed" in log
    assert train_steps(run_dir) == [1, 2, 3] and not (run_dir / "run.lock").exists()
