"""The loss family wired into a step (objective.batch_loss + loss_specs): each loss's number against the formula
computed here from the models' own per-token log-probs, token weights and the triplet on top of other losses,
TIS-DPO's precomputed weights, KTO's mismatched rows, reference-free losses without a reference, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import QUICK, compose_config
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.errors import ConfigError
from tidpo_cli.losses import response_mask, token_logps
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds, batch_loss, mismatched_rows, token_weights
from tidpo_cli.tracking import MetricSums

PAIRS = 4


@pytest.fixture(scope="module")
def parts():
    cfg = compose_config([*QUICK, "trainer.share_prompt=false"])
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_splits(cfg.data, tokenizer, seed=0).train[:PAIRS]
    torch.manual_seed(0)
    policy = load_policy(cfg.model, tokenizer)
    reference = frozen_copy(policy)
    with torch.no_grad():  # a policy that differs from its reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.data.max_length)
    return policy, reference, pairs, ids


def loss_of(parts, overrides, batch=None, reference="given"):
    policy, ref, pairs, ids = parts
    cfg = compose_config([*QUICK, *overrides])
    batch = batch if batch is not None else collate(pairs, ids.pad)
    loss, metrics = batch_loss(policy, ref if reference == "given" else reference, batch, cfg.loss, ids, seed=0)
    return loss, metrics.means(), cfg


def sequence_logps(model, batch, weights=None):
    """Per-row (weighted) summed response log-probs and token counts, straight from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = token_logps(logits, batch["labels"])
    mask = response_mask(batch["labels"]).float()
    w = mask if weights is None else weights * mask
    return (logps * w).sum(-1), mask.sum(-1), logps, mask


def test_simpo_with_gradient_importance_is_simpo_on_weighted_averages(parts):
    """loss=simpo loss.importance.mode=gradient: -log sigmoid(beta * (S_w / |y_w| - S_l / |y_l|) - gamma) with
    S = sum_t w_t log pi(y_t), the TI-DPO weights w of the step (importance metrics logged as for tidpo)."""
    policy, _, pairs, ids = parts
    loss, metrics, cfg = loss_of(parts, ["loss=simpo", "loss.importance.mode=gradient"], reference=None)
    batch = collate(pairs, ids.pad)
    weights, _ = token_weights(policy, batch, batch, cfg.loss.importance, slice(0, 2 * PAIRS),
                               batch["input_ids"].shape[1], 0, MetricSums())
    sums, lengths, _, _ = sequence_logps(policy, batch, weights)
    avg = sums / lengths
    beta, gamma = cfg.loss.beta, cfg.loss.simpo.gamma
    expected = sum(-math.log(1 / (1 + math.exp(-(beta * (avg[i] - avg[PAIRS + i]).item() - gamma))))
                   for i in range(PAIRS))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert "importance/max" in metrics and metrics["importance/max"] > 1
    plain, _, _ = loss_of(parts, ["loss=simpo"], reference=None)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-4)  # the weights did change the loss


def test_triplet_on_top_of_ipo_adds_gamma_times_its_term(parts):
    loss, metrics, cfg = loss_of(parts, ["loss=ipo", "loss.gamma=0.1", "loss.anchor.max_new_tokens=4"])
    base, _, _ = loss_of(parts, ["loss=ipo"])
    assert metrics["anchor/length"] >= 1
    assert loss.item() == pytest.approx(base.item() + 0.1 * metrics["triplet/loss"] * PAIRS, rel=1e-5)


@pytest.mark.parametrize("preset", ["simpo", "cpo", "orpo", "tpo"])
def test_reference_free_presets_never_touch_a_reference(parts, preset):
    loss, metrics, _ = loss_of(parts, [f"loss={preset}"], reference=None)
    assert torch.isfinite(loss) and metrics["rewards/accuracies"] >= 0


def test_cpo_and_orpo_against_their_formulas(parts):
    policy, _, pairs, ids = parts
    batch = collate(pairs, ids.pad)
    sums, lengths, logps, mask = sequence_logps(policy, batch)
    nll = -(logps[:PAIRS] * mask[:PAIRS]).sum() / mask[:PAIRS].sum()
    cpo, metrics, cfg = loss_of(parts, ["loss=cpo"], reference=None)
    beta = cfg.loss.beta
    expected = sum(-F.logsigmoid(beta * (sums[i] - sums[PAIRS + i])) + cfg.loss.cpo.alpha * nll for i in range(PAIRS))
    assert cpo.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    orpo, metrics, cfg = loss_of(parts, ["loss=orpo"], reference=None)
    # ORPO's NLL covers each chosen row's prompt tokens too (after the first token), as TRL's and its authors'
    with torch.no_grad():
        full = token_logps(policy(input_ids=batch["input_ids"][:PAIRS]).logits, batch["input_ids"][:PAIRS])
    attended = batch["attention_mask"][:PAIRS].clone()
    attended[:, 0] = 0
    nll = -(full * attended).sum() / attended.sum()
    assert metrics["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    avg = sums / lengths
    odds = [a - math.log(1 - math.exp(a)) for a in avg.tolist()]  # log(P / (1 - P)), P = exp(avg log-prob)
    expected = sum(nll.item() - cfg.loss.beta * math.log(1 / (1 + math.exp(-(odds[i] - odds[PAIRS + i]))))
                   for i in range(PAIRS))
    assert orpo.item() == pytest.approx(expected, rel=1e-5)


def test_dpo_reference_free_is_dpo_against_a_reference_of_log_prob_zero(parts):
    policy, _, pairs, ids = parts
    sums, _, _, _ = sequence_logps(policy, collate(pairs, ids.pad))
    loss, _, _ = loss_of(parts, ["loss=dpo", "loss.reference_free=true"], reference=None)
    expected = sum(-F.logsigmoid(0.1 * (sums[i] - sums[PAIRS + i])) for i in range(PAIRS))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_weighted_list_of_types_is_the_weighted_sum_of_single_types(parts):
    mixed, _, _ = loss_of(parts, ["loss=dpo", "loss.type=[sigmoid,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]"])
    singles = [loss_of(parts, ["loss=dpo", f"loss.type={t}"])[0].item() for t in ("sigmoid", "bco_pair", "sft")]
    assert mixed.item() == pytest.approx(0.8 * singles[0] + 0.2 * singles[1] + singles[2], rel=1e-5)


def test_mismatched_rows_pair_each_prompt_with_the_previous_rows_response():
    batch = {"input_ids": torch.tensor([[1, 2, 10, 11, 0], [3, 20, 0, 0, 0], [1, 2, 30, 0, 0], [3, 40, 41, 42, 0]]),
             "labels": torch.tensor([[-100, -100, 10, 11, -100], [-100, 20, -100, -100, -100],
                                     [-100, -100, 30, -100, -100], [-100, 40, 41, 42, -100]]),
             "prompt_lengths": torch.tensor([2, 1, 2, 1])}
    rows = mismatched_rows(batch, pad_id=0)
    assert rows["input_ids"].tolist() == [[1, 2, 40, 41, 42], [3, 10, 11, 0, 0], [1, 2, 20, 0, 0], [3, 30, 0, 0, 0]]
    assert rows["labels"][0].tolist() == [-100, -100, 40, 41, 42]
    assert rows["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]


def test_kto_against_its_formula(parts):
    policy, reference, pairs, ids = parts
    batch = collate(pairs, ids.pad)
    loss, metrics, cfg = loss_of(parts, ["loss=kto", "loss.kto.desirable_weight=1.5"])
    pol, _, _, _ = sequence_logps(policy, batch)
    ref, _, _, _ = sequence_logps(reference, batch)
    kl_rows = mismatched_rows(batch, ids.pad)
    kl = (sequence_logps(policy, kl_rows)[0] - sequence_logps(reference, kl_rows)[0]).mean().clamp(min=0).item()
    beta = cfg.loss.beta
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ratio = (pol - ref).tolist()
    expected = sum((1.5 * (1 - sig(beta * (ratio[i] - kl))) + 1 - sig(beta * (kl - ratio[PAIRS + i]))) / 2
                   for i in range(PAIRS))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-7)


def test_tis_dpo_reads_the_pairs_precomputed_weights(parts):
    """TIS-DPO: DPO on sum_t w_t (log pi - log pi_ref) with the weights carried by the pairs (collate puts them
    at the response tokens' label positions)."""
    import dataclasses
    policy, reference, pairs, ids = parts
    g = torch.Generator().manual_seed(3)
    weighted = [dataclasses.replace(p, token_weights=(tuple(torch.rand(len(p.chosen_ids), generator=g).tolist()),
                                                      tuple(torch.rand(len(p.rejected_ids), generator=g).tolist())))
                for p in pairs]
    batch = collate(weighted, ids.pad)
    assert batch["token_weights"][0][batch["labels"][0] != -100].tolist() == pytest.approx(
        list(weighted[0].token_weights[0]))
    loss, _, _ = loss_of(parts, ["loss=tis_dpo", "loss.tis.positive_model=p", "loss.tis.negative_model=n"],
                         batch=batch)
    pol, _, _, _ = sequence_logps(policy, batch, batch["token_weights"])
    ref, _, _, _ = sequence_logps(reference, batch, batch["token_weights"])
    m = pol - ref
    expected = sum(-F.logsigmoid(0.1 * (m[i] - m[PAIRS + i])) for i in range(PAIRS))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (["loss=dpo", "loss.type=exo_pair"], "label_smoothing > 0"),
    (["loss=dpo", "loss.type=[sigmoid,hinge]", "loss.weights=[1.0]"], "one weight per type"),
    (["loss=dpo", "loss.type=hinge", "loss.alpha=0.5"], "loss.alpha"),
    (["loss=simpo", "loss.type=hinge"], "loss.type / loss.weights"),
    (["loss=dpo", "loss.type=nope"], "loss.type"),
    (["loss=tis_dpo", "loss.tis.positive_model=p"], "loss.tis.negative_model"),
    (["loss=sft", "loss.importance.mode=gradient"], "does not apply to loss=sft"),
    (["loss=dpo", "loss.type=hinge", "loss.label_smoothing=0.1"], "label_smoothing is read by"),
])
def test_loss_keys_that_do_not_apply_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)


def test_tis_dpo_recipe_end_to_end_and_its_cache(tmp_path, caplog):
    """The README's recipe: two contrastive models trained with tidpo itself (loss=dpo on the data and on its
    flipped labels), then loss=tis_dpo with them. The weights are estimated once, before training, into the cache;
    a second run given the same cache reads them back instead of estimating again."""
    from tidpo_cli.trainer import train

    caplog.set_level("INFO", logger="tidpo")

    quick = [*QUICK, "trainer.max_steps=2"]
    train(compose_config([*quick, "loss=dpo"]), tmp_path / "pos")
    train(compose_config([*quick, "loss=dpo", "data.flip_labels=1.0"]), tmp_path / "neg")
    tis = [*quick, "loss=tis_dpo", f"loss.tis.positive_model={tmp_path / 'pos' / 'final'}",
           f"loss.tis.negative_model={tmp_path / 'neg' / 'final'}"]
    caplog.clear()
    metrics = train(compose_config(tis), tmp_path / "tis")
    assert math.isfinite(metrics["eval/loss"])
    assert "TIS-DPO token weights of 112 pairs" in caplog.text  # 96 training + 16 held-out pairs
    cache = tmp_path / "tis" / "tis_weights.json"
    assert cache.exists()
    caplog.clear()
    train(compose_config([*tis, f"loss.tis.cache={cache}"]), tmp_path / "again")
    assert "TIS-DPO token weights" not in caplog.text and "pairs:" in caplog.text
    assert not (tmp_path / "again" / "tis_weights.json").exists()
