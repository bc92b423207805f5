"""`trainer.share_prompt=auto`: which batch layout trains faster on this machine, timed on a real micro-batch.

Whether one packed row per pair (packing.py) beats one row per response depends on the attention kernel, the
device, the lengths and the model: the packed layout computes the prompt once but needs a mask, which on a GPU
takes SDPA off its fused causal kernel (FlexAttention keeps a fused kernel). So the two are timed, not guessed.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .objective import forward

Batch = dict[str, torch.Tensor]

WARMUP, REPEATS = 1, 2  # a layout's first pass pays one-off costs (kernel choice, compiling), so it is not counted


def time_layouts(policy, unshared: Batch, shared: Batch, autocast=nullcontext) -> tuple[float, float]:
    """Seconds of one forward and backward of `policy` on the same micro-batch in the two layouts: (one row per
    response, packed), each the least of REPEATS passes after WARMUP, the layouts taking turns so that a burst of
    other work on the machine slows both (such work only ever adds time, hence the least).

    The gradients are thrown away: no parameter's `.grad` changes, nothing reaches an optimizer, and any
    randomness (dropout) draws from a forked stream, so training goes on as if unprobed."""
    params = [p for p in policy.parameters() if p.requires_grad]
    device = unshared["input_ids"].device
    times = {False: [], True: []}
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        for _ in range(WARMUP + REPEATS):
            for share, batch in ((False, unshared), (True, shared)):
                times[share].append(_timed_pass(policy, batch, params, autocast))
    return min(times[False][WARMUP:]), min(times[True][WARMUP:])


def _timed_pass(policy, batch: Batch, params: list[torch.Tensor], autocast) -> float:
    _sync(batch)
    start = time.perf_counter()
    with autocast():
        _, logps, mask = forward(policy, batch)
    # autograd.grad, not backward: the gradients come back as values and no `.grad` is written.
    torch.autograd.grad((logps * mask).sum(), params, allow_unused=True)
    _sync(batch)
    return time.perf_counter() - start


def _sync(batch: Batch) -> None:
    device = batch["input_ids"].device
    if device.type == "cuda":  # kernels run asynchronously: wait for them, or the clock reads launch time only
        torch.cuda.synchronize(device)
