"""How diverse a model's samples are, as the TI-DPO paper's Table B9 measures it: Distinct-2 and Distinct-4 over
the samples, Self-BLEU among the samples of a prompt, and the policy's mean per-token entropy on its samples.
Pure functions over strings and logits; `tidpo eval --samples N` runs the model and reports them."""

from __future__ import annotations

import sacrebleu
import torch

DEFINITIONS = {
    "samples/distinct_2": "distinct word bigrams / all word bigrams, over all samples pooled (words: whitespace-split)",
    "samples/distinct_4": "distinct word 4-grams / all word 4-grams, over all samples pooled (words: whitespace-split)",
    "samples/self_bleu": "sacrebleu sentence BLEU (0-100; 13a tokens, exp smoothing) of each sample against the other "
                         "samples of its prompt, averaged over a prompt's samples, then over prompts",
    "samples/entropy": "the policy's next-token entropy in nats (softmax of its logits, temperature 1), averaged over "
                       "all sampled tokens",
}


def distinct_n(samples: list[str], n: int) -> float | None:
    """Distinct-n (Li et al., 2016) over all `samples` pooled: the number of distinct n-grams divided by the number of
    n-grams, an n-gram being n consecutive words of one sample (words: `str.split()`, so whitespace-separated and
    case-sensitive). A sample of fewer than n words has none; None (0 / 0) when no sample has any."""
    grams = [tuple(words[i:i + n]) for words in (s.split() for s in samples) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def self_bleu(groups: list[list[str]]) -> float | None:
    """Self-BLEU (Zhu et al., 2018) with sacrebleu's sentence BLEU at its defaults (13a tokenization, `exp`
    smoothing, effective order; 0 to 100): each sample scored against the other samples of its group (one prompt's
    samples) as references, averaged over the group's samples, then over the groups. Higher means more alike.
    Groups of one sample have nothing to compare with and are left out; None when every group is one sample."""
    scores = [sum(sacrebleu.sentence_bleu(s, group[:i] + group[i + 1:]).score for i, s in enumerate(group))
              / len(group) for group in groups if len(group) > 1]
    return sum(scores) / len(scores) if scores else None


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy in nats, -sum_v p_v log p_v with p = softmax(logits) over the last dimension, computed in float32,
    for each position of `logits` (..., vocab) -> (...). A logit of -inf (p = 0) adds nothing."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
