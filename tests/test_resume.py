"""Reliability under kills and bad numbers: exact resume, atomic checkpoints, preemption, NaN guards, memory."""

import json
import shutil
import signal

import pytest
import torch

from helpers import QUICK, RUN, assert_same_run, compose_config, run_tidpo, start, train_rows, wait_for
from tidpo_cli import objective
from tidpo_cli.checkpoint import list_checkpoints, load_checkpoint
from tidpo_cli.distributed import PlainEngine
from tidpo_cli.errors import UserError
from tidpo_cli.trainer import PREEMPTED_EXIT_CODE, train


@pytest.mark.parametrize("loss", ["dpo", "tidpo"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, loss):
    run_dir = tmp_path / "run"
    proc = start([*RUN, f"loss={loss}"], run_dir)
    # Kill at whatever step the run is at once its first checkpoint exists and a few steps have passed.
    wait_for(lambda: len(list_checkpoints(run_dir)) >= 1 and len(train_rows(run_dir)) >= 7, proc)
    proc.kill()
    proc.wait()
    killed_at = len(train_rows(run_dir))
    assert killed_at < 40
    result = run_tidpo(["train", *RUN, f"loss={loss}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    assert_same_run(run_dir, uninterrupted[loss])


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start([*RUN, "loss=dpo"], run_dir, env={"TIDPO_TEST_PAUSE_IN_CHECKPOINT": "10:60"})
    partial = run_dir / "checkpoints" / "step-10.tmp"
    wait_for(lambda: (partial / "model.safetensors").exists(), proc)
    proc.kill()
    proc.wait()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-5"]
    assert partial.exists() and not (partial / "state.json").exists()
    # The previous checkpoint loads.
    cfg = compose_config([*RUN, "loss=dpo"])
    from tidpo_cli.modeling import load_policy, load_tokenizer
    from tidpo_cli.schedule import build_optimizer, build_scheduler
    policy = load_policy(cfg.model, load_tokenizer(cfg.model))
    optimizer = build_optimizer(policy, cfg.trainer)
    engine = PlainEngine(policy, optimizer, build_scheduler(optimizer, cfg.trainer, 40), cfg.trainer.max_grad_norm)
    state = load_checkpoint(run_dir / "checkpoints" / "step-5", engine)
    assert state.step == 5
    result = run_tidpo(["train", *RUN, "loss=dpo", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoints/step-5 (step 5 of 40)" in result.stdout
    assert not partial.exists()
    assert_same_run(run_dir, uninterrupted["dpo"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_a_checkpoint_and_resume_continues(tmp_path, uninterrupted, sig):
    run_dir = tmp_path / "run"
    proc = start([*RUN, "loss=dpo", "trainer.save_every=0"], run_dir)
    wait_for(lambda: len(train_rows(run_dir)) >= 3, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1 and f"received {signal.Signals(sig).name}" in output
    stopped_at = int(saved[0].name.split("-")[1])
    assert train_rows(run_dir)[-1]["step"] == stopped_at
    result = run_tidpo(["train", *RUN, "loss=dpo", "trainer.save_every=0", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(run_dir, uninterrupted["dpo"])


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    real = objective.batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # micro-batches 3 and 4 (= steps 3 and 4) give a NaN loss
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), metrics

    monkeypatch.setattr("tidpo_cli.trainer.batch_loss", poisoned)
    cfg = compose_config([*QUICK, "loss=dpo", "trainer.max_steps=6", "trainer.eval_before=false",
                          "data.eval_size=0", "trainer.schedule=linear"])
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    # A skipped step makes no update: the schedule does not advance either, and training goes on after it.
    lrs = [r["lr"] for r in rows]
    assert lrs[1] == lrs[2] == lrs[3] and lrs[4] < lrs[3]
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows[4:])  # finite again (NaN != NaN)

    def always_nan(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr("tidpo_cli.trainer.batch_loss", always_nan)
    cfg = compose_config([*QUICK, "loss=dpo", "trainer.max_steps=20", "trainer.max_bad_steps=3",
                          "trainer.eval_before=false", "data.eval_size=0"])
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss"):
        train(cfg, tmp_path / "bad")


def test_resident_memory_stays_flat_over_300_steps(tmp_path):
    result = run_tidpo(["train", *QUICK, "loss=tidpo", "trainer.max_steps=300", "trainer.save_every=100",
                        "trainer.save_final=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rss = {r["step"]: r["perf/rss_mb"] for r in train_rows(tmp_path / "run")}
    warm = max(rss[s] for s in range(40, 60))
    assert rss[300] < warm * 1.05, (warm, rss[300])


def test_resume_never_and_a_bad_resume_path(tmp_path):
    run_dir = tmp_path / "run"
    args = [*QUICK, "loss=dpo", "trainer.max_steps=4", "trainer.save_every=2", f"hydra.run.dir={run_dir}"]
    assert run_tidpo(["train", *args], cwd=tmp_path).returncode == 0
    again = run_tidpo(["train", *args, "trainer.resume=never"], cwd=tmp_path)
    assert again.returncode == 0 and "resumed from" not in again.stdout
    bad = run_tidpo(["train", *args, "trainer.resume=./nowhere"], cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.resume=./nowhere" in bad.stderr and "Traceback" not in bad.stderr


def test_checkpoint_round_trip_restores_every_rng_and_the_loop_state(tmp_path):
    import copy
    import random

    import numpy as np

    from tidpo_cli.checkpoint import TrainState, save_checkpoint
    from tidpo_cli.modeling import load_policy, load_tokenizer
    from tidpo_cli.schedule import build_optimizer, build_scheduler

    cfg = compose_config([*QUICK, "loss=dpo"])
    policy = load_policy(cfg.model, load_tokenizer(cfg.model))
    optimizer = build_optimizer(policy, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 10)
    state = TrainState(step=7, epoch=1, position=24, bad_steps=1, skipped_steps=3)
    engine = PlainEngine(policy, optimizer, scheduler, cfg.trainer.max_grad_norm)

    def take_step():  # gives the optimizer moments and a step count, and moves the schedule
        (sum((p.float() ** 2).sum() for p in policy.parameters()) * torch.rand(1)).backward()
        engine.step(True)

    take_step()
    take_step()
    saved = copy.deepcopy((policy.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    path = save_checkpoint(tmp_path, state, engine, cfg, keep_last=None)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    take_step()  # weights, moments, step counts and lr all move on from the saved ones
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    restored = load_checkpoint(path, engine)
    assert restored == state
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    weights, optimizer_state, scheduler_state = saved
    assert policy.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[name]) for name, value in policy.state_dict().items())
    now = optimizer.state_dict()
    assert now["param_groups"] == optimizer_state["param_groups"]
    assert now["state"].keys() == optimizer_state["state"].keys()
    assert len(now["state"]) == len(list(policy.parameters()))
    for index, moments in optimizer_state["state"].items():
        assert now["state"][index].keys() == moments.keys()
        assert all(torch.equal(now["state"][index][k], v) for k, v in moments.items()), index
    assert scheduler.state_dict() == scheduler_state and scheduler.last_epoch == 2
    assert sorted(f.name for f in path.iterdir()) == ["config.yaml", "manifest-rank0.json", "model.safetensors",
                                                      "optimizer.pt", "rng-rank0.json", "rng-rank0.safetensors",
                                                      "scheduler.pt", "state.json"]


def test_a_finished_run_started_again_does_nothing(tmp_path, uninterrupted):
    """A rerun sweep skips its finished runs: no step, eval or save; metrics and final/ are left as they were."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dpo"], run_dir)
    logged = (run_dir / "metrics.jsonl").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "final").iterdir()}
    result = run_tidpo(["train", *RUN, "loss=dpo", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already finished: step 40 of 40" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (run_dir / "metrics.jsonl").read_bytes() == logged
    more = run_tidpo(["train", *RUN, "loss=dpo", "trainer.max_steps=42", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert more.returncode == 0 and "already finished" not in more.stdout  # more steps: the run goes on
    assert [r["step"] for r in train_rows(run_dir)][-2:] == [41, 42]
