"""Loss functions as pure tensor maths: they know nothing of models, data files or optimisers.

Shapes: B pairs, N = 2B rows (chosen rows first), T tokens, V vocabulary.
"""

from __future__ import annotations

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
    ref = F.log_softmax(_at_least_fp32(reference_logits[:, :-1]), dim=-1)
    pol = F.log_softmax(_at_least_fp32(policy_logits[:, :-1]), dim=-1)
    kl = (ref.exp() * (ref - pol)).sum(-1) * (labels[:, 1:] != IGNORE_INDEX)
    return F.pad(kl, (1, 0))


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
