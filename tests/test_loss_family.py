"""The loss family of commit 32549d5 (TRL's DPO loss types, SimPO, CPO, ORPO, TPO, KTO) three ways:

1. by hand: every entry of losses.PAIR_LOSSES and simpo_loss, orpo_log_odds (+ the ORPO total), kto_losses, mean_nll
   on two pairs whose expected values are computed here with `math` from the papers' formulas (not by tidpo code);
2. against TRL 1.16's own loss code on the same numbers, where TRL's code is separable: CPOTrainer.cpo_loss
   (loss_type sigmoid and simpo), ORPOTrainer.odds_ratio_loss, and KTOTrainer._compute_loss (run on a stand-in model
   whose per-sequence log-probs are the test's numbers, with precomputed reference log-probs);
3. end to end: TRL's CPOTrainer (CPO, and SimPO as loss_type="simpo" with cpo_alpha=0), ORPOTrainer, TPOTrainer and
   KTOTrainer against `tidpo train loss=...`, both 3 steps on the same tiny model, rows and optimizer settings, the
   logged loss, log-probs, rewards and gradient norm compared per step (1e-5).


End-to-end alignment (the rest as tests/test_trl_parity.py does it for DPOTrainer):

  tokens    byte-level tokenizer (no merges: tokenizing prompt and response apart or together gives the same ids),
            one BOS in front of the prompt, one EOS after each response in both tools. TRL's older trainers (CPO,
            ORPO: experimental, `tokenize_row`/`build_tokenized_answer`) tokenize the prompt with
            add_special_tokens=False and add the BOS and EOS *ids* themselves (add_bos/eos_token_if_needed); TPO and
            KTO tokenize `prompt` and `prompt + completion + eos_token` (text) with the tokenizer's BOS. Either way the
            same ids; `test_trl_trains_on_the_token_ids_tidpo_trains_on` checks every batch, KTO's KL rows included.
            CPO/ORPO truncate the response to max_length - prompt (and ignore max_prompt_length, not a field in
            1.16); TPO/KTO truncate prompt + completion from the right at max_length: MAX_LENGTH is far above every
            row, so nothing is truncated in either tool.
  log-probs CPO (sigmoid), TPO (sigmoid) and KTO score responses by summed log-probs (CPO's `average_log_prob` is
            False for sigmoid); SimPO and ORPO by token averages (CPO's average_log_prob=True for loss_type simpo;
            ORPO always). TRL's `logps/chosen` is the batch mean of whichever it used, and so is tidpo's
            (token averages for the length-normalised losses).
  NLL       CPO: CrossEntropyLoss over the chosen rows' labels (response tokens + EOS), a mean over the batch's tokens:
            tidpo's mean_nll. TPO: cross-entropy over the gold (`reference`) completion tokens, reference = chosen
            here (tidpo's TPO gold response is the chosen one). ORPO: over the chosen rows' PROMPT AND response
            (TRL's labels = input_ids where attended, huggingface/trl#1516, kept in #2527), in tidpo too
            (LossSpec.nll_with_prompt).
  order     TRL train_sampling_strategy="sequential"; tidpo data.shuffle=false, data.group_by_length=0,
            data.eval_size=0. Step k sees pairs [k*B, (k+1)*B) in both.
  KTO       tidpo's batch of B pairs is 2B rows, the B chosen (desirable) then the B rejected (undesirable); the KL
            row j is row j's prompt + row j-1's response, cyclically over those 2B rows. TRL's own unpairing
            (trl.data_utils.unpair_preference_dataset, `batched=True`, 1000 rows a map batch) puts ALL chosen rows of
            the dataset before all rejected ones, so TRL's step 1 would see only desirable examples. TRL is given
            instead an unpaired dataset built here in tidpo's order (per step: B desirable, then the same B pairs'
            undesirable) with per_device_train_batch_size = 2B; TRL's KL completions (a +1 rotation of the
            completions within each map batch of per_device_train_batch_size rows) are then tidpo's mismatched rows.
            TRL's loss is the mean over the 2B examples, tidpo's the mean over pairs of (desirable + undesirable)/2:
            the same number.
  optimizer torch AdamW (optim="adamw_torch", betas 0.9/0.999, eps 1e-8), lr 1e-3 constant, no warm-up, no weight
            decay, clipping at 1.0, fp32 (TRL's configs default to bf16), no activation checkpointing (TRL's default
            is on), dropout 0 (LlamaConfig; TRL's disable_dropout too), logging every step, grad accum 1.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import datasets
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PrinterCallback
from transformers.utils import logging as hf_logging

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl import KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.experimental.tpo import TPOConfig, TPOTrainer  # noqa: E402

from helpers import aligned_overrides, compose_config, save_tiny_hf_model  # noqa: E402
from tidpo_cli.data.batches import BatchStream  # noqa: E402
from tidpo_cli.data.collate import collate  # noqa: E402
from tidpo_cli.data.splits import load_splits  # noqa: E402
from tidpo_cli.loss_specs import SPECS  # noqa: E402
from tidpo_cli.losses import (IGNORE_INDEX, PAIR_LOSSES, SMOOTHED, PairScores, kto_losses, mean_nll,  # noqa: E402
                              orpo_log_odds, pair_loss, simpo_loss)
from tidpo_cli.modeling import load_tokenizer  # noqa: E402
from tidpo_cli.objective import kto_reference_point, mismatched_rows  # noqa: E402
from tidpo_cli.trainer import train  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# 1. Hand-computed values


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def smoothed(z: float, eps: float) -> float:
    """cDPO: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


# Two pairs. Summed log-probs of the policy (chosen, rejected) and the reference, token counts, the chosen NLL.
# Chosen log-ratios [2, -4], rejected [-1.5, 3], delta [3.5, -7]; the policy's log-odds (chosen - rejected) are
# [3, -5.5] and the reference's [-0.5, 1.5]: opposite orders, so AOT's sorting matters (sorted pairing
# [-5.5 - -0.5, 3 - 1.5] = [-5, 1.5], not [3.5, -7]), and AOT-unpaired's is different again ([-2.5, -1]).
CHOSEN, REJECTED = [-4.0, -9.0], [-7.0, -3.5]
REF_CHOSEN, REF_REJECTED = [-6.0, -5.0], [-5.5, -6.5]
CHOSEN_LEN, REJECTED_LEN = [4, 6], [5, 2]
NLL = 1.25
BETA, EPS = 0.5, 0.1


def scores(chosen=CHOSEN, rejected=REJECTED, ref_chosen=REF_CHOSEN, ref_rejected=REF_REJECTED, chosen_len=CHOSEN_LEN,
           rejected_len=REJECTED_LEN, nll=NLL, kto_kl=None, dtype=torch.float64) -> PairScores:
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    c, r, rc, rr = t(chosen), t(rejected), t(ref_chosen), t(ref_rejected)
    return PairScores(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_len=t(chosen_len),
                      rejected_len=t(rejected_len), delta=(c - rc) - (r - rr),
                      nll=None if nll is None else t(nll).expand(len(chosen)),
                      kto_kl=None if kto_kl is None else t(kto_kl))


def hand_pair_loss(name: str, i: int, beta: float, eps: float, tau: float) -> float:
    """Pair i's loss for TRL loss_type `name`, from the papers' formulas (as TRL 1.16 writes them)."""
    cr = CHOSEN[i] - REF_CHOSEN[i]
    rr = REJECTED[i] - REF_REJECTED[i]
    z = beta * (cr - rr)
    if name == "sigmoid":  # DPO, Rafailov et al. 2023 Eq. 7; cDPO smoothing
        return smoothed(z, eps)
    if name == "hinge":  # SLiC
        return max(0.0, 1 - z)
    if name == "ipo":  # Azar et al. Eq. 17 on token-averaged log-ratios
        return (cr / CHOSEN_LEN[i] - rr / REJECTED_LEN[i] - 1 / (2 * beta)) ** 2
    if name == "exo_pair":  # EXO Eq. 16: KL([sig(z), sig(-z)] || [1 - eps, eps])
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if name == "nca_pair":
        c, r = beta * cr, beta * rr
        return -logsig(c) - 0.5 * logsig(-c) - 0.5 * logsig(-r)
    if name == "robust":  # Chowdhury et al.: ((1 - eps) l(z) - eps l(-z)) / (1 - 2 eps), l = -log sigmoid
        return ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -logsig(beta * cr) - logsig(-beta * rr)
    if name == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    if name == "aot":  # the batch's sorted policy log-odds against its sorted reference log-odds
        policy = sorted(c - r for c, r in zip(CHOSEN, REJECTED))
        reference = sorted(c - r for c, r in zip(REF_CHOSEN, REF_REJECTED))
        return smoothed(beta * (policy[i] - reference[i]), eps)
    if name == "aot_unpaired":  # sorted chosen log-ratios against sorted rejected log-ratios
        chosen = sorted(c - rc for c, rc in zip(CHOSEN, REF_CHOSEN))
        rejected = sorted(r - rr_ for r, rr_ in zip(REJECTED, REF_REJECTED))
        return smoothed(beta * (chosen[i] - rejected[i]), eps)
    if name == "apo_zero":  # D'Oosterlinck et al. Eq. 7
        return 1 - sig(beta * cr) + sig(beta * rr)
    if name == "apo_down":  # Eq. 8
        return sig(beta * cr) + 1 - sig(beta * (cr - rr))
    if name == "discopop":  # Lu et al. Eq. 5
        mix = sig(z / tau)
        return -logsig(z) * (1 - mix) + math.exp(-z) * mix
    if name == "sft":
        return NLL
    if name == "sigmoid_norm":
        return -logsig(beta * (cr / CHOSEN_LEN[i] - rr / REJECTED_LEN[i]))
    raise KeyError(name)


HAND_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def test_every_pair_loss_has_a_hand_computed_case():
    assert set(PAIR_LOSSES) == set(HAND_TYPES), "a loss type without (or with a stale) hand-computed case"


def test_sorting_matters_in_the_aot_case():
    """The numbers are chosen so that AOT's sorted pairing is not the identity (else it would test nothing)."""
    unsorted = [hand_pair_loss("sigmoid", i, BETA, EPS, 0.05) for i in range(2)]
    for name in ("aot", "aot_unpaired"):
        assert [hand_pair_loss(name, i, BETA, EPS, 0.05) for i in range(2)] != pytest.approx(unsorted)
    assert ([hand_pair_loss("aot", i, BETA, EPS, 0.05) for i in range(2)]
            != pytest.approx([hand_pair_loss("aot_unpaired", i, BETA, EPS, 0.05) for i in range(2)]))


@pytest.mark.parametrize("tau", [0.05, 0.2])
@pytest.mark.parametrize("eps", [0.0, EPS])
@pytest.mark.parametrize("name", HAND_TYPES)
def test_pair_loss_matches_the_paper_formula(name, eps, tau):
    if name == "exo_pair" and eps == 0:
        pytest.skip("EXO needs eps > 0 (log eps); config.py refuses it")
    got = PAIR_LOSSES[name](scores(), BETA, eps, tau)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx([hand_pair_loss(name, i, BETA, eps, tau) for i in range(2)],
                                         rel=1e-12, abs=1e-12)


def test_smoothed_is_exactly_the_types_that_read_label_smoothing():
    reads = {name for name in PAIR_LOSSES
             if not torch.allclose(PAIR_LOSSES[name](scores(), BETA, 0.1, 0.05),
                                   PAIR_LOSSES[name](scores(), BETA, 0.2, 0.05))}
    assert reads == set(SMOOTHED)


def test_weighted_list_is_the_weighted_sum():
    """TRL's loss_type list with loss_weights (MPO's example): sum_k w_k * loss_k per pair."""
    got = pair_loss(scores(), ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], BETA, EPS, 0.05)
    expected = [0.8 * hand_pair_loss("sigmoid", i, BETA, EPS, 0.05)
                + 0.2 * hand_pair_loss("bco_pair", i, BETA, EPS, 0.05) + NLL for i in range(2)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_dpo_family_spec_is_the_pair_loss_with_rewards():
    cfg = compose_config(["loss=dpo", "loss.type=[sigmoid,hinge]", "loss.weights=[0.3,0.7]", f"loss.beta={BETA}"]).loss
    out = SPECS["dpo"].compute(scores(), cfg)
    assert out.losses.tolist() == pytest.approx(
        [0.3 * hand_pair_loss("sigmoid", i, BETA, 0, 0.05) + 0.7 * hand_pair_loss("hinge", i, BETA, 0, 0.05)
         for i in range(2)], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * (c - r) for c, r in zip(CHOSEN, REF_CHOSEN)])
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * (c - r) for c, r in zip(REJECTED, REF_REJECTED)])


@pytest.mark.parametrize("eps", [0.0, EPS])
def test_simpo_loss(eps):
    """SimPO Eq. 6: -log sigmoid(beta * (avg_w - avg_l) - gamma), gamma in reward units (TRL's simpo_gamma)."""
    chosen_avg, rejected_avg, beta, gamma = [-0.8, -2.0], [-1.1, -0.9], 2.0, 1.0
    got = simpo_loss(torch.tensor(chosen_avg, dtype=torch.float64), torch.tensor(rejected_avg, dtype=torch.float64),
                     beta, gamma, eps)
    expected = [smoothed(beta * (c - r) - gamma, eps) for c, r in zip(chosen_avg, rejected_avg)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


# Token-averaged log-probs on both sides of log1mexp's switch at -log 2 (and one close to 0).
ORPO_CHOSEN_AVG, ORPO_REJECTED_AVG = [-0.05, -1.3], [-2.5, -0.4]


def hand_log_odds(avg: float) -> float:
    p = math.exp(avg)
    return math.log(p / (1 - p))


def test_orpo_log_odds_and_total():
    """ORPO Eq. 4-7: log odds(y) = log(P / (1 - P)), P = exp(mean token log-prob); loss = NLL - beta * log sigmoid
    (log odds(y_w) - log odds(y_l)); rewards beta * the token averages."""
    expected = [hand_log_odds(c) - hand_log_odds(r) for c, r in zip(ORPO_CHOSEN_AVG, ORPO_REJECTED_AVG)]
    got = orpo_log_odds(torch.tensor(ORPO_CHOSEN_AVG, dtype=torch.float64),
                        torch.tensor(ORPO_REJECTED_AVG, dtype=torch.float64))
    assert got.tolist() == pytest.approx(expected, rel=1e-12)

    beta, lengths = 0.25, [3, 7]
    cfg = compose_config(["loss=orpo", f"loss.beta={beta}"]).loss
    s = scores(chosen=[a * n for a, n in zip(ORPO_CHOSEN_AVG, lengths)],
               rejected=[a * n for a, n in zip(ORPO_REJECTED_AVG, lengths[::-1])],
               ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0], chosen_len=lengths, rejected_len=lengths[::-1])
    out = SPECS["orpo"].compute(s, cfg)
    assert out.losses.tolist() == pytest.approx([NLL - beta * logsig(x) for x in expected], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * a for a in ORPO_CHOSEN_AVG], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * a for a in ORPO_REJECTED_AVG], rel=1e-12)
    assert out.metrics["log_odds_chosen"].tolist() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["log_odds_ratio"].tolist() == pytest.approx([logsig(x) for x in expected], rel=1e-12)


@pytest.mark.parametrize("z0", [0.0, 0.7])
def test_kto_losses(z0):
    """KTO Eq. 7-8: desirable w_d (1 - sigmoid(beta (r - z0))), undesirable w_u (1 - sigmoid(beta (z0 - r)))."""
    beta, wd, wu = BETA, 1.0, 1.5
    cr = [c - r for c, r in zip(CHOSEN, REF_CHOSEN)]
    rr = [c - r for c, r in zip(REJECTED, REF_REJECTED)]
    d, u = kto_losses(torch.tensor(cr, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64),
                      torch.tensor(z0, dtype=torch.float64), beta, wd, wu)
    assert d.tolist() == pytest.approx([wd * (1 - sig(beta * (x - z0))) for x in cr], rel=1e-12)
    assert u.tolist() == pytest.approx([wu * (1 - sig(beta * (z0 - x))) for x in rr], rel=1e-12)


def test_mean_nll():
    logps = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -3.0, -0.25, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, False], [False, True, True, True]])
    assert mean_nll(logps, mask).item() == pytest.approx((1.0 + 2.0 + 3.0 + 0.25 + 9.0) / 5, rel=1e-12)


def test_mismatched_rows_pair_row_j_prompt_with_row_j_minus_1_response():
    """KTO's KL rows from a collated batch of 2 pairs (4 rows: c0, c1, r0, r1): row j = prompt j + response j-1,
    cyclically: (p0, r1), (p1, c0), (p0, c1), (p1, r0)."""
    from tidpo_cli.data.examples import TokenizedPair

    pad = 99
    p0, p1 = [1, 10, 11], [1, 20]
    c0, c1, r0, r1 = [30, 31, 2], [40, 2], [50, 51, 52, 2], [60, 2]
    pairs = [TokenizedPair(p0, c0, r0, where="a", truncated=False),
             TokenizedPair(p1, c1, r1, where="b", truncated=False)]
    rows = mismatched_rows(collate(pairs, pad), pad)
    expected = [(p0, r1), (p1, c0), (p0, c1), (p1, r0)]
    width = max(len(p) + len(r) for p, r in expected)
    assert rows["input_ids"].shape == (4, width)
    for j, (prompt, response) in enumerate(expected):
        ids = prompt + response
        assert rows["input_ids"][j].tolist() == ids + [pad] * (width - len(ids))
        assert rows["attention_mask"][j].tolist() == [1] * len(ids) + [0] * (width - len(ids))
        assert rows["labels"][j].tolist() == ([IGNORE_INDEX] * len(prompt) + response
                                              + [IGNORE_INDEX] * (width - len(ids)))


def test_kto_reference_point_is_the_clamped_mean_mismatched_log_ratio():
    """z0 = max(0, mean_j [log pi(y_{j-1} | x_j) - log pi_ref(y_{j-1} | x_j)]), each row scored alone here (no
    padding); swapping the two models flips the mean's sign, so one of the two directions hits the clamp."""
    from tidpo_cli.data.examples import TokenizedPair

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    a, b = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    pairs = [TokenizedPair([1, 5, 6], [7, 8, 2], [9, 2], where="a", truncated=False),
             TokenizedPair([1, 11], [12, 13, 14, 2], [15, 16, 2], where="b", truncated=False)]
    batch = collate(pairs, 0)
    kl_rows = [([1, 5, 6], [15, 16, 2]), ([1, 11], [7, 8, 2]), ([1, 5, 6], [12, 13, 14, 2]), ([1, 11], [9, 2])]

    @torch.no_grad()
    def response_logp(model, prompt, response):
        logits = model(torch.tensor([prompt + response])).logits[0].double().log_softmax(-1)
        return sum(logits[len(prompt) + t - 1, tok].item() for t, tok in enumerate(response))

    mean = sum(response_logp(a, p, r) - response_logp(b, p, r) for p, r in kl_rows) / len(kl_rows)
    assert abs(mean) > 1e-3
    assert kto_reference_point(a, b, batch, 0).item() == pytest.approx(max(0.0, mean), abs=1e-5)
    assert kto_reference_point(b, a, batch, 0).item() == pytest.approx(max(0.0, -mean), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 2. Against TRL's loss code on the same numbers

CPU = torch.device("cpu")


def trl_self(**attrs) -> SimpleNamespace:
    """What TRL's loss methods read of `self`."""
    return SimpleNamespace(accelerator=SimpleNamespace(device=CPU), alpha=0.0, **attrs)


@pytest.mark.parametrize("eps", [0.0, EPS])
def test_cpo_matches_trl_cpo_loss(eps):
    beta, alpha = 0.2, 0.7
    cfg = compose_config(["loss=cpo", f"loss.beta={beta}", f"loss.cpo.alpha={alpha}",
                          f"loss.label_smoothing={eps}"]).loss
    s = scores(ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0])
    ours = SPECS["cpo"].compute(s, cfg)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(
        trl_self(beta=beta, label_smoothing=eps, loss_type="sigmoid"), s.chosen, s.rejected)
    # TRL: loss = losses.mean() + cpo_alpha * nll_loss; tidpo: the mean over pairs of (preference + alpha * nll).
    torch.testing.assert_close(ours.losses - alpha * s.nll, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.losses.mean(), losses.mean() + alpha * s.nll[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)
    assert ours.metrics["nll_loss"].tolist() == [NLL, NLL]


@pytest.mark.parametrize("eps", [0.0, EPS])
def test_simpo_matches_trl_cpo_loss_simpo(eps):
    beta, gamma = 2.0, 1.0
    cfg = compose_config(["loss=simpo", f"loss.beta={beta}", f"loss.simpo.gamma={gamma}",
                          f"loss.label_smoothing={eps}"]).loss
    s = scores(ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0], nll=None)
    ours = SPECS["simpo"].compute(s, cfg)
    # TRL's CPO passes token-averaged log-probs for loss_type simpo (get_batch_logps(average_log_prob=True)).
    chosen_avg, rejected_avg = s.chosen / s.chosen_len, s.rejected / s.rejected_len
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(
        trl_self(beta=beta, label_smoothing=eps, loss_type="simpo", simpo_gamma=gamma), chosen_avg, rejected_avg)
    torch.testing.assert_close(ours.losses, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def test_orpo_matches_trl_odds_ratio_loss():
    beta, lengths = 0.25, [3, 7]
    cfg = compose_config(["loss=orpo", f"loss.beta={beta}"]).loss
    s = scores(chosen=[a * n for a, n in zip(ORPO_CHOSEN_AVG, lengths)],
               rejected=[a * n for a, n in zip(ORPO_REJECTED_AVG, lengths[::-1])],
               ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0], chosen_len=lengths, rejected_len=lengths[::-1])
    ours = SPECS["orpo"].compute(s, cfg)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trl_self(beta=beta), s.chosen / s.chosen_len, s.rejected / s.rejected_len)
    # TRL: loss = nll_loss - losses.mean(), losses = beta * log sigmoid(log odds); tidpo: per pair nll - beta * ratio.
    # TRL computes in float32 (odds_ratio_loss casts its inputs with .float()): compare at float32's precision.
    close = functools.partial(torch.testing.assert_close, rtol=1e-6, atol=1e-7, check_dtype=False)
    close(ours.losses, s.nll - losses)
    close(ours.losses.mean(), s.nll[0] - losses.mean())
    close(ours.chosen_rewards, chosen_rewards)
    close(ours.rejected_rewards, rejected_rewards)
    close(ours.metrics["log_odds_ratio"].mean(), log_odds_ratio)
    close(ours.metrics["log_odds_chosen"].mean(), log_odds_chosen)


def trl_kto(policy: list[float], reference: list[float], labels: list[bool], kl_policy: list[float],
            kl_reference: list[float], beta: float, desirable_weight: float, undesirable_weight: float):
    """TRL 1.16's KTOTrainer._compute_loss itself, on a stand-in model whose per-sequence completion log-probs are
    `policy` (main rows) and `kl_policy` (KL rows), with precomputed reference log-probs (precompute_ref_log_probs
    =True: TRL reads batch["ref_logps"] and batch["ref_KL_logps"] and runs no reference model). Returns (loss,
    logged metrics)."""
    n = len(policy)
    main, kl_rows = torch.tensor(policy, dtype=torch.float64), torch.tensor(kl_policy, dtype=torch.float64)

    def model(input_ids, attention_mask, labels, fused_lm_head, use_cache):
        # input_ids[:, 0]: 0 for the main rows, 1 for the KL rows; input_ids[:, 1]: the row. One completion token
        # (completion_mask [0, 1]) whose log-prob is the row's whole completion log-prob.
        values = torch.where(input_ids[:, 0] == 1, kl_rows[input_ids[:, 1]], main[input_ids[:, 1]])
        return SimpleNamespace(log_probs=values[:, None], entropy=torch.zeros(n, 1, dtype=torch.float64),
                               mean_logits=torch.zeros(n, 1, dtype=torch.float64))

    rows = torch.arange(n)
    batch = {
        "input_ids": torch.stack([torch.zeros(n, dtype=torch.long), rows], 1),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * n),
        "KL_input_ids": torch.stack([torch.ones(n, dtype=torch.long), rows], 1),
        "KL_attention_mask": torch.ones(n, 2, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1]] * n),
        "label": torch.tensor(labels),
        "ref_logps": torch.tensor(reference, dtype=torch.float64),
        "ref_KL_logps": torch.tensor(kl_reference, dtype=torch.float64),
    }
    identity = lambda x: x  # noqa: E731  (one process: gathers are the identity)
    self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=CPU, gather_for_metrics=identity,
                                                                          gather=identity),
        calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)))
    self._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, self)
    loss = KTOTrainer._compute_loss(self, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("kl_shift", [0.9, -5.0], ids=["kl_positive", "kl_clamped"])
def test_kto_matches_trl_kto_compute_loss(kl_shift):
    beta, wd, wu = BETA, 1.0, 1.5
    cfg = compose_config(["loss=kto", f"loss.beta={beta}", f"loss.kto.desirable_weight={wd}",
                          f"loss.kto.undesirable_weight={wu}"]).loss
    # 2 pairs -> 4 examples in tidpo's order: the chosen (desirable) then the rejected (undesirable).
    policy, reference = CHOSEN + REJECTED, REF_CHOSEN + REF_REJECTED
    kl_policy = [-3.0, -4.0 + kl_shift, -2.5, -6.0 + kl_shift]
    kl_reference = [-3.5, -4.2, -2.0, -6.1]
    z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_reference)) / 4)  # TRL's: mean, detached, clamped at 0
    assert (z0 > 0) == (kl_shift > 0)
    loss, logged = trl_kto(policy, reference, [True, True, False, False], kl_policy, kl_reference, beta, wd, wu)
    ours = SPECS["kto"].compute(scores(kto_kl=z0, nll=None), cfg)
    # TRL: the mean over the 2B examples; tidpo: per pair (desirable + undesirable) / 2, then the mean over pairs.
    torch.testing.assert_close(ours.losses.mean(), loss, rtol=1e-12, atol=1e-12)
    assert logged["kl"] == pytest.approx(z0, abs=1e-12)
    assert ours.metrics["kl"].item() == pytest.approx(z0, abs=1e-12)
    assert logged["rewards/chosen"] == pytest.approx(ours.chosen_rewards.mean().item(), rel=1e-12)
    assert logged["rewards/rejected"] == pytest.approx(ours.rejected_rewards.mean().item(), rel=1e-12)
    assert logged["rewards/margins"] == pytest.approx((ours.chosen_rewards - ours.rejected_rewards).mean().item(),
                                                      rel=1e-12)
    assert logged["logps/chosen"] == pytest.approx(sum(CHOSEN) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 3. End to end: TRL's trainers against `tidpo train`

STEPS, BATCH, LR, SEED = 3, 2, 1e-3, 0
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128  # far above every row: nothing is truncated
RTOL = ATOL = 1e-5
MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=MAX_LENGTH, tie_word_embeddings=False, attention_dropout=0.0)
# 6 pairs = 3 steps x 2 pairs, lengths different within and across pairs (every batch is padded).
ROWS = [
    {"prompt": "Copy: a b c\nAnswer:", "chosen": " a b c", "rejected": " a x c d"},
    {"prompt": "Name a colour.\nAnswer:", "chosen": " Blue, like the sky.", "rejected": " Seven."},
    {"prompt": "What is 2 + 2?\nAnswer:", "chosen": " 4", "rejected": " It is 5, I think."},
    {"prompt": "Say hello.\nAnswer:", "chosen": " Hello there!", "rejected": " Go away."},
    {"prompt": "Copy: q r s t u\nAnswer:", "chosen": " q r s t u", "rejected": " q r z"},
    {"prompt": "Spell cat.\nAnswer:", "chosen": " c-a-t", "rejected": " k-a-t-t-t"},
]
COMMON = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins")
SUMMED = ("logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("loss_family")


@pytest.fixture(scope="module")
def model_dir(work):
    """A tiny Llama (random init, seed 0) and the byte-level tokenizer, as a plain HF model directory."""
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return save_tiny_hf_model(work / "model", MODEL, SEED)


@pytest.fixture(scope="module")
def rows_file(work):
    path = work / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def tidpo_overrides(loss: list[str], model_dir, rows_file, batch: int = BATCH) -> list[str]:
    return [*loss, *aligned_overrides(model_dir, rows_file, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                                      batch=batch, grad_accum=1, steps=STEPS, lr=LR, seed=SEED)]


def trl_args(output_dir, batch: int = BATCH) -> dict:
    """TrainingArguments shared by every TRL trainer here."""
    return dict(
        output_dir=str(output_dir), max_length=MAX_LENGTH, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, activation_checkpointing=False, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, disable_dropout=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=SEED,
    )


def kto_rows(rows: list[dict], batch: int) -> list[dict]:
    """Unpaired rows in tidpo's KTO order: per step, the batch's chosen (desirable) then its rejected."""
    out = []
    for start in range(0, len(rows), batch):
        group = rows[start:start + batch]
        out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in group]
        out += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in group]
    return out


def test_trl_own_unpairing_would_not_give_tidpo_kto_batches():
    """Why the KTO run hands TRL unpaired rows built here: TRL's unpair_preference_dataset (what KTOTrainer applies to
    a paired dataset) puts every chosen row of a map batch (1000 rows) before every rejected one, so with sequential
    batches of 2B examples TRL's first steps would hold desirable examples only. kto_rows gives tidpo's order."""
    from trl.data_utils import unpair_preference_dataset

    assert unpair_preference_dataset(Dataset.from_list(ROWS))["label"] == [True] * len(ROWS) + [False] * len(ROWS)
    ordered = kto_rows(ROWS, BATCH)
    assert [r["label"] for r in ordered] == ([True] * BATCH + [False] * BATCH) * STEPS
    assert [r["completion"] for r in ordered[:2 * BATCH]] == ([r["chosen"] for r in ROWS[:BATCH]]
                                                             + [r["rejected"] for r in ROWS[:BATCH]])


# id -> (tidpo overrides, TRL trainer, its config class, its config fields); the two sides' values must agree.
# Non-default values where a key would otherwise go untested: CPO's alpha 0.5 and label smoothing 0.1, SimPO's
# gamma 1.0, KTO's undesirable weight 1.5; TPO at beta 0.1 (TRL's default 0.01 leaves the preference term flat).
CASES = {
    "cpo": (["loss=cpo", "loss.beta=0.2", "loss.cpo.alpha=0.5", "loss.label_smoothing=0.1"], CPOTrainer,
            CPOConfig, dict(loss_type="sigmoid", beta=0.2, cpo_alpha=0.5, label_smoothing=0.1)),
    "simpo": (["loss=simpo", "loss.beta=2.0", "loss.simpo.gamma=1.0"], CPOTrainer, CPOConfig,
              dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)),
    "orpo": (["loss=orpo", "loss.beta=0.1"], ORPOTrainer, ORPOConfig, dict(beta=0.1)),
    "tpo": (["loss=tpo", "loss.beta=0.1", "loss.tpo.alpha=1.0"], TPOTrainer, TPOConfig,
            dict(loss_type="sigmoid", beta=0.1, tpo_alpha=1.0)),
    "kto": (["loss=kto", "loss.beta=0.1", "loss.kto.desirable_weight=1.0", "loss.kto.undesirable_weight=1.5"],
            KTOTrainer, KTOConfig, dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)),
}
# The same KTO run with tidpo reading the unpaired rows TRL reads (data.format=unpaired, auto-detected): 2B examples
# a step, in the same order, so the same steps as the paired run.
CASES["kto_unpaired"] = CASES["kto"]
# TPO with a gold response of its own (TRL's `reference` column, which tidpo reads too) instead of the chosen one.
CASES["tpo_gold"] = CASES["tpo"]


def gold_rows() -> list[dict]:
    return [{**r, "reference": " gold:" + r["chosen"][::-1]} for r in ROWS]


@pytest.fixture(scope="module")
def tidpo_run(work, model_dir, rows_file):
    """case id -> tidpo's metrics.jsonl training rows, one per step (each case trained once per module)."""
    cache: dict[str, list[dict]] = {}

    def run(case: str) -> list[dict]:
        if case not in cache:
            data, batch = rows_file, BATCH
            if case == "kto_unpaired":
                data, batch = work / "unpaired.jsonl", 2 * BATCH
                data.write_text("".join(json.dumps(r) + "\n" for r in kto_rows(ROWS, BATCH)))
            elif case == "tpo_gold":
                data = work / "gold.jsonl"
                data.write_text("".join(json.dumps(r) + "\n" for r in gold_rows()))
            detect = ["data.format=auto"] if case == "kto_unpaired" else []  # auto-detected as unpaired
            cfg = compose_config(tidpo_overrides(CASES[case][0], model_dir, data, batch) + detect)
            run_dir = work / "tidpo" / case
            run_dir.mkdir(parents=True)
            train(cfg, run_dir)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            cache[case] = [r for r in rows if "loss" in r]
        return cache[case]

    return run


@pytest.fixture(scope="module")
def trl_run(work, model_dir):
    """case id -> {"logs": TRL's per-step log rows, "seen": the batches it trained on}."""
    cache: dict[str, dict] = {}

    def run(case: str) -> dict:
        case = "kto" if case == "kto_unpaired" else case  # TRL reads the same unpaired rows either way
        if case not in cache:
            _, trainer_cls, config_cls, fields = CASES[case]
            load = dict(dtype=torch.float32, attn_implementation="sdpa")
            policy = AutoModelForCausalLM.from_pretrained(model_dir, **load)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            extra, batch = {}, BATCH
            if case in ("kto", "kto_unpaired"):
                rows, batch = kto_rows(ROWS, BATCH), 2 * BATCH
                extra["ref_model"] = AutoModelForCausalLM.from_pretrained(model_dir, **load)
            elif case == "tpo":
                rows = [{**r, "reference": r["chosen"]} for r in ROWS]  # without a column, tidpo's gold is the chosen
            elif case == "tpo_gold":
                rows = gold_rows()
            else:
                rows = ROWS
            seen: list[dict] = []

            class Recording(trainer_cls):
                def training_step(self, model, inputs, *args, **kwargs):
                    seen.append({k: v.detach().cpu().clone() for k, v in inputs.items() if torch.is_tensor(v)})
                    return super().training_step(model, inputs, *args, **kwargs)

            trainer = Recording(model=policy, args=config_cls(**trl_args(work / "trl" / case, batch), **fields),
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **extra)
            trainer.remove_callback(PrinterCallback)  # disable_tqdm=True prints every log row otherwise
            trainer.train()
            cache[case] = {"logs": [h for h in trainer.state.log_history if "loss" in h], "seen": seen}
        return cache[case]

    return run


def mismatches(ours: list[dict], theirs: list[dict], pairs: dict[str, str | tuple], steps=range(1, STEPS + 1)):
    """Every (step, name) where tidpo's value differs from TRL's by more than ATOL + RTOL * |TRL's|.

    `pairs`: TRL's name -> tidpo's name, or (tidpo's name, factor) for a value TRL logs as factor * tidpo's."""
    problems = []
    if len(ours) != STEPS or len(theirs) != STEPS:
        problems.append(f"steps logged: tidpo {len(ours)}, TRL {len(theirs)}, expected {STEPS}")
    for step in steps:
        if step > min(len(ours), len(theirs)):
            break
        a_row, b_row = ours[step - 1], theirs[step - 1]
        for trl_name, spec in pairs.items():
            name, factor = spec if isinstance(spec, tuple) else (spec, 1.0)
            if name not in a_row or trl_name not in b_row:
                problems.append(f"step {step} {trl_name}: missing in {'tidpo' if name not in a_row else 'TRL'}")
                continue
            a, b = factor * float(a_row[name]), float(b_row[trl_name])
            if not abs(a - b) <= ATOL + RTOL * abs(b):
                problems.append(f"step {step} {trl_name}: tidpo {a:.8g} vs TRL {b:.8g} (diff {a - b:.3g})")
    return problems


def same(names) -> dict:
    return {n: n for n in names}


def averaged_logps(case: str) -> dict:
    """For SimPO and ORPO TRL logs logps/* as the batch mean of token-AVERAGED log-probs: tidpo's rewards/* / beta."""
    beta = CASES[case][3]["beta"]  # TRL's beta; tidpo's loss.beta is set to the same in CASES
    return {"logps/chosen": ("rewards/chosen", 1 / beta), "logps/rejected": ("rewards/rejected", 1 / beta)}


EXPECTED = {
    "cpo": {**same(COMMON + SUMMED), "nll_loss": "nll_loss"},
    "simpo": {**same(COMMON), **averaged_logps("simpo")},
    "tpo": same(COMMON + SUMMED),
    "tpo_gold": same(COMMON + SUMMED),
    "kto": {**same(COMMON + SUMMED), "kl": "kl"},
    # unpaired rows have no pairs, so no per-pair margin (TRL's rewards/margins is the difference of the two means)
    "kto_unpaired": {**same(("loss", "grad_norm", "rewards/chosen", "rewards/rejected") + SUMMED), "kl": "kl"},
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_matches_trl_trainer(case, tidpo_run, trl_run):
    problems = mismatches(tidpo_run(case), trl_run(case)["logs"], EXPECTED[case])
    assert not problems, f"tidpo and TRL differ ({case}):\n  " + "\n  ".join(problems)


def test_kto_runs_have_a_positive_reference_point_after_step_1(tidpo_run, trl_run):
    """Else the KL term (and its clamp) would go untested end to end: at step 1 policy = reference, z0 = 0."""
    assert trl_run("kto")["logs"][0]["kl"] == 0
    assert any(row["kl"] > 1e-6 for row in trl_run("kto")["logs"][1:]), trl_run("kto")["logs"]


def test_orpo_nll_covers_the_prompt_tokens_as_trl(tidpo_run, trl_run, tidpo_batches, model_dir):
    """ORPO's NLL is the mean over the chosen rows' prompt (after BOS) and response tokens in both tools (TRL's
    labels = input_ids where attended, huggingface/trl#1516, following the ORPO authors' code), not over the
    response alone: computed here from the initial model on step 1's batch."""
    ours, theirs = tidpo_run("orpo"), trl_run("orpo")["logs"]
    batch = tidpo_batches[0]
    chosen = {k: v[:BATCH] for k, v in batch.items()}
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        logits = model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits.double()
    picked = logits[:, :-1].log_softmax(-1).gather(-1, chosen["input_ids"][:, 1:, None]).squeeze(-1)
    response = chosen["labels"][:, 1:] != IGNORE_INDEX
    attended = chosen["attention_mask"][:, 1:].bool()
    nll_response = -(picked * response).sum().item() / response.sum().item()
    nll_prompt_and_response = -(picked * attended).sum().item() / attended.sum().item()
    assert abs(nll_response - nll_prompt_and_response) > 10 * ATOL
    assert ours[0]["nll_loss"] == pytest.approx(nll_prompt_and_response, abs=ATOL)
    assert theirs[0]["nll_loss"] == pytest.approx(nll_prompt_and_response, abs=ATOL)


def test_orpo_matches_trl_trainer(tidpo_run, trl_run):
    pairs = {**same(COMMON + ("nll_loss", "log_odds_ratio", "log_odds_chosen")), **averaged_logps("orpo")}
    problems = mismatches(tidpo_run("orpo"), trl_run("orpo")["logs"], pairs)
    assert not problems, "\n  ".join(problems)


@pytest.mark.parametrize("case", ["simpo", "orpo"])
def test_logged_logps_of_length_normalised_losses_match_trl(case, tidpo_run, trl_run):
    problems = mismatches(tidpo_run(case), trl_run(case)["logs"], same(SUMMED), steps=[1])
    assert not problems, "\n  ".join(problems)


@pytest.fixture(scope="module")
def tidpo_batches(model_dir, rows_file) -> list[dict]:
    """The micro-batches `tidpo train` trains on in these runs, step by step (its BatchStream, file order)."""
    cfg = compose_config(tidpo_overrides(["loss=cpo"], model_dir, rows_file))
    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, seed=cfg.seed)
    assert len(splits.train) == len(ROWS) and not splits.eval
    assert not any(r.truncated for r in splits.reports.values()), "a row was truncated: raise MAX_LENGTH"
    stream = BatchStream(splits.train, cfg.trainer.micro_batch_size, tokenizer.pad_token_id, seed=cfg.seed,
                         shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length)
    return list(itertools.islice(stream, STEPS))


def test_trl_trains_on_the_token_ids_tidpo_trains_on(model_dir, trl_run, tidpo_batches):
    """Every batch each TRL trainer saw is tidpo's batch in that place: ids, attention mask, response tokens; for
    KTO also the KL rows (tidpo's mismatched_rows); for TPO the gold rows (= tidpo's chosen rows)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = tidpo_batches
    pad = tokenizer.pad_token_id

    def check(case, step, ids, mask, completion, batch):
        where = f"{case} step {step + 1}"
        assert torch.equal(ids, batch["input_ids"]), f"{where}: input ids differ"
        assert torch.equal(mask, batch["attention_mask"]), f"{where}: attention masks differ"
        assert torch.equal(completion.bool(), batch["labels"] != IGNORE_INDEX), f"{where}: response tokens differ"

    for case in ("cpo", "orpo"):  # the older trainers: chosen_* / rejected_* keys, concatenated as TRL's forward does
        seen = trl_run(case)["seen"]
        assert len(seen) == STEPS
        for step, (theirs, batch) in enumerate(zip(seen, ours)):
            cat = CPOTrainer.concatenated_inputs(theirs, padding_value=pad)
            check(case, step, cat["concatenated_input_ids"], cat["concatenated_attention_mask"],
                  cat["concatenated_labels"] != IGNORE_INDEX, batch)
            assert torch.equal(cat["concatenated_labels"], batch["labels"]), f"{case} step {step + 1}: labels differ"
    for step, (theirs, batch) in enumerate(zip(trl_run("tpo")["seen"], ours)):
        rows = 2 * BATCH
        check("tpo", step, theirs["input_ids"][:rows], theirs["attention_mask"][:rows],
              theirs["completion_mask"][:rows], batch)
        assert torch.equal(theirs["input_ids"][rows:], theirs["input_ids"][:BATCH]), "TPO's gold rows != chosen rows"
    for step, (theirs, batch) in enumerate(zip(trl_run("kto")["seen"], ours)):
        assert theirs["label"].tolist() == [True] * BATCH + [False] * BATCH
        check("kto", step, theirs["input_ids"], theirs["attention_mask"], theirs["completion_mask"], batch)
        kl = mismatched_rows(batch, pad)
        check("kto KL", step, theirs["KL_input_ids"], theirs["KL_attention_mask"], theirs["KL_completion_mask"], kl)
    first = trl_run("cpo")["seen"][0]["chosen_input_ids"][0]
    assert first[0] == tokenizer.bos_token_id and (first == tokenizer.bos_token_id).sum() == 1


def test_the_comparison_catches_another_loss(tidpo_run, trl_run):
    """tidpo's CPO rows against TRL's SimPO rows (other beta, averaged log-probs, no NLL) fail the check, and
    tidpo's TPO against TRL's CPO (other beta and alpha): the comparison can fail."""
    assert mismatches(tidpo_run("cpo"), trl_run("simpo")["logs"], same(COMMON))
    problems = mismatches(tidpo_run("tpo"), trl_run("cpo")["logs"], same(COMMON + SUMMED))
    assert any(p.startswith("step 1 loss:") for p in problems), problems
