"""Token importance weights (TI-DPO, METHOD.md §1): gradient saliency, a Gaussian prior, mixed.

The saliency pass is its own backward pass, run before the loss forward: it asks autograd for the
gradient with respect to the input embeddings only (`torch.autograd.grad`), so no parameter `.grad`,
optimizer state or accumulated gradient is touched. The mixing is pure tensor maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("gradient", "uniform", "random")
PRIORS = ("gaussian", "none")
NORMALIZE = ("sum", "softmax")


@dataclass
class Importance:
    weights: torch.Tensor  # [B, T] float32, detached: 0 outside the span, mean 1 over each row's span
    fallbacks: int         # rows that fell back (zero saliency: prior only; span of <= 1 token: all ones)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last attended position (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def gradient_saliency(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      position_ids: torch.Tensor | None = None,
                      targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Raw importance I_i = || d max_v logits[last, v] / d e_i ||_1 for every position: [B, T] float32.

    The model runs with dropout off (its train/eval mode is restored afterwards). Rows do not interact
    in a causal LM, so the gradient of the summed targets gives every row its own gradient. `targets`
    (rows, positions) names the positions whose max logit is taken (default: each row's last attended
    position); a packed batch (packing.py) passes its 4-D mask, position ids and targets.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            hidden = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
            if targets is None:
                targets = torch.arange(input_ids.shape[0], device=input_ids.device), last_positions(attention_mask)
            # Only the target positions' logits are needed: [N, V] instead of [B, T, V].
            target = model.get_output_embeddings()(hidden[targets]).float().max(dim=-1).values.sum()
            (grad,) = torch.autograd.grad(target, embeds)
    finally:
        model.train(was_training)
    return grad.float().abs().sum(dim=-1).detach()


def saliency_from_forward(embeds: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The raw importance of `gradient_saliency`, taken from a forward the loss runs anyway: `target_logits` [N, V]
    are the target positions' logits of that forward, computed from `embeds`, the input embeddings, inside the
    graph. No second forward; the graph is kept for the loss's backward. Equal to `gradient_saliency` when nothing
    random (dropout) ran in that forward."""
    target = target_logits.float().max(dim=-1).values.sum()
    (grad,) = torch.autograd.grad(target, embeds, retain_graph=True)
    return grad.float().abs().sum(dim=-1).detach()


def dropout_active(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` in its current mode would drop anything (dropout layers, attention dropout)."""
    if not model.training:
        return False
    if float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def gaussian_prior(span_mask: torch.Tensor, sigma_div: float) -> torch.Tensor:
    """P(t) = exp(-((t - mu) / sigma)^2 / 2) over each row's span, mu = (n-1)/2, sigma = n / sigma_div,
    normalised to sum 1 per row: [B, T] float32, 0 outside the span (t counts span tokens only)."""
    span = span_mask.bool()
    n = span.sum(dim=1, keepdim=True).clamp(min=1).float()
    t = (span.cumsum(dim=1) - 1).float()
    mu, sigma = (n - 1) / 2, n / sigma_div
    prior = torch.exp(-0.5 * ((t - mu) / sigma) ** 2) * span
    return prior / prior.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def mix_weights(raw: torch.Tensor, span_mask: torch.Tensor, *, lam: float, sigma_div: float,
                prior: str = "gaussian", normalize: str = "sum") -> Importance:
    """Weights from raw importance [B, T]: normalise over the span, mix with the prior, mean 1 per span.

    W = lam * I_norm + (1 - lam) * P, renormalised to sum 1, times n (span length) so the weights average 1
    over the span and beta keeps its DPO meaning. `prior="none"` uses I_norm alone (lam = 1).
    `normalize="softmax"` uses softmax(I) over the span instead of I / sum(I) (the paper's ablation).
    Fallbacks: a row whose saliency sums to 0 uses the prior alone; a row with <= 1 span token gets 1.
    """
    span = span_mask.bool()
    raw = raw.float() * span
    n = span.sum(dim=1, keepdim=True)
    if normalize == "sum":
        total = raw.sum(dim=1, keepdim=True)
        zero_saliency = (total <= 0).squeeze(1)
        importance = raw / total.clamp(min=torch.finfo(torch.float32).tiny)
    elif normalize == "softmax":
        zero_saliency = torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)
        importance = torch.softmax(raw.masked_fill(~span, float("-inf")), dim=1).nan_to_num(0.0) * span
    else:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")

    if prior == "gaussian":
        p = gaussian_prior(span, sigma_div)
        mixed = lam * importance + (1 - lam) * p
        mixed = torch.where(zero_saliency.unsqueeze(1), p, mixed)
    elif prior == "none":
        mixed = torch.where(zero_saliency.unsqueeze(1), span.float(), importance)
    else:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")

    weights = mixed / mixed.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) * n
    short = (n <= 1).squeeze(1)
    weights = torch.where(short.unsqueeze(1), span.float(), weights)
    fallbacks = int((short | (zero_saliency & (n.squeeze(1) > 1))).sum())
    return Importance(weights.detach(), fallbacks)


def importance_pass(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    span_mask: torch.Tensor, *, mode: str = "gradient", lam: float = 0.7, sigma_div: float = 4.0,
                    prior: str = "gaussian", normalize: str = "sum",
                    generator: torch.Generator | None = None) -> Importance:
    """Weights for every row of a batch. mode: `gradient` (saliency), `uniform` (all 1: plain DPO's
    weighting), `random` (uniform random raw importance, then the same normalising and mixing)."""
    if mode == "uniform":
        return Importance(span_mask.float(), 0)
    if mode == "gradient":
        raw = gradient_saliency(model, input_ids, attention_mask)
    elif mode == "random":
        raw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mix_weights(raw, span_mask, lam=lam, sigma_div=sigma_div, prior=prior, normalize=normalize)


def token_importance(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     span_mask: torch.Tensor, *, lam: float = 0.7, sigma_div: float = 4.0) -> torch.Tensor:
    """Gradient token importance mixed with the Gaussian prior (METHOD §1): float32 [B, T], 0 outside
    `span_mask`, mean 1 over each row's span. The target is the max logit at each row's last
    `attention_mask` position."""
    return importance_pass(model, input_ids, attention_mask, span_mask, lam=lam, sigma_div=sigma_div).weights


def weight_stats(weights: torch.Tensor, span_mask: torch.Tensor) -> dict[str, float]:
    """Sums over rows of `importance/entropy` (nats, of weights / n over the span) and `importance/max`."""
    span = span_mask.bool()
    n = span.sum(dim=1, keepdim=True).clamp(min=1)
    p = (weights / n) * span
    entropy = -(p * p.clamp(min=1e-30).log()).sum(dim=1)
    return {"importance/entropy": float(entropy.sum()), "importance/max": float(weights.max(dim=1).values.sum())}
