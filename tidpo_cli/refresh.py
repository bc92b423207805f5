"""Which steps' anchors are sampled together (`loss.anchor.refresh_every`), and how `auto` picks that window.

A window of k steps samples the anchors of all k steps at the window's first step, in one batched generation:
a step's anchor then comes from a policy up to k - 1 updates old. Worth it only where sampling is latency-bound
(a GPU generates 8 or 64 rows in about the same time per token); on a compute-bound device it only costs fidelity.

`auto` measures that. Its first steps run a fixed probe of windows, 1, 2, 1, 2 steps (every shape twice, so the
second of each is timed without first-call costs: kernel choice, allocation, compilation), which gives the time to
sample one step's anchors (t1) and two steps' at once (t2). Then `fixed = 2 t1 - t2` is what a generation costs
whatever its rows (the latency part) and `t2 - t1` what each step's rows add. The window is the smallest k whose
share of the fixed cost per step, fixed / k, is at most FIXED_SHARE of t1, capped at `loss.anchor.max_age + 1` (no
anchor more than max_age updates old); k = 1 when the fixed part is already below that (compute-bound sampling).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from .anchors import uses_anchors

PROBE = (1, 2, 1, 2)           # auto's first windows, in steps
STARTS = {sum(PROBE[:i]) + 1: size for i, size in enumerate(PROBE)}  # first step -> size: {1: 1, 2: 2, 4: 1, 5: 2}
PROBE_END = sum(PROBE)
TIMED = {4: "one", 5: "two"}   # the probe windows timed (by their first step): the second of each shape
FIXED_SHARE = 0.1


def pick_window(one: float, two: float, max_age: int) -> int:
    """The window for sampling times `one` (one step's anchors) and `two` (two steps' at once), see the module doc."""
    fixed = max(0.0, 2 * one - two)
    if fixed <= FIXED_SHARE * one:
        return 1
    return min(max_age + 1, math.ceil(fixed / (FIXED_SHARE * one) - 1e-9))  # 3.0000000000000004 is 3


def window_size(loss_cfg: DictConfig, step: int, steps: int, chosen: int | None) -> int:
    """Steps whose anchors are sampled together at `step` (1 without anchors). Fixed k: windows start at steps
    1, k + 1, 2k + 1, ... . `auto`: the probe's windows, then windows of `chosen` (the picked k, None while unknown:
    then 1) from the step after the probe. A run resumed inside a window samples the rest of it anew."""
    k = loss_cfg.anchor.refresh_every
    if not uses_anchors(loss_cfg):
        return 1
    first = 1
    if k == "auto":
        for start, size in STARTS.items():
            if step < start + size:
                return min(start + size - step, steps - step + 1)
        k, first = chosen or 1, PROBE_END + 1
    return min(k - (step - first) % k, steps - step + 1)


def record(loss_cfg: DictConfig, timings: dict[str, float], step: int, size: int, seconds: float) -> int | None:
    """Under `auto`, before a window is picked: keep the time of a timed probe window (a whole one: a window cut
    short by a resume is not timed) in `timings`; the picked window once both times are known, else None. A run
    resumed past the probe without them keeps windows of 1."""
    if step in TIMED and size == STARTS[step]:
        timings[TIMED[step]] = seconds
    if {"one", "two"} <= timings.keys():
        return pick_window(timings["one"], timings["two"], loss_cfg.anchor.max_age)
    return None
