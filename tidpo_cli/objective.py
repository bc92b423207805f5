"""What one micro-batch costs: importance pass -> policy forward -> reference forward -> anchor -> loss.

The maths is in losses.py and importance.py; this module only wires models and batches to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from .anchors import anchor_batch, attached_anchors, uses_anchors, with_anchors
from .distributed import extra_backward
from .importance import (dropout_active, gradient_saliency, importance_pass, last_positions, mix_weights,
                         saliency_from_forward, weight_stats)
from .losses import ipo_loss, left_align, response_mask, sft_loss, tdpo_loss, token_kl, token_logps, triplet_terms
from .packing import is_packed, last_positions_packed, model_inputs, packed_token_logps, unpack
from .tracking import MetricSums

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TokenIds:
    """What the objective needs of the tokenizer and data config (anchors are generated and padded)."""
    pad: int
    eos: int
    max_length: int


def forward(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over every row -> (logits, per-token log-probs [N, T], response mask [N, T]).

    The logits are [N, T, V], or for a packed batch (packing.py: one row per pair, the prompt once) the packed
    rows' [B, S, V]; `unpacked` gives the [N, T, V] view where a loss needs whole distributions.
    """
    return _forward(model, batch, embeds=None)[:3]


def forward_from_embeddings(model: torch.nn.Module, batch: Batch):
    """`forward`, run from the input embeddings so the graph holds them: (logits, log-probs, mask, embeddings,
    final hidden states [rows, positions, hidden]: what the output layer was given, for `saliency_targets`)."""
    ids = batch["packed_ids"] if is_packed(batch) else batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if not embeds.requires_grad:  # frozen embeddings (LoRA): the saliency still needs the gradient to them
        embeds = embeds.detach().requires_grad_(True)
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        return (*_forward(model, batch, embeds=embeds), seen[-1])
    finally:
        hook.remove()


def _forward(model, batch: Batch, embeds):
    if is_packed(batch):
        inputs = {"input_ids": batch["packed_ids"]} if embeds is None else {"inputs_embeds": embeds}
        logits = model(**inputs, **model_inputs(model, batch), use_cache=False).logits
        logps = packed_token_logps(logits, batch)
    else:
        inputs = {"input_ids": batch["input_ids"]} if embeds is None else {"inputs_embeds": embeds}
        logits = model(**inputs, attention_mask=batch["attention_mask"], use_cache=False).logits
        logps = token_logps(logits, batch["labels"])
    return logits, logps, response_mask(batch["labels"]), embeds


def fused_pass(policy, imp: DictConfig) -> bool:
    """Whether the saliency comes from the loss's own forward (`loss.importance.grad_pass`: `fused`, or `auto`);
    only while gradients are on (not in evaluation) and no dropout is active, where it gives exactly the separate
    pass's weights."""
    if imp.mode != "gradient" or not torch.is_grad_enabled() or dropout_active(policy):
        return False
    return imp.grad_pass in ("fused", "auto")


def unpacked(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-position values of a forward (logits [.., V], saliency) in the [N, T, ...] layout of the rows, whatever
    the batch layout (a packed batch's are gathered: a copy)."""
    return unpack(values, batch) if is_packed(batch) else values


def saliency_targets(model, hidden: torch.Tensor, batch: Batch, rows: slice) -> torch.Tensor:
    """[N, V]: the logits at the last token of the unpacked rows `rows`, the saliency target
    (importance.gradient_saliency), computed anew from the final hidden states of a forward.

    Not read off that forward's logits: a DeepSpeed engine hooks its forward's outputs, and any gradient through
    them (this one too) would start its training backward (gradient scaling, reduction). The output layer on these
    positions alone is what the separate pass computes as well."""
    if is_packed(batch):
        where = tuple(index[rows] for index in last_positions_packed(batch))
    else:
        where = (torch.arange(hidden.shape[0], device=hidden.device)[rows],
                 last_positions(batch["attention_mask"])[rows])
    return model.get_output_embeddings()(hidden[where])


def chosen_rows(batch: Batch) -> Batch:
    """The first half of a collated batch: the chosen responses (unpacked)."""
    half = batch["input_ids"].shape[0] // 2
    return {k: v[:half] for k, v in batch.items() if not k.startswith("packed_")}


def loss_items(batch: Batch, loss_name: str) -> int:
    """What one step's loss is averaged over: response tokens for SFT, pairs for preference losses."""
    if loss_name == "sft":
        return int(response_mask(chosen_rows(batch)["labels"]).sum())
    return batch["input_ids"].shape[0] // 2


def batch_loss(policy, reference, batch: Batch, loss_cfg: DictConfig, ids: TokenIds, *, seed: int,
               with_anchor: bool = True) -> tuple[torch.Tensor, MetricSums]:
    """The loss of one micro-batch summed over its items (see `loss_items`), and its metric sums.

    `seed` drives the random parts (anchor sampling, random importance) so a step can be replayed.
    `with_anchor=False` leaves the triplet term out (evaluation: no sampling on held-out data).
    """
    if loss_cfg.name == "sft":
        return _sft(policy, batch)
    metrics = MetricSums()
    half = batch["input_ids"].shape[0] // 2
    pairs = slice(0, 2 * half)  # the chosen and rejected rows; anchors, when sampled, follow as rows 2B..3B

    rows = batch
    anchored = uses_anchors(loss_cfg) and with_anchor
    if anchored:
        # Sampled before the loss's forward, from the same weights, so the anchors ride in that forward (after
        # their pair's prompt when it is shared) instead of forwards of their own.
        anchors = attached_anchors(batch) or anchor_batch(batch, policy, loss_cfg.anchor, pad_id=ids.pad,
                                                          eos_id=ids.eos, max_length=ids.max_length, seed=seed)
        rows = with_anchors(batch, anchors, ids.pad)
    width = batch["input_ids"].shape[1]  # the pairs' own width; `rows` may be wider

    weights = forwarded = None
    if loss_cfg.name == "tidpo":
        span = response_mask(batch["labels"]) if loss_cfg.importance.span == "response" else batch["attention_mask"]
        imp = loss_cfg.importance
        if fused_pass(policy, imp):
            # The saliency from the loss's own forward: one forward fewer (exact without dropout). Not in
            # evaluation, whose forwards keep no graph.
            forwarded = forward_from_embeddings(policy, rows)
            with extra_backward(policy):  # the loss's backward follows through the same graph (ZeRO-3 counts it)
                raw = saliency_from_forward(forwarded[3], saliency_targets(policy, forwarded[4], rows, pairs))
            raw = unpacked(raw, rows)[pairs, :width]
            result = mix_weights(raw, span, lam=imp.lam, sigma_div=imp.sigma_div, prior=imp.prior,
                                 normalize=imp.normalize)
        elif imp.mode == "gradient" and is_packed(batch):
            raw = gradient_saliency(policy, batch["packed_ids"], **model_inputs(policy, batch),
                                    targets=last_positions_packed(batch))
            result = mix_weights(unpack(raw, batch), span, lam=imp.lam, sigma_div=imp.sigma_div, prior=imp.prior,
                                 normalize=imp.normalize)
        else:
            result = importance_pass(policy, batch["input_ids"], batch["attention_mask"], span, mode=imp.mode,
                                     lam=imp.lam, sigma_div=imp.sigma_div, prior=imp.prior,
                                     normalize=imp.normalize, generator=torch.Generator().manual_seed(seed))
        metrics.add(weight_stats(result.weights, span), count=2 * half)
        metrics.add_total("importance/fallbacks", result.fallbacks)
        weights = torch.nn.functional.pad(result.weights, (0, rows["input_ids"].shape[1] - width))

    logits, logps, mask = forwarded[:3] if forwarded is not None else forward(policy, rows)
    with torch.no_grad():
        ref_logits, ref_logps, _ = forward(reference, rows)
    ratios = (logps - ref_logps) * mask  # per-token log-ratios m_t [N, T]
    pair_ratios = ratios[pairs]
    margins = (pair_ratios * weights).sum(-1) if weights is not None else pair_ratios.sum(-1)  # M(y) [2B]
    pair_mask = mask[pairs]

    if loss_cfg.name == "ipo":
        per_token = margins / pair_mask.sum(-1).clamp(min=1)
        losses = ipo_loss(per_token[:half], per_token[half:], loss_cfg.beta)
        chosen_rewards, rejected_rewards = loss_cfg.beta * margins[:half].detach(), loss_cfg.beta * margins[half:].detach()
    else:
        alpha = loss_cfg.alpha if loss_cfg.name in ("tdpo", "tidpo") else 0.0
        kl = (token_kl(unpacked(ref_logits, rows)[pairs], unpacked(logits, rows)[pairs],
                       rows["labels"][pairs]).sum(-1) if alpha else torch.zeros_like(margins))
        losses, chosen_rewards, rejected_rewards = tdpo_loss(
            margins[:half], margins[half:], kl[:half], kl[half:], beta=loss_cfg.beta, alpha=alpha,
            label_smoothing=loss_cfg.label_smoothing)
        if alpha:
            metrics.add({"kl/chosen": kl[:half].sum().item(), "kl/rejected": kl[half:].sum().item()}, count=half)
    del ref_logits
    loss_sum = losses.sum()

    if anchored:
        d, d_mask = left_align(ratios[2 * half:], mask[2 * half:])
        b, b_mask = left_align(pair_ratios[:half], pair_mask[:half])
        c, c_mask = left_align(pair_ratios[half:], pair_mask[half:])
        terms = triplet_terms(d, d_mask, b, b_mask, c, c_mask, loss_cfg.triplet.margin)
        loss_sum = loss_sum + loss_cfg.gamma * terms["loss"].sum()
        metrics.add({
            "triplet/loss": terms["loss"].sum().item(),
            "triplet/dist_pos": terms["dist_pos"].sum().item(),
            "triplet/dist_neg": terms["dist_neg"].sum().item(),
            "triplet/active_frac": (terms["loss"] > 0).float().sum().item(),
            "anchor/length": float(mask[2 * half:].sum()),
        }, count=half)

    metrics.add({
        "loss": loss_sum.item(),
        "rewards/chosen": chosen_rewards.sum().item(),
        "rewards/rejected": rejected_rewards.sum().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
        "logps/chosen": (logps[:half] * mask[:half]).sum().item(),
        "logps/rejected": (logps[half:2 * half] * mask[half:2 * half]).sum().item(),
    }, count=half)
    return loss_sum, metrics


def _sft(policy, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
    metrics = MetricSums()
    _, logps, mask = forward(policy, chosen_rows(batch))
    loss_sum = sft_loss(logps, mask)
    metrics.add({"loss": loss_sum.item()}, count=int(mask.sum()))
    metrics.add({"logps/chosen": (logps * mask).sum().item()}, count=logps.shape[0])
    return loss_sum, metrics
