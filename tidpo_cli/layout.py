"""The batch layout (`trainer.share_prompt`): whether it can be shared, and under `auto` which trains faster on
this machine, timed on a real micro-batch.

Whether one packed row per pair (packing.py) beats one row per response depends on the attention kernel, the
device, the lengths and the model: the packed layout computes the prompt once but needs a mask, which on a GPU
takes SDPA off its fused causal kernel (FlexAttention keeps a fused kernel). So the two are timed, not guessed.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from .checkpoint import read_state
from .data.batches import BatchStream
from .data.collate import collate
from .distributed import Dist
from .errors import UserError
from .objective import forward
from .packing import attention_implementation, sharing_blocker

log = logging.getLogger("tidpo")

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


def share_prompt(cfg: DictConfig, model, device: torch.device, say: bool = False) -> bool:
    """Whether batches use the packed layout (packing.py) where nothing is timed (`tidpo eval`; training decides
    `auto` by timing, `training_layout`); `say` logs why a requested one cannot be used.

    Untimed, `auto` shares on the CPU only: on a GPU the 4-D mask keeps SDPA off its fused causal (flash)
    kernels, which cost more than the prompt's second copy (docs/benchmarks.md: DPO 1.6x slower per step on an
    H200)."""
    wanted = cfg.trainer.share_prompt
    if wanted is False or (wanted == "auto" and device.type != "cpu"):
        return False
    return can_share(cfg, model, say)


def can_share(cfg: DictConfig, model, say: bool = False) -> bool:
    """Whether the packed layout works for this loss and attention kernel; `say` logs why not."""
    blocker = sharing_blocker(cfg.loss, attention_implementation(model))
    if blocker and say and cfg.loss.name != "sft":
        log.info("trainer.share_prompt: not used: %s", blocker)
    return blocker is None


LAYOUTS = {False: "one row per response", True: "the prompt shared"}


def training_layout(cfg: DictConfig, policy, stream: BatchStream, device: torch.device, autocast, dist: Dist,
                    checkpoint: Path | None) -> bool:
    """Whether the training batches share the prompt. `trainer.share_prompt=auto`: the layout of the run that
    `checkpoint` resumes (its numbers round as the uninterrupted run's did), else the faster of the two on the
    first micro-batch, as rank 0 timed it, on every rank."""
    if cfg.trainer.share_prompt != "auto":
        return share_prompt(cfg, policy, device, say=True)
    if not can_share(cfg, policy, say=True):
        return False
    if checkpoint is not None:
        stored = read_state(checkpoint).share_prompt
        if stored is None:  # written before the layout was kept, when `auto` shared on the CPU only
            stored = device.type == "cpu"
        log.info("trainer.share_prompt=auto: %s, as in the run resumed", LAYOUTS[stored])
        return stored
    mine = timed_layout(policy, stream, device, autocast) if dist.main else False
    return dist.sum([float(mine)])[0] > 0  # rank 0's choice: the others add nothing


def timed_layout(policy, stream: BatchStream, device: torch.device, autocast) -> bool:
    """Whether the packed layout took less time than one row per response on the stream's next micro-batch."""
    pairs = stream.peek()
    batches = [{k: v.to(device) for k, v in collate(pairs, stream.pad_id, share_prompt=share).items()}
               for share in (False, True)]
    try:
        unshared, shared = time_layouts(policy, *batches, autocast=autocast)
    except torch.OutOfMemoryError:
        # It runs before DeepSpeed partitions the model: a model that fits only partitioned may not fit here.
        torch.cuda.empty_cache()
        log.warning("trainer.share_prompt=auto: timing the two layouts ran out of GPU memory: %s (set "
                    "trainer.share_prompt=true or false to skip the timing)", LAYOUTS[False])
        return False
    log.info("trainer.share_prompt=auto: a policy forward and backward of the first micro-batch takes %.4f s "
             "with %s, %.4f s with %s (the least of %d passes each): %s", unshared, LAYOUTS[False], shared,
             LAYOUTS[True], REPEATS, LAYOUTS[shared < unshared])
    return shared < unshared


def check_attention(cfg: DictConfig, device: torch.device) -> None:
    """An attention kernel that cannot train on `device` is the user's mistake."""
    if cfg.model.attn_implementation == "flex_attention" and device.type in ("cpu", "mps"):
        raise UserError(f"model.attn_implementation=flex_attention cannot train on the {device.type}: PyTorch's "
                        "FlexAttention has no backward there; use model.attn_implementation=sdpa, or a GPU")
