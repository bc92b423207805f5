"""The training loop. One optimizer step reads top to bottom in `train`; the maths is in losses.py."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import psutil
import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from .config import config_changes
from .distributed import Dist, build_engine, setup, shard_reference
from .checkpoint import (TrainState, choose_checkpoint, find_resume_checkpoint, load_checkpoint, save_checkpoint,
                         save_hf_model)
from .disk import check_writable, stop_on_log_write_errors
from .manifest import layout_of
from .runlock import RunLock
from .errors import DataError, UserError
from .data.batches import BatchStream, eval_batches
from .data.examples import TokenizedExample
from .data.chat import chat_options
from .data.splits import load_splits
from .anchors import attach_anchors, uses_anchors
from .layout import check_attention, share_prompt, training_layout
from . import tis
from .loss_specs import live_reference_parts, needs_reference, reference_cacheable, uses_tis
from .objective import TokenIds, batch_loss, loss_items
from .modeling import (check_reference_tokenizer, load_policy, load_reference, load_tokenizer, pick_device,
                       with_reference)
from .reference_cache import ReferenceCache, cache_dir, cache_key, fill, model_fingerprint
from .refresh import PROBE_END, record, window_size
from .schedule import build_optimizer, build_scheduler
from .tracking import MetricSums, Tracker

log = logging.getLogger("tidpo")

Batch = dict[str, torch.Tensor]

# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint (sysexits' EX_TEMPFAIL:
# "try again"): scripts/slurm requeue the job on it, and the next start resumes.
PREEMPTED_EXIT_CODE = 75


# Exit code of a run stopped by Ctrl-C after saving a checkpoint (128 + SIGINT, the shell's code for it): a stop the
# user asked for, not a preemption to requeue; the next start resumes all the same.
INTERRUPTED_EXIT_CODE = 130
REPEAT_WINDOW_S = 2.0  # a Ctrl-C under torchrun reaches each worker twice (the terminal's, the agent's): one press


class StopSignals:
    """Remembers a SIGTERM or SIGUSR1 (SLURM preemption) or a first Ctrl-C (SIGINT), so the loop can checkpoint and
    stop at the next step boundary. A second Ctrl-C stops at once, without a checkpoint (`on_abort` first)."""

    def __init__(self, on_abort=lambda: None, announce: bool = True) -> None:
        self.received: int | None = None
        self.at = 0.0
        self.on_abort, self.announce = on_abort, announce  # announce: say so on stderr (rank 0 only)
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            if now - self.at < REPEAT_WINDOW_S:
                return
            if self.announce:
                sys.stderr.write("tidpo: second Ctrl-C: stopped at once, without a checkpoint (the saved ones are "
                                 "kept; the next start resumes from the newest)\n")
                sys.stderr.flush()
            self.on_abort()
            os._exit(INTERRUPTED_EXIT_CODE)
        if self.received is None:
            self.received, self.at = signum, now
            if signum == signal.SIGINT and self.announce:
                sys.stderr.write("tidpo: Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again "
                                 "to stop at once, without one)\n")
                sys.stderr.flush()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulate_gradients(policy, reference, micro_batches: list[Batch], loss_cfg: DictConfig, ids: TokenIds,
                         *, seed: int, autocast=nullcontext, engine=None, dist: Dist = Dist()) -> MetricSums:
    """Backward over this rank's micro-batches of one optimizer step; returns their metric sums.

    Each micro-batch's summed loss is divided by the items of the whole step over every rank (not of the
    micro-batch), so the accumulated gradient is exactly that of one large batch, even when micro-batches
    hold different numbers of response tokens; times the world size, because the ranks' gradients are
    averaged. `engine` (distributed.Engine) runs the backward and DeepSpeed's per-micro-batch step; without
    it, plain `.backward()`. Micro-batch `j` of rank `r` samples with `seed + j * world + r`: the same seeds
    whatever the split of a step's micro-batches over processes.
    """
    items = dist.sum([sum(loss_items(b, loss_cfg.name) for b in micro_batches)])[0]
    sums = MetricSums()
    for index, batch in enumerate(micro_batches):
        with autocast():
            loss_sum, metrics = batch_loss(policy, reference, batch, loss_cfg, ids,
                                           seed=micro_seed(seed, index, dist))
        loss = loss_sum / items * dist.world
        if engine is None:
            loss.backward()
        else:
            engine.backward(loss)
            engine.micro_step()
        sums.merge(metrics)
    return sums


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(policy, reference, pairs, cfg: DictConfig, ids: TokenIds, device, autocast,
             dist: Dist = Dist(), share: bool | None = None, cache=None) -> dict[str, float]:
    """Metrics of the held-out pairs, averaged over all of them, with an `eval/` prefix.

    Each rank scores every `world`-th pair. All ranks run the same number of batches (a rank that runs out
    repeats its last one and drops its numbers): under ZeRO-3 every forward is a collective. `share`: the
    layout (training passes its own); None: `share_prompt`'s. `cache`: the run's reference cache, if any.
    """
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    mine = pairs[dist.rank::dist.world]
    batches = list(eval_batches(mine or pairs[:1], cfg.trainer.eval_batch_size, ids.pad,
                                share_prompt=share_prompt(cfg, policy, device) if share is None else share))
    real = len(batches) if mine else 0
    for index in range(dist.max(len(batches))):
        batch = batches[min(index, len(batches) - 1)]
        if cache is not None:
            batch = cache.attach(batch)
        with autocast():
            _, metrics = batch_loss(policy, reference, to_device(batch, device), cfg.loss, ids,
                                    seed=cfg.seed + index, with_anchor=False)
        if index < real:
            sums.merge(metrics)
    policy.train(was_training)
    return dist.sum_metrics(sums).means(prefix="eval/")


def step_seed(cfg: DictConfig, step: int, world: int) -> int:
    """The seed of a step's random parts (anchors, random importance), so a step can be replayed on resume."""
    return (cfg.seed + 1) * 1_000_003 + step * cfg.trainer.grad_accum * world


def micro_seed(seed: int, index: int, dist: Dist) -> int:
    """The seed of this rank's micro-batch `index` in the step of `seed`: the same whatever the split of a step's
    micro-batches over processes (micro-batch j of rank r is the step's (j * world + r)-th)."""
    return seed + index * dist.world + dist.rank


def total_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    return max(1, int(cfg.trainer.epochs * batches_per_epoch) // cfg.trainer.grad_accum)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Run the whole training job that `cfg` (validated) describes; write everything into `run_dir`.

    Every process of a distributed job runs this; rank 0 alone writes metrics, logs progress and saves models.
    The run directory is checked for writing and locked (runlock.py) before anything loads.
    """
    check_writable(run_dir)
    stop_on_log_write_errors()
    dist = setup(pick_device(cfg.trainer.device), deepspeed_enabled=cfg.deepspeed.enabled)
    with RunLock(run_dir, dist) as lock:
        return _train(cfg, run_dir, dist, lock)


def _train(cfg: DictConfig, run_dir: Path, dist: Dist, lock: RunLock) -> dict[str, float]:
    t = cfg.trainer
    hf_logging.disable_progress_bar()  # our own progress display is the one the user reads
    device = dist.device
    check_attention(cfg, device)
    if not dist.main:
        log.setLevel(logging.WARNING)  # one voice in train.log: rank 0's
    seed_everything(cfg.seed)
    bf16 = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t.precision == "bf16" else nullcontext
    autocast = nullcontext if cfg.deepspeed.enabled else bf16  # DeepSpeed casts to bf16 itself

    tokenizer = load_tokenizer(cfg.model)
    other_reference = cfg.model.reference is not None and needs_reference(cfg.loss)  # model.reference, and read
    if other_reference:
        check_reference_tokenizer(cfg.model, tokenizer)  # before the data is read and any weights load
    template = chat_options(cfg.data).template
    if template is not None:  # data.chat_template: what the data is rendered with, and what final/ is saved with
        tokenizer.chat_template = template
    splits = load_splits(cfg.data, tokenizer, seed=cfg.seed)  # data problems surface before a big model loads
    for name, report in splits.reports.items():
        log.info("data (%s): %s", name, report.summary())
        for line in report.first_skipped:
            log.info("  skipped %s", line)
    if any(report.shortened for report in splits.reports.values()):
        log.warning("data: %s", next(r for r in splits.reports.values() if r.shortened).mismatch_warning())
    log.info("%s: %d train%s, %d held out", "examples" if isinstance(splits.train[0], TokenizedExample) else "pairs",
             len(splits.train),
             f" ({round(cfg.data.flip_labels * len(splits.train))} with chosen and rejected swapped: data.flip_labels)"
             if cfg.data.flip_labels else "", len(splits.eval))

    if isinstance(splits.train[0], TokenizedExample):
        check_unpaired(cfg)
        cfg.trainer.share_prompt = False  # one row per example: nothing to share
    if uses_tis(cfg.loss):
        tis.prepare(cfg.loss.tis, splits, run_dir, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                    device=device, dist=dist, log=log)
    policy = load_policy(cfg.model, tokenizer).to(device)
    if dist.main and cfg.model.name_or_path is None and not (run_dir / "reference").exists():
        # A model built from random weights exists nowhere else: keep it, so `tidpo eval` can use the reference
        # this run used, and a LoRA adapter has its base.
        save_hf_model(policy, tokenizer, run_dir / "reference")
    other = None
    if other_reference:
        other = load_reference(cfg.model, tokenizer).to(device)
        log.info("reference: %s (model.reference)", cfg.model.reference)
    elif cfg.model.reference is not None:
        log.warning("model.reference=%s is not loaded: loss=%s reads no reference", cfg.model.reference, cfg.loss.name)
    caching = cache_dir(t.reference_cache, run_dir) if reference_cacheable(cfg.loss) else None
    # Hashed before LoRA adapters are added and DeepSpeed partitions the weights.
    fingerprint = model_fingerprint(other if other is not None else policy) if caching else None
    policy, reference, peft_model = with_reference(policy, cfg.model, reference=needs_reference(cfg.loss), other=other)
    if reference is None:
        log.info("reference: none (loss=%s reads no reference model's log-probs)", cfg.loss.name)
    if t.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); older releases have only the old one.
        (getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable)()
    policy.train()
    log.info("model: %s, %.2fM parameters (%.2fM trainable%s), on %s%s",
             cfg.model.name_or_path or "tiny Llama (random init)", sum(p.numel() for p in policy.parameters()) / 1e6,
             sum(p.numel() for p in policy.parameters() if p.requires_grad) / 1e6,
             ": LoRA adapters" if peft_model else "", device,
             f", {dist.world} processes, DeepSpeed ZeRO-{cfg.deepspeed.zero_optimization.stage}"
             if cfg.deepspeed.enabled else "")

    ids = TokenIds(pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id, max_length=cfg.data.max_length)
    # One global stream of micro-batches, the same on every rank; rank r takes micro-batches r, r + world, ...
    stream = BatchStream(splits.train, t.micro_batch_size, tokenizer.pad_token_id, seed=cfg.seed,
                         shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length)
    layout = layout_of(policy, cfg.deepspeed, dist.world)  # before DeepSpeed partitions the parameters
    checkpoint = choose_checkpoint(run_dir, t.resume, layout, dist)  # checked before anything is loaded
    # Timed before DeepSpeed wraps the model (a plain module, whose gradients can be taken and dropped), under
    # the bf16 autocast that DeepSpeed's own cast stands for later.
    stream.share_prompt = training_layout(cfg, policy, stream, device, bf16, dist, checkpoint)
    steps = total_steps(cfg, stream.batches_per_epoch // dist.world)
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, steps)
    reference = shard_reference(reference, cfg, dist)
    cache = None
    if caching is not None:
        cache = ReferenceCache(caching, cache_key(cfg, fingerprint, device))
        found, computed = fill(cache, reference, [*splits.train, *splits.eval], batch_size=t.eval_batch_size,
                               pad_id=ids.pad, share_prompt=stream.share_prompt, device=device, autocast=autocast,
                               dist=dist)
        live = live_reference_parts(cfg.loss)
        log.info("reference cache %s: %d sequences read, %d computed; %s", cache.folder, found, computed,
                 f"the reference still runs for {' and '.join(live)}" if live else
                 "the reference runs no forward from here on, and its own copy of the weights (if any) is freed")
        if not live:
            reference = other = None
    elif t.reference_cache != "off" and needs_reference(cfg.loss):
        log.info("trainer.reference_cache: not used, loss.alpha=%s (TDPO's KL reads the reference's whole "
                 "distributions, which no cache holds)", cfg.loss.alpha)
    rows = cache.attach if cache is not None else (lambda batch: batch)
    engine = build_engine(policy, optimizer, scheduler, cfg, dist)
    model = engine.module  # what forward passes call: under DeepSpeed the engine, whose hooks they need
    tracker = Tracker(run_dir, cfg.logger, steps, config=OmegaConf.to_container(cfg, resolve=True), main=dist.main)

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(model, reference, splits.eval, cfg, ids, device, autocast, dist,
                           share=stream.share_prompt, cache=cache)
        tracker.log_eval(step, metrics)
        return metrics

    state = TrainState(step=0, epoch=0, position=0)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine, dist)
        stream.epoch, stream.position = state.epoch, state.position
        tracker.resume_at(state.step)
        log.info("resumed from %s (step %d of %d)", checkpoint, state.step, steps)
        changed = config_changes(OmegaConf.load(checkpoint / "config.yaml"), cfg)
        if changed:  # allowed (e.g. more steps), but a resumed run then differs from an uninterrupted one
            log.warning("the config differs from the checkpoint's: %s", "; ".join(changed))
    elif t.resume == "auto":
        tracker.start_over()
    state.share_prompt = stream.share_prompt  # what the checkpoints of this run say it trains with

    if checkpoint is not None and state.step == steps:
        done = {k: v for k, v in tracker.logged(steps).items() if k.startswith("eval/")}
        if (run_dir / "final").is_dir() and (done or not splits.eval):
            # A finished run started again (a rerun sweep): nothing is recomputed or rewritten.
            log.info("already finished: step %d of %d, %s exists; nothing to do", steps, steps, run_dir / "final")
            tracker.close()
            return done

    read_to = (state.epoch, state.position)  # where the stream stands after the step last taken (prefetch aside)

    def checkpoint_now() -> None:
        state.epoch, state.position = read_to
        path = save_checkpoint(run_dir, state, engine, cfg, t.keep_last, dist, layout)
        log.info("checkpoint: %s", path)

    before = (run_eval(0) if splits.eval and t.eval_before else {}) if state.step == 0 else tracker.logged(0)
    signals = StopSignals(on_abort=lock.release, announce=dist.main)
    batches = iter(stream)
    ahead: list[tuple[list, tuple[int, int]]] = []  # steps read in advance: (this rank's micro-batches, stream place)

    def take_step() -> tuple[list, tuple[int, int]]:
        micro = [to_device(rows(b), device) for k, b in enumerate(next(batches) for _ in range(t.grad_accum * dist.world))
                 if k % dist.world == dist.rank]
        return micro, (stream.epoch, stream.position)

    def sample_window(step: int, window: list[tuple[list, tuple[int, int]]]) -> float:
        """The anchors of every micro-batch of the window's steps in one generation: a step's micro-batches share
        the policy's weights, so this changes no anchor (each row draws on its own, anchors.RowSeededDraw), and
        takes one generation per window instead of one per micro-batch. Each micro-batch samples with the seed its
        loss would use, and in the precision of its forwards (bf16 autocast where the loss has it), as the loss
        samples when it gets no anchors. Returns this rank's seconds (perf/anchor_s); under refresh_every=auto,
        the probe's generations are timed here."""
        began = time.perf_counter()
        seeds = [micro_seed(step_seed(cfg, step + k, dist.world), j, dist)
                 for k, (micro, _) in enumerate(window) for j in range(len(micro))]
        with autocast():
            attach_anchors([b for micro, _ in window for b in micro], model, cfg.loss.anchor, pad_id=ids.pad,
                           eos_id=ids.eos, max_length=ids.max_length, seeds=seeds)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the samples are done, not only queued (HF's loop syncs every token)
        took = time.perf_counter() - began
        if cfg.loss.anchor.refresh_every != "auto" or state.anchor_window is not None:
            return took
        seconds = dist.sum([took])[0] / dist.world  # every rank picks alike
        state.anchor_window = record(cfg.loss, state.anchor_timings, step, len(window), seconds)
        if state.anchor_window is not None:
            log.info("loss.anchor.refresh_every=auto: windows of %d steps from step %d (sampling one step's anchors "
                     "took %.3f s, two steps' at once %.3f s; loss.anchor.max_age=%d)", state.anchor_window,
                     PROBE_END + 1, state.anchor_timings["one"], state.anchor_timings["two"],
                     cfg.loss.anchor.max_age)
        return took

    try:
        while state.step < steps:
            step = state.step + 1
            started = time.perf_counter()
            seed = step_seed(cfg, step, dist.world)
            sampling = 0.0  # seconds this step spent sampling anchors: a window's first step samples for all of it
            if not ahead:
                ahead = [take_step() for _ in range(window_size(cfg.loss, step, steps, state.anchor_window))]
                if uses_anchors(cfg.loss):
                    sampling = sample_window(step, ahead)
            micro_batches, read_to = ahead.pop(0)
            sums = accumulate_gradients(model, reference, micro_batches, cfg.loss, ids, seed=seed,
                                        autocast=autocast, engine=engine, dist=dist)
            metrics = dist.sum_metrics(sums).means()
            grad_norm, stepped = engine.step(math.isfinite(metrics["loss"]))
            if stepped:
                state.bad_steps = 0
            else:  # the update was skipped, the weights kept: one bad batch must not poison the run
                state.bad_steps += 1
                state.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped",
                            step, metrics["loss"], grad_norm)
                if state.bad_steps >= t.max_bad_steps:
                    newest = find_resume_checkpoint(run_dir, "auto")
                    raise UserError(
                        f"stopped at step {step}: {state.bad_steps} steps in a row had a non-finite loss or "
                        f"gradient (trainer.max_bad_steps={t.max_bad_steps}); last good checkpoint: "
                        f"{newest or 'none'}. Try a lower trainer.lr, trainer.max_grad_norm, or "
                        f"trainer.precision=fp32")
            state.step = step

            elapsed = time.perf_counter() - started
            pairs, tokens, sampling = dist.sum([sum(b["input_ids"].shape[0] // 2 for b in micro_batches),
                                                sum(int(b["attention_mask"].sum()) for b in micro_batches), sampling])
            tracker.log_train(step, {
                **metrics,
                "grad_norm": grad_norm,
                "lr": engine.lr,
                "epoch": read_to[0] + read_to[1] / (stream.batches_per_epoch * t.micro_batch_size),
                "train/skipped_steps": state.skipped_steps,
                "perf/samples_per_s": pairs / elapsed,
                "perf/tokens_per_s": tokens / elapsed,
                **({"perf/anchor_s": sampling / dist.world} if uses_anchors(cfg.loss) else {}),
                "perf/rss_mb": resident_mb(),
                **({"perf/peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}),
            })
            if splits.eval and t.eval_every and step % t.eval_every == 0 and step != steps:
                run_eval(step)
            if t.save_every and (step % t.save_every == 0 or step == steps):
                checkpoint_now()  # also the last step, so a finished run can be extended with more steps
            # Every rank must stop at the same step (a checkpoint is a collective): stop when any got the signal.
            stop = dist.max(signals.received or 0)
            if stop and step != steps:
                checkpoint_now()
                if stop == signal.SIGINT:
                    log.info("Ctrl-C: checkpoint saved at step %d; the same command resumes from it (exit code %d)",
                             step, INTERRUPTED_EXIT_CODE)
                    raise SystemExit(INTERRUPTED_EXIT_CODE)
                log.info("received %s: checkpoint saved at step %d; exiting with code %d so the job is "
                         "requeued; the next start resumes", signal.Signals(stop).name, step,
                         PREEMPTED_EXIT_CODE)
                raise SystemExit(PREEMPTED_EXIT_CODE)

        after = run_eval(steps) if splits.eval else {}
    finally:
        signals.restore()
        tracker.close()
    if t.save_final:
        save_final(engine, policy, peft_model, tokenizer, cfg, run_dir, dist)
    if dist.main:
        _summary(cfg, run_dir, before, after)
    return after


def save_final(engine, policy, peft_model, tokenizer, cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    """`final/` (a plain HF model; LoRA merged) and, for LoRA, `adapter/`; written by rank 0. Under ZeRO-3
    the weights are first gathered from every rank's partitions."""
    state_dict = engine.full_state_dict()  # a collective under ZeRO-3: every rank takes part
    if dist.main:
        if peft_model is not None:
            if cfg.model.name_or_path is None:  # so PeftModel.from_pretrained finds the random-init base
                peft_model.peft_config["default"].base_model_name_or_path = str((run_dir / "reference").resolve())
            save_hf_model(peft_model, tokenizer, run_dir / "adapter")  # the PEFT adapter alone
            policy = peft_model.merge_and_unload()  # final/ is a plain HF model: adapter merged into the base
        save_hf_model(policy, tokenizer, run_dir / "final", state_dict=state_dict)
    dist.barrier()


def check_unpaired(cfg: DictConfig) -> None:
    """Unpaired data (prompt / completion / label rows) trains KTO alone, without TI-DPO's parts."""
    loss = cfg.loss
    if loss.name != "kto":
        raise DataError(f"the data is unpaired (prompt, completion and label rows: data.format=unpaired), which "
                        f"loss=kto trains; loss={loss.name} needs preference pairs (prompt, chosen, rejected)")
    if loss.gamma or loss.importance.mode != "none":
        raise DataError("loss=kto on unpaired data takes no token weights or triplet term (they need pairs): set "
                        "loss.importance.mode=none loss.gamma=0, or train on pairs")


def resident_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _summary(cfg: DictConfig, run_dir: Path, before: dict[str, float], after: dict[str, float]) -> None:
    lines = ["", "done."]
    key = "eval/rewards/accuracies" if cfg.loss.name != "sft" else "eval/loss"
    if key in after:
        start = f"{before[key]:.3f} -> " if key in before else ""
        lines.append(f"held-out {key.removeprefix('eval/')}: {start}{after[key]:.3f}")
    lines.append(f"run dir: {run_dir}")
    if cfg.trainer.save_final:
        lines.append("load the model: AutoModelForCausalLM.from_pretrained"
                     f"(\"{run_dir / 'final'}\") (and AutoTokenizer the same way)")
    log.info("\n".join(lines))
