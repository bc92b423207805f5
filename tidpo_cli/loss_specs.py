"""Which loss `loss.name` is, and what it needs: one declaration per loss, so the objective computes only that.

Every pairwise loss is a function of one micro-batch's per-sequence scores (losses.PairScores) to per-pair losses
and the implicit rewards logged as `rewards/*`. What differs between losses is declared here, not branched on in
the objective: whether a reference model is loaded and run, whether the chosen responses' NLL is needed, whether
KTO's mismatched rows are scored. Token weights (`loss.importance.mode`) and the triplet term (`loss.gamma`) are
not part of a loss: they compose with any of these (objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from omegaconf import DictConfig, ListConfig

from .losses import PairScores, kto_losses, orpo_log_odds, pair_loss, simpo_loss, sigmoid_preference_loss


@dataclass(frozen=True)
class LossOut:
    losses: torch.Tensor            # [B] per pair, summed over the step and divided by its pairs
    chosen_rewards: torch.Tensor    # [B] detached
    rejected_rewards: torch.Tensor  # [B] detached
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-pair values [B] or batch scalars


@dataclass(frozen=True)
class LossSpec:
    compute: Callable[[PairScores, DictConfig], LossOut]
    source: str
    reference: bool = True      # reads the reference's log-probs (False: no reference is loaded or run)
    nll: bool = False           # reads the chosen responses' mean NLL
    nll_with_prompt: bool = False  # ... over the prompt's tokens too (ORPO, as its authors' code and TRL)
    nll_on_gold: bool = False   # ... of the pairs' gold responses where the data has them (TPO), else the chosen
    kto_rows: bool = False      # scores KTO's mismatched (prompt, other completion) rows for its reference point
    length_normalized: bool = False  # its log-probs are token averages (length-normalised rewards)
    tis: bool = False           # token weights from a pair of contrastive models, estimated before training (tis.py)


def types_of(cfg: DictConfig) -> list[str]:
    """`loss.type` as a list (a single name or a list of TRL's loss types)."""
    value = cfg.get("type", "sigmoid")
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def type_weights(cfg: DictConfig) -> list[float]:
    weights = cfg.get("weights")
    return [float(w) for w in weights] if weights is not None else [1.0] * len(types_of(cfg))


def _rewards(cfg, chosen, rejected) -> tuple:
    return cfg.beta * chosen.detach(), cfg.beta * rejected.detach()


def _dpo_family(s: PairScores, cfg: DictConfig) -> LossOut:
    losses = pair_loss(s, types_of(cfg), type_weights(cfg), cfg.beta, cfg.label_smoothing, cfg.discopop_tau)
    return LossOut(losses, *_rewards(cfg, s.chosen_ratio, s.rejected_ratio))


def _averages(s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
    return s.chosen / s.chosen_len.clamp(min=1), s.rejected / s.rejected_len.clamp(min=1)


def _simpo(s: PairScores, cfg: DictConfig) -> LossOut:
    chosen, rejected = _averages(s)
    losses = simpo_loss(chosen, rejected, cfg.beta, cfg.simpo.gamma, cfg.label_smoothing)
    return LossOut(losses, *_rewards(cfg, chosen, rejected))


def _sigmoid_and_nll(s: PairScores, cfg: DictConfig, nll_weight: float) -> LossOut:
    """A reference-free sigmoid term on summed log-probs plus nll_weight x the chosen NLL (CPO; TPO)."""
    preference = sigmoid_preference_loss(s.chosen - s.rejected, cfg.beta, cfg.label_smoothing)
    return LossOut(preference + nll_weight * s.nll, *_rewards(cfg, s.chosen, s.rejected),
                   metrics={"nll_loss": s.nll})


def _cpo(s: PairScores, cfg: DictConfig) -> LossOut:
    return _sigmoid_and_nll(s, cfg, cfg.cpo.alpha)


def _tpo(s: PairScores, cfg: DictConfig) -> LossOut:
    # The NLL of the gold responses (the chosen ones where the data has no `reference` column).
    return _sigmoid_and_nll(s, cfg, cfg.tpo.alpha)


def _orpo(s: PairScores, cfg: DictConfig) -> LossOut:
    chosen, rejected = _averages(s)
    log_odds = orpo_log_odds(chosen, rejected)
    ratio = torch.nn.functional.logsigmoid(log_odds)
    return LossOut(s.nll - cfg.beta * ratio, *_rewards(cfg, chosen, rejected),
                   metrics={"nll_loss": s.nll, "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})


def _kto(s: PairScores, cfg: DictConfig) -> LossOut:
    # Each pair is one desirable and one undesirable example; TRL's loss is their mean, hence the half.
    desirable, undesirable = kto_losses(s.chosen_ratio, s.rejected_ratio, s.kto_kl, cfg.beta,
                                        cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    return LossOut((desirable + undesirable) / 2, *_rewards(cfg, s.chosen_ratio, s.rejected_ratio),
                   metrics={"kl": s.kto_kl})


_DPO = dict(compute=_dpo_family)
SPECS: dict[str, LossSpec] = {
    "dpo": LossSpec(**_DPO, source="Rafailov et al. 2023; loss.type: TRL 1.16 DPOConfig.loss_type"),
    "ipo": LossSpec(**_DPO, source="Azar et al. 2023 (TRL loss_type ipo)"),
    "tdpo": LossSpec(**_DPO, source="Zeng et al. 2024 (TDPO2)"),
    "tidpo": LossSpec(**_DPO, source="arXiv 2505.19653"),
    "tis_dpo": LossSpec(**_DPO, source="Liu et al. 2025 (ICLR), code github.com/exlaw/TIS-DPO", tis=True),
    "simpo": LossSpec(_simpo, "Meng et al. 2024 (TRL CPOTrainer loss_type simpo)", reference=False,
                      length_normalized=True),
    "cpo": LossSpec(_cpo, "Xu et al. 2024 (TRL CPOTrainer)", reference=False, nll=True),
    "orpo": LossSpec(_orpo, "Hong et al. 2024 (TRL ORPOTrainer)", reference=False, nll=True, nll_with_prompt=True,
                     length_normalized=True),
    "tpo": LossSpec(_tpo, "Saeidi et al. 2024 (TRL experimental TPOTrainer)", reference=False, nll=True,
                    nll_on_gold=True),
    "kto": LossSpec(_kto, "Ethayarajh et al. 2024 (TRL KTOTrainer)", kto_rows=True),
}
DPO_FAMILY = tuple(name for name, spec in SPECS.items() if spec.compute is _dpo_family)


def spec_of(cfg: DictConfig) -> LossSpec:
    return SPECS[cfg.name]


def uses_tis(cfg: DictConfig) -> bool:
    """Whether this loss reads token weights estimated before training by two contrastive models (TIS-DPO)."""
    return cfg.name in SPECS and SPECS[cfg.name].tis


def needs_reference(cfg: DictConfig) -> bool:
    """Whether this loss reads a reference model's log-probs (SFT and the reference-free losses do not)."""
    return cfg.name in SPECS and SPECS[cfg.name].reference and not cfg.get("reference_free", False)


def needs_nll(cfg: DictConfig) -> bool:
    return SPECS[cfg.name].nll or (cfg.name in DPO_FAMILY and "sft" in types_of(cfg))


def reference_cacheable(cfg: DictConfig) -> bool:
    """Whether what this loss reads of the reference for the data's pairs is their label log-probs alone, which
    trainer.reference_cache can hold (TDPO's KL, loss.alpha, reads the reference's whole distributions)."""
    return needs_reference(cfg) and not cfg.alpha


def live_reference_parts(cfg: DictConfig) -> list[str]:
    """What the reference still scores during training when its pairs' log-probs come from the cache: rows that
    are not in the data."""
    parts = ["TI-DPO's sampled anchors (loss.gamma)"] if cfg.gamma else []
    if SPECS[cfg.name].kto_rows:
        parts.append("KTO's mismatched prompt-completion rows (its reference point)")
    return parts
