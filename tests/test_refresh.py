"""`loss.anchor.refresh_every`: the windows of steps whose anchors are sampled together, and `auto`, which picks the
window from timed sampling."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import QUICK, compose_config
from tidpo_cli.errors import UserError
from tidpo_cli.refresh import pick_window, record, window_size


def sizes(overrides: list[str], steps: int, chosen: int | None = None) -> list[int]:
    """The window size the loop asks for at each window start, walking the run as the loop does."""
    cfg = compose_config(["loss=tidpo", *overrides]).loss
    out, step = [], 1
    while step <= steps:
        out.append(window_size(cfg, step, steps, chosen))
        step += out[-1]
    return out


def test_fixed_windows_start_every_k_steps_and_end_with_the_run():
    assert sizes(["loss.anchor.refresh_every=3"], 8) == [3, 3, 2]  # windows 1-3, 4-6, 7-8
    cfg = compose_config(["loss=tidpo", "loss.anchor.refresh_every=3"]).loss
    assert [window_size(cfg, s, 8, None) for s in (2, 3, 5)] == [2, 1, 2]  # resumed inside a window: its rest
    assert sizes([], 4) == [1, 1, 1, 1]  # the paper: every step
    no_anchors = compose_config(["loss=tidpo_no_triplet", "loss.anchor.refresh_every=3"]).loss
    assert window_size(no_anchors, 1, 8, None) == 1


def test_auto_probes_then_takes_the_picked_window():
    # The probe: 1, 2, 1, 2 steps (steps 1, 2-3, 4, 5-6), then windows of the picked k from step 7.
    assert sizes(["loss.anchor.refresh_every=auto"], 16, chosen=4) == [1, 2, 1, 2, 4, 4, 2]
    assert sizes(["loss.anchor.refresh_every=auto"], 9, chosen=None) == [1, 2, 1, 2, 1, 1, 1]  # never picked: 1
    assert sizes(["loss.anchor.refresh_every=auto"], 4, chosen=None) == [1, 2, 1]  # a short run ends in the probe


@pytest.mark.parametrize("one, two, max_age, want", [
    (1.0, 2.0, 3, 1),     # twice the rows, twice the time: compute-bound, no window
    (1.0, 1.95, 3, 1),    # fixed part 0.05 s, a twentieth of one sampling: not worth an old anchor
    (1.0, 1.0, 3, 4),     # all latency (twice the rows for free): as old as allowed, max_age + 1
    (1.0, 1.0, 0, 1),     # max_age 0: every anchor from the current policy
    (1.0, 1.7, 9, 3),     # fixed 0.3 s: 0.3 / k <= 0.1 first at k = 3
    (2.0, 3.0, 9, 5),     # fixed 1.0 s of 2.0: 1.0 / k <= 0.2 at k = 5
])
def test_pick_window_from_the_two_sampling_times(one, two, max_age, want):
    assert pick_window(one, two, max_age) == want


def test_record_keeps_only_whole_timed_probe_windows():
    cfg = compose_config(["loss=tidpo", "loss.anchor.refresh_every=auto", "loss.anchor.max_age=3"]).loss
    timings: dict[str, float] = {}
    assert record(cfg, timings, 1, 1, 9.0) is None and timings == {}  # the first of its shape: warm-up, untimed
    assert record(cfg, timings, 2, 2, 9.0) is None and timings == {}
    assert record(cfg, timings, 4, 1, 1.0) is None and timings == {"one": 1.0}
    assert record(cfg, timings, 5, 1, 0.5) is None and timings == {"one": 1.0}  # cut short by a resume: untimed
    assert record(cfg, timings, 5, 2, 1.0) == 4 and timings == {"one": 1.0, "two": 1.0}


def test_refresh_every_takes_a_whole_number_or_auto():
    assert compose_config(["loss=tidpo", "loss.anchor.refresh_every=auto"]).loss.anchor.refresh_every == "auto"
    for bad in ("0", "often", "1.5"):
        with pytest.raises(UserError, match="refresh_every"):
            compose_config(["loss=tidpo", f"loss.anchor.refresh_every={bad}"])
    with pytest.raises(UserError, match="max_age"):
        compose_config(["loss=tidpo", "loss.anchor.max_age=-1"])


def test_auto_picks_from_measured_sampling_and_a_resume_keeps_the_pick(tmp_path, monkeypatch, caplog):
    """A run with `auto`: its generations follow the probe and then the window picked from the timed ones (here
    made latency-bound: every generation takes the same time, whatever its rows); the pick and its times are
    logged and kept in checkpoints, and a run resumed after the probe goes on with them, equal to the whole run."""
    import time

    from tidpo_cli import anchors
    from tidpo_cli.trainer import train

    calls = []
    original = anchors.generate

    def latency_bound(model, contexts, **kw):
        calls.append(len(contexts))
        time.sleep(0.3)  # a fixed cost dwarfs the tiny model's own time
        return original(model, contexts, **kw)

    monkeypatch.setattr(anchors, "generate", latency_bound)
    caplog.set_level(logging.INFO, logger="tidpo")
    run = [*QUICK, "loss=tidpo", "loss.anchor.refresh_every=auto", "loss.anchor.max_age=2",
           "trainer.micro_batch_size=4", "trainer.save_every=6", "trainer.schedule=constant"]
    train(compose_config([*run, "trainer.max_steps=12"]), tmp_path / "whole")
    assert calls == [4, 8, 4, 8, 12, 12]  # probe: 1, 2, 1, 2 steps of 4 pairs; then max_age + 1 = 3 steps each
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["anchor_window"] == 3 and set(state["anchor_timings"]) == {"one", "two"}
    assert "refresh_every=auto: windows of 3 steps from step 7" in caplog.text
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    sampled = [1, 2, 4, 5, 7, 10]  # each window's first step, where its generation (0.3 s asleep and more) ran
    assert [s for s, r in logged.items() if r["perf/anchor_s"] >= 0.3] == sampled
    assert all(logged[s]["perf/anchor_s"] == 0.0 for s in logged if s not in sampled)
    assert all(r["perf/anchor_s"] < 4 / r["perf/samples_per_s"] for r in logged.values())  # inside the step

    calls.clear()
    train(compose_config([*run, "trainer.max_steps=6"]), tmp_path / "resumed")
    train(compose_config([*run, "trainer.max_steps=12"]), tmp_path / "resumed")
    assert calls == [4, 8, 4, 8, 12, 12]  # the resumed part samples like the whole run: the pick came along

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["anchor/length"]) for r in rows if "anchor/length" in r]

    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert [s for s, *_ in resumed] == list(range(1, 13))
    for (_, a, la), (_, b, lb) in zip(whole, resumed):
        assert a == pytest.approx(b, abs=1e-6) and la == lb
