"""Loss functions as pure tensor maths: they know nothing of models, data files or optimisers.

Shapes: B pairs, N = 2B rows (chosen rows first), T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities of the labels, aligned with the labels.

    logits [N, T, V] (position t predicts token t+1), labels [N, T] with IGNORE_INDEX on prompt and
    padding -> [N, T]: entry t is log p(labels[t] | tokens < t), 0 where labels[t] is ignored (and at
    t = 0, which nothing predicts). The log-softmax runs in fp32 for half-precision logits (float64 stays).
    """
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    picked = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logps = (picked - shifted.logsumexp(-1)) * mask
    return F.pad(logps, (1, 0))


def indexed_token_logps(logits: torch.Tensor, where: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`token_logps` from logits [P, V] of any P positions: label t + 1 of row n is predicted at position
    `where[n, t]` ([N, T - 1]; read, then masked, where no label is) -> [N, T]. The log-softmax runs in fp32 for
    half-precision logits; one log-sum-exp per position, one gathered logit per label."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits[where, targets.masked_fill(~mask, 0)]
    logps = (picked - logits.logsumexp(-1)[where]) * mask
    return F.pad(logps, (1, 0))


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """[N, T] bool: the tokens whose log-probs count (response tokens, not prompt or padding)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False  # nothing predicts the first token
    return mask


def sigmoid_preference_loss(z: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta * z) per example [B], z = how much more the chosen response gained than the
    rejected one; with label_smoothing = eps the label is taken as flipped with probability eps (cDPO)."""
    logits = beta * z
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al. 2023, Eq. 7), with conservative-DPO label smoothing.

    Inputs are per-sequence summed log-probs [B]. Returns per-example losses [B] and the detached
    implicit rewards beta * (policy - reference) log-ratio of chosen [B] and rejected [B].
    """
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    losses = sigmoid_preference_loss(chosen_ratio - rejected_ratio, beta, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def tdpo_loss(
    chosen_margin: torch.Tensor,
    rejected_margin: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO2 on (weighted) log-ratio sums M(y) [B] and sequential KLs K(y) [B] (METHOD §2).

    z = (M(y_w) - M(y_l)) - alpha * (K(y_l) - sg[K(y_w)]), loss = -log sigmoid(beta * z). The chosen KL
    carries no gradient (stop-gradient). With alpha = 0 this is DPO on the margins: the paper's weighted
    preference term. Returns per-example losses [B] and detached rewards beta * M(y) for chosen and rejected.
    """
    z = chosen_margin - rejected_margin
    if alpha:
        z = z - alpha * (rejected_kl - chosen_kl.detach())
    losses = sigmoid_preference_loss(z, beta, label_smoothing)
    return losses, beta * chosen_margin.detach(), beta * rejected_margin.detach()


def ipo_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): (chosen_ratio - rejected_ratio - 1 / (2 beta))^2 per example [B].

    Pass token-averaged log-ratios, as IPO's authors and TRL's `loss_type="ipo"` do.
    """
    return (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2


def token_kl(reference_logits: torch.Tensor, policy_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref(. | y_<t) || pi_theta(. | y_<t)) over the full vocabulary, aligned with the labels like
    `token_logps`: [N, T], 0 where labels[t] is ignored. Gradients flow into `policy_logits` only."""
    kl = position_kl(reference_logits[:, :-1], policy_logits[:, :-1]) * (labels[:, 1:] != IGNORE_INDEX)
    return F.pad(kl, (1, 0))


def position_kl(reference_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(policy)) over the last (vocabulary) dimension, at every position [...]; the
    log-softmax in fp32 for half-precision logits. Gradients flow into `policy_logits` only."""
    ref = F.log_softmax(_at_least_fp32(reference_logits.detach()), dim=-1)
    pol = F.log_softmax(_at_least_fp32(policy_logits), dim=-1)
    return (ref.exp() * (ref - pol)).sum(-1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def left_align(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each row's masked entries to the left, in order: [N, T] -> ([N, L], bool mask [N, L]),
    L = the longest row's count. Differentiable (a gather)."""
    mask = mask.bool()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    length = int(mask.sum(dim=1).max()) if mask.numel() else 0
    order = order[:, :length]
    return values.gather(1, order), mask.gather(1, order)


def triplet_loss(
    anchor: torch.Tensor,
    anchor_mask: torch.Tensor,
    chosen: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """TI-DPO's triplet term (METHOD §3): mean over the batch of
    max(0, sum_t (d_t - b_t)^2 - sum_t (d_t - c_t)^2 + margin).

    Per-token log-ratios [B, L*] left-aligned at the response start with bool masks; each distance sums
    over the positions both of its two responses have (index-aligned overlap). Gradients flow into all three.
    """
    return triplet_terms(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, margin)["loss"].mean()


def triplet_terms(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, margin) -> dict[str, torch.Tensor]:
    """Per-example pieces of `triplet_loss`: `loss`, `dist_pos`, `dist_neg` [B]."""
    dist_pos = _overlap_sq_distance(anchor, anchor_mask, chosen, chosen_mask)
    dist_neg = _overlap_sq_distance(anchor, anchor_mask, rejected, rejected_mask)
    return {"loss": F.relu(dist_pos - dist_neg + margin), "dist_pos": dist_pos, "dist_neg": dist_neg}


def _overlap_sq_distance(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor) -> torch.Tensor:
    length = min(a.shape[1], b.shape[1])
    both = a_mask[:, :length].bool() & b_mask[:, :length].bool()
    return (((a[:, :length] - b[:, :length]) ** 2) * both).sum(dim=1)


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the masked tokens: logps, mask [N, T] -> scalar.

    A sum, not a mean: the caller divides by the token count of the whole optimizer step, so that
    gradient accumulation gives the same update as one large batch.
    """
    return -(logps * mask).sum()


# --- TRL's DPO loss family (trl 1.16 DPOConfig.loss_type), each a function of one pair's sequence scores --------------

@dataclass(frozen=True)
class PairScores:
    """What a pairwise loss reads, [B] each: the (token-weighted) summed log-probs of the chosen and rejected
    responses under the policy and the reference (0 for a reference-free loss), their token counts, `delta` (the
    chosen log-ratio minus the rejected one, less TDPO's KL term when there is one) and `nll` (the chosen
    responses' mean next-token NLL, one value expanded to [B]); `kto_kl` (a scalar) KTO's reference point."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    delta: torch.Tensor
    nll: torch.Tensor | None = None
    kto_kl: torch.Tensor | None = None

    @property
    def chosen_ratio(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_ratio(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected


def _sigmoid(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    return sigmoid_preference_loss(s.delta, beta, eps)


def _hinge(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """SLiC (Zhao et al. 2023): max(0, 1 - beta * delta)."""
    return F.relu(1 - beta * s.delta)


def _ipo(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """IPO (Azar et al. 2023) on token-averaged log-ratios."""
    return ipo_loss(s.chosen_ratio / s.chosen_len.clamp(min=1), s.rejected_ratio / s.rejected_len.clamp(min=1), beta)


def _exo_pair(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, Eq. 16): KL(softmax(beta * ratios) || [1 - eps, eps]) over the pair; eps > 0."""
    z = beta * s.delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _nca_pair(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """NCA (Chen et al. 2024), pairwise."""
    c, r = beta * s.chosen_ratio, beta * s.rejected_ratio
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _robust(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label noise eps < 0.5."""
    z = beta * s.delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """BCO (Jung et al. 2024), pairwise, as TRL 1.16 (no running reward baseline)."""
    return -F.logsigmoid(beta * s.chosen_ratio) - F.logsigmoid(-beta * s.rejected_ratio)


def _sppo_hard(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024) with hard win probabilities (1 for the chosen, 0 for the rejected)."""
    return (s.chosen_ratio - 0.5 / beta) ** 2 + (s.rejected_ratio + 0.5 / beta) ** 2


def _aot(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: the batch's sorted policy log-odds against the sorted reference ones.
    Couples the examples of one micro-batch (as TRL: of one device's batch)."""
    delta = torch.sort(s.chosen - s.rejected).values - torch.sort(s.ref_chosen - s.ref_rejected).values
    return sigmoid_preference_loss(delta, beta, eps)


def _aot_unpaired(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """AOT, unpaired: the batch's sorted chosen log-ratios against its sorted rejected ones."""
    delta = torch.sort(s.chosen_ratio).values - torch.sort(s.rejected_ratio).values
    return sigmoid_preference_loss(delta, beta, eps)


def _apo_zero(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise the chosen likelihood, lower the rejected."""
    return 1 - torch.sigmoid(beta * s.chosen_ratio) + torch.sigmoid(beta * s.rejected_ratio)


def _apo_down(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """APO-down (Eq. 8): lower both, the rejected more."""
    return torch.sigmoid(beta * s.chosen_ratio) + 1 - torch.sigmoid(beta * (s.chosen_ratio - s.rejected_ratio))


def _discopop(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, Eq. 5): logistic and exponential losses blended by sigmoid(z / tau)."""
    z = beta * s.delta
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft_term(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """The chosen responses' mean NLL (the same value for every pair)."""
    return s.nll


def _sigmoid_norm(s: PairScores, beta: float, eps: float, tau: float) -> torch.Tensor:
    """The sigmoid loss on token-averaged log-ratios."""
    return -F.logsigmoid(beta * (s.chosen_ratio / s.chosen_len.clamp(min=1)
                                 - s.rejected_ratio / s.rejected_len.clamp(min=1)))


# name -> per-pair loss [B]; `delta` carries TDPO's KL term, which only `sigmoid` accepts (config.py says so).
PAIR_LOSSES = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft_term,
    "sigmoid_norm": _sigmoid_norm,
}
# The types whose formula reads loss.label_smoothing.
SMOOTHED = ("sigmoid", "exo_pair", "robust", "aot", "aot_unpaired")


def pair_loss(s: PairScores, types: list[str], weights: list[float], beta: float, label_smoothing: float = 0.0,
              discopop_tau: float = 0.05) -> torch.Tensor:
    """sum_k weights[k] * PAIR_LOSSES[types[k]] per pair [B] (TRL's loss_type list with loss_weights)."""
    total = 0.0
    for name, weight in zip(types, weights, strict=True):
        total = total + weight * PAIR_LOSSES[name](s, beta, label_smoothing, discopop_tau)
    return total


# --- reference-free and unpaired losses -----------------------------------------------------------------------------

def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6) per pair [B]: -log sigmoid(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma),
    from token-averaged policy log-probs [B]; gamma in reward units, as TRL's `simpo_gamma`."""
    return sigmoid_preference_loss(chosen_avg - rejected_avg - gamma / beta, beta, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: switch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """ORPO (Hong et al. 2024, Eq. 4-6): log odds(y_w) - log odds(y_l) per pair [B], odds(y) = P / (1 - P) with P
    the token-averaged probability exp(avg log pi(y))."""
    return (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))


def kto_losses(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7-8): per desirable example [Bd] w_d * (1 - sigmoid(beta * (r - z0))) and per
    undesirable example [Bu] w_u * (1 - sigmoid(beta * (z0 - r))), r the summed log-ratio, z0 = `kl` the (detached)
    reference point: the batch's mismatched-pair KL estimate, at least 0."""
    return (desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_ratio))))


def mean_nll(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean next-token NLL over the masked tokens (CPO's, ORPO's and TPO's NLL term; TRL's `sft` type):
    logps, mask [N, T] -> scalar."""
    return -(logps * mask).sum() / mask.sum().clamp(min=1)
