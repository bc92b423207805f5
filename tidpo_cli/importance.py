"""Token importance weights (TI-DPO, METHOD.md §1): gradient saliency, a Gaussian prior, mixed.

The saliency pass is its own backward pass, run before the loss forward: it asks autograd for the
gradient with respect to the input embeddings only (`torch.autograd.grad`), so no parameter `.grad`,
optimizer state or accumulated gradient is touched. What is differentiated (the target, `TARGETS`) and how
a token's gradient becomes its raw importance (the attribution, `ATTRIBUTIONS`) are small functions of
tensors, picked by name (`loss.importance.target`, `loss.importance.attribution`); the mixing is pure tensor
maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at each row's last True position of `mask` only (no position in a row without one)."""
    mask = mask.bool()
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0], device=mask.device), last_positions(mask)] = True
    return last & mask


# ------------------------------------------------------------------------------ saliency targets
# Each target gives one scalar per row, [N]; the saliency differentiates their sum. Rows do not interact in a
# causal LM (a packed batch's responses are masked from each other), so the gradient of the sum with respect
# to a row's response embeddings is the gradient of that row's own term. `sides` is +1 on a chosen row and
# -1 on a rejected row (the collated order: chosen rows, then rejected rows).

def last_max_logit(last_logits: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 5: max_v logits[last, v], the largest logit at each row's last position. `last_logits` [N, V]
    are the logits at those positions; `sides` is not read."""
    return last_logits.float().max(dim=-1).values


def sequence_logp(label_logps: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """log p(y | x) = sum_t log p(y_t | x, y_<t), each row's log-likelihood of its own response. `label_logps`
    [N, T] are the label log-probs at the response tokens, 0 elsewhere; `sides` is not read."""
    return label_logps.sum(dim=-1)


def pair_margin(label_logps: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """Each row's term of its pair's log p(y_w | x) - log p(y_l | x): + log p(y | x) on a chosen row, - log p(y | x)
    on a rejected row. Summed over a pair's two rows it is the pair's difference, so one backward gives every row
    the gradient of that difference with respect to its embeddings."""
    return sides.to(label_logps.dtype) * sequence_logp(label_logps, sides)


@dataclass(frozen=True)
class Target:
    reads: str  # "last_logits": the logits at each row's last position [N, V]; "label_logps": [N, T] (see above)
    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (what it reads, sides [N]) -> [N]


TARGETS = {
    "last_max_logit": Target("last_logits", last_max_logit),  # the paper's (Eq. 5)
    "sequence_logp": Target("label_logps", sequence_logp),
    "margin": Target("label_logps", pair_margin),
}


# ------------------------------------------------------------------------------ attributions
# (gradient of the target with respect to the input embeddings [.., H], those embeddings [.., H]) -> [..] float32.

def grad_l1(grad: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 6: || d target / d e_i ||_1, the L1 norm over the hidden size of the embedding's gradient."""
    return grad.float().abs().sum(dim=-1)


def grad_x_input(grad: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """|| (d target / d e_i) * e_i ||_1: the L1 norm of the gradient times the embedding, elementwise."""
    return (grad.float() * embeds.float()).abs().sum(dim=-1)


ATTRIBUTIONS = {"grad_l1": grad_l1, "grad_x_input": grad_x_input}


def gradient_saliency(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      position_ids: torch.Tensor | None = None,
                      targets: tuple[torch.Tensor, torch.Tensor] | None = None,
                      target_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      attribution: str = "grad_l1") -> torch.Tensor:
    """Raw importance of every position, [B, T] float32: `ATTRIBUTIONS[attribution](g, e)` with `e` the input
    embeddings and `g` the gradient with respect to them of the summed per-row targets. By default (`grad_l1`
    of `last_max_logit`) I_i = || d max_v logits[last, v] / d e_i ||_1.

    The model runs with dropout off (its train/eval mode is restored afterwards). `target_values(hidden)` gives
    the per-row targets [N] from the final hidden states [B, T, H] (what the output layer takes); without it the
    target is `last_max_logit` at `targets` (rows, positions), default each row's last attended position. A
    packed batch (packing.py) passes its 4-D mask and position ids.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            hidden = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
            if target_values is None:
                if targets is None:
                    targets = torch.arange(input_ids.shape[0], device=input_ids.device), last_positions(attention_mask)
                # Only the target positions' logits are needed: [N, V] instead of [B, T, V].
                values = last_max_logit(model.get_output_embeddings()(hidden[targets]), None)
            else:
                values = target_values(hidden)
            (grad,) = torch.autograd.grad(values.sum(), embeds)
    finally:
        model.train(was_training)
    return ATTRIBUTIONS[attribution](grad, embeds.detach()).detach()


def saliency_from_forward(embeds: torch.Tensor, target_values: torch.Tensor,
                          attribution: str = "grad_l1") -> torch.Tensor:
    """The raw importance of `gradient_saliency`, taken from a forward the loss runs anyway: `target_values` [N]
    are the per-row targets (`TARGETS`) of that forward, computed from `embeds`, the input embeddings, inside the
    graph. No second forward; the graph is kept for the loss's backward. Equal to `gradient_saliency` when nothing
    random (dropout) ran in that forward."""
    (grad,) = torch.autograd.grad(target_values.sum(), embeds, retain_graph=True)
    return ATTRIBUTIONS[attribution](grad, embeds.detach()).detach()


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
                prior: str = "gaussian", normalize: str = "sum", exclude_last: bool = False) -> Importance:
    """Weights from raw importance [B, T]: normalise over the span, mix with the prior, mean 1 per span.

    W = lam * I_norm + (1 - lam) * P, renormalised to sum 1, times n (span length) so the weights average 1
    over the span and beta keeps its DPO meaning. `prior="none"` uses I_norm alone (lam = 1).
    `normalize="softmax"` uses softmax(I) over the span instead of I / sum(I) (the paper's ablation).
    Fallbacks: a row whose saliency sums to 0 uses the prior alone; a row with <= 1 span token gets 1.

    `exclude_last`: the span's last token (a response's last token) weighs exactly 1 and is left out of
    everything else: the other n - 1 span tokens are normalised, mixed (their prior spans those n - 1 tokens)
    and scaled to mean 1 among themselves, so the whole span still sums to n. A row whose span has <= 2 tokens
    then gets all 1 (counted as a fallback).
    """
    if exclude_last:
        last = last_token(span_mask)
        rest = mix_weights(raw, span_mask.bool() & ~last, lam=lam, sigma_div=sigma_div, prior=prior,
                           normalize=normalize)
        return Importance((rest.weights + last.float()).detach(), rest.fallbacks)
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
                    prior: str = "gaussian", normalize: str = "sum", exclude_last: bool = False,
                    generator: torch.Generator | None = None) -> Importance:
    """Weights for every row of a batch. mode: `gradient` (saliency), `uniform` (all 1: plain DPO's
    weighting), `random` (uniform random raw importance, then the same normalising and mixing). The gradient
    here is `gradient_saliency`'s default: `grad_l1` of `last_max_logit`."""
    if mode == "uniform":
        return Importance(span_mask.float(), 0)
    if mode == "gradient":
        raw = gradient_saliency(model, input_ids, attention_mask)
    elif mode == "random":
        raw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mix_weights(raw, span_mask, lam=lam, sigma_div=sigma_div, prior=prior, normalize=normalize,
                       exclude_last=exclude_last)


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


def weight_shares(weights: torch.Tensor, span_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B]: each row's share of its weight on `positions` [B, T] bool: sum of W over the span positions that are
    in `positions` / sum of W over the span (0 for a row whose span weighs nothing)."""
    span = span_mask.bool()
    w = weights.float() * span
    total = w.sum(dim=1)
    on = (w * positions.bool()).sum(dim=1)
    return torch.where(total > 0, on / total.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(total))
