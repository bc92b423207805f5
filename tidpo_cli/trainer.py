"""The training loop. One optimizer step reads top to bottom in `train`; the maths is in losses.py."""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from transformers.utils import logging as hf_logging

from .checkpoint import save_hf_model
from .data.batches import BatchStream, eval_batches
from .data.splits import load_splits
from .losses import dpo_loss, response_mask, sft_loss, token_logps
from .modeling import frozen_copy, load_policy, load_tokenizer
from .schedule import build_optimizer, build_scheduler
from .tracking import MetricSums, Tracker

log = logging.getLogger("tidpo")

Batch = dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over every row of the batch -> (per-token log-probs [N, T], response mask [N, T])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_logps(logits, batch["labels"]), response_mask(batch["labels"])


def chosen_rows(batch: Batch) -> Batch:
    """The first half of a collated batch: the chosen responses."""
    half = batch["input_ids"].shape[0] // 2
    return {k: v[:half] for k, v in batch.items()}


def loss_items(batch: Batch, loss_name: str) -> int:
    """What one step's loss is averaged over: response tokens for SFT, pairs for preference losses."""
    if loss_name == "sft":
        return int(response_mask(chosen_rows(batch)["labels"]).sum())
    return batch["input_ids"].shape[0] // 2


def batch_loss(policy, reference, batch: Batch, loss_cfg: DictConfig) -> tuple[torch.Tensor, MetricSums]:
    """The loss of one micro-batch, summed over its items (see `loss_items`), and its metric sums."""
    metrics = MetricSums()
    if loss_cfg.name == "sft":
        logps, mask = sequence_logps(policy, chosen_rows(batch))
        loss_sum = sft_loss(logps, mask)
        metrics.add({"loss": loss_sum.item()}, count=int(mask.sum()))
        metrics.add({"logps/chosen": (logps * mask).sum().item()}, count=logps.shape[0])
        return loss_sum, metrics

    logps, mask = sequence_logps(policy, batch)
    policy_seq = (logps * mask).sum(-1)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, batch)
        ref_seq = (ref_logps * mask).sum(-1)
    half = policy_seq.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_seq[:half], policy_seq[half:], ref_seq[:half], ref_seq[half:],
        beta=loss_cfg.beta, label_smoothing=loss_cfg.label_smoothing,
    )
    metrics.add({
        "loss": losses.sum().item(),
        "rewards/chosen": chosen_rewards.sum().item(),
        "rewards/rejected": rejected_rewards.sum().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
        "logps/chosen": policy_seq[:half].sum().item(),
        "logps/rejected": policy_seq[half:].sum().item(),
    }, count=half)
    return losses.sum(), metrics


def accumulate_gradients(policy, reference, micro_batches: list[Batch], loss_cfg: DictConfig,
                         autocast=nullcontext) -> MetricSums:
    """Backward over the micro-batches of one optimizer step; returns their metric sums.

    Each micro-batch's summed loss is divided by the items of the whole step (not of the micro-batch),
    so the accumulated gradient is exactly that of one large batch, even when micro-batches hold
    different numbers of response tokens.
    """
    items = sum(loss_items(b, loss_cfg.name) for b in micro_batches)
    sums = MetricSums()
    for batch in micro_batches:
        with autocast():
            loss_sum, metrics = batch_loss(policy, reference, batch, loss_cfg)
        (loss_sum / items).backward()
        sums.merge(metrics)
    return sums


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(policy, reference, pairs, cfg: DictConfig, pad_id: int, device, autocast) -> dict[str, float]:
    """Metrics of the held-out pairs, averaged over all of them, with an `eval/` prefix."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    for batch in eval_batches(pairs, cfg.trainer.eval_batch_size, pad_id):
        with autocast():
            _, metrics = batch_loss(policy, reference, to_device(batch, device), cfg.loss)
        sums.merge(metrics)
    policy.train(was_training)
    return sums.means(prefix="eval/")


def total_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    return max(1, int(cfg.trainer.epochs * batches_per_epoch) // cfg.trainer.grad_accum)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Run the whole training job that `cfg` (validated) describes; write everything into `run_dir`."""
    t = cfg.trainer
    hf_logging.disable_progress_bar()  # our own progress display is the one the user reads
    seed_everything(cfg.seed)
    device = pick_device(t.device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t.precision == "bf16" else nullcontext

    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, seed=cfg.seed)  # data problems surface before a big model loads
    for name, report in splits.reports.items():
        log.info("data (%s): %s", name, report.summary())
        for line in report.first_skipped:
            log.info("  skipped %s", line)
    log.info("pairs: %d train, %d held out", len(splits.train), len(splits.eval))

    policy = load_policy(cfg.model, tokenizer).to(device)
    reference = None if cfg.loss.name == "sft" else frozen_copy(policy)
    if t.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    log.info("model: %s, %.2fM parameters, on %s", cfg.model.name_or_path or "tiny Llama (random init)",
             sum(p.numel() for p in policy.parameters()) / 1e6, device)

    stream = BatchStream(splits.train, t.micro_batch_size, tokenizer.pad_token_id, seed=cfg.seed,
                         shuffle=cfg.data.shuffle)
    steps = total_steps(cfg, stream.batches_per_epoch)
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, steps)
    tracker = Tracker(run_dir, cfg.logger, steps)

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(policy, reference, splits.eval, cfg, tokenizer.pad_token_id, device, autocast)
        tracker.log_eval(step, metrics)
        return metrics

    before = run_eval(0) if splits.eval and t.eval_before else {}
    batches = iter(stream)
    for step in range(1, steps + 1):
        started = time.perf_counter()
        micro_batches = [to_device(next(batches), device) for _ in range(t.grad_accum)]
        sums = accumulate_gradients(policy, reference, micro_batches, cfg.loss, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        pairs = sum(b["input_ids"].shape[0] // 2 for b in micro_batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        tracker.log_train(step, {
            **sums.means(),
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "epoch": stream.epoch + stream.position / (stream.batches_per_epoch * t.micro_batch_size),
            "perf/samples_per_s": pairs / elapsed,
            "perf/tokens_per_s": tokens / elapsed,
        })
        if splits.eval and t.eval_every and step % t.eval_every == 0 and step != steps:
            run_eval(step)

    after = run_eval(steps) if splits.eval else {}
    tracker.close()
    if t.save_final:
        save_hf_model(policy, tokenizer, run_dir / "final")
    _summary(cfg, run_dir, before, after)
    return after


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
