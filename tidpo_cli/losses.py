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
    With label_smoothing = eps the label is taken as flipped with probability eps.
    """
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the masked tokens: logps, mask [N, T] -> scalar.

    A sum, not a mean: the caller divides by the token count of the whole optimizer step, so that
    gradient accumulation gives the same update as one large batch.
    """
    return -(logps * mask).sum()
