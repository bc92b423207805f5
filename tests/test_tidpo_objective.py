"""TI-DPO wired into a step: the ablation that must equal DPO, the metrics, and every loss preset training."""

import json

import pytest
import torch

from helpers import QUICK, REPO, compose_config
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds, batch_loss
from tidpo_cli.trainer import train

# tis_dpo needs two trained contrastive models: test_loss_composition.py runs its recipe end to end.
PRESETS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml") if p.stem not in ("base", "tis_dpo"))


def setup(loss_overrides):
    cfg = compose_config([*QUICK, *loss_overrides])
    tokenizer = load_tokenizer(cfg.model)
    batch = collate(load_splits(cfg.data, tokenizer, seed=0).train[:6], tokenizer.pad_token_id)
    torch.manual_seed(0)
    policy = load_policy(cfg.model, tokenizer)
    reference = frozen_copy(policy)
    with torch.no_grad():  # a policy that differs from its reference, so every term is non-trivial
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.data.max_length)
    return cfg, policy, reference, batch, ids


def loss_and_grads(cfg, policy, reference, batch, ids):
    policy.zero_grad(set_to_none=True)
    loss, metrics = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in policy.parameters()], metrics.means()


def test_uniform_weights_without_triplet_or_kl_is_exactly_dpo():
    cfg_dpo, policy, reference, batch, ids = setup(["loss=dpo"])
    cfg_uni = compose_config([*QUICK, "loss=tidpo_uniform", "loss.gamma=0", "loss.alpha=0"])
    loss_dpo, grads_dpo, metrics_dpo = loss_and_grads(cfg_dpo, policy, reference, batch, ids)
    loss_uni, grads_uni, metrics_uni = loss_and_grads(cfg_uni, policy, reference, batch, ids)
    assert loss_dpo.item() != pytest.approx(6 * 0.6931, abs=1e-3)  # not the trivial value at policy == reference
    assert torch.equal(loss_dpo, loss_uni)
    assert all(torch.equal(a, b) for a, b in zip(grads_dpo, grads_uni))
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]:
        assert metrics_dpo[name] == metrics_uni[name]


def test_gradient_weights_change_the_loss_and_report_their_metrics():
    cfg, policy, reference, batch, ids = setup(["loss=tidpo_no_triplet"])
    cfg_dpo = compose_config([*QUICK, "loss=dpo"])
    loss_w, _, metrics = loss_and_grads(cfg, policy, reference, batch, ids)
    loss_dpo, _, _ = loss_and_grads(cfg_dpo, policy, reference, batch, ids)
    assert loss_w.item() != pytest.approx(loss_dpo.item(), abs=1e-6)
    for name in ["importance/entropy", "importance/max", "importance/fallbacks"]:
        assert name in metrics
    assert metrics["importance/max"] >= 1.0  # weights average 1 over the span, so the largest is >= 1
    assert "triplet/loss" not in metrics  # gamma = 0 samples no anchor


def test_full_tidpo_step_has_triplet_and_anchor_metrics():
    cfg, policy, reference, batch, ids = setup(["loss=tidpo"])
    loss, grads, metrics = loss_and_grads(cfg, policy, reference, batch, ids)
    for name in ["triplet/loss", "triplet/dist_pos", "triplet/dist_neg", "triplet/active_frac", "anchor/length"]:
        assert name in metrics, name
    assert 0.0 <= metrics["triplet/active_frac"] <= 1.0
    assert metrics["anchor/length"] >= 1
    assert torch.isfinite(loss) and any(g.abs().sum() > 0 for g in grads)
    # gamma scales the triplet term into the loss: same seed, same anchors, gamma 0 -> the loss drops by it
    cfg0 = compose_config([*QUICK, "loss=tidpo", "loss.gamma=0"])
    loss0, _, _ = loss_and_grads(cfg0, policy, reference, batch, ids)
    expected = loss0.item() + cfg.loss.gamma * metrics["triplet/loss"] * 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_loss_preset_trains_two_steps(tmp_path, preset):
    metrics = train(compose_config([*QUICK, f"loss={preset}", "trainer.max_steps=2", "trainer.save_final=false"]),
                    tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert torch.isfinite(torch.tensor(metrics["eval/loss"]))
    if preset.startswith("tidpo"):
        assert "importance/fallbacks" in train_rows[0]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_importance_pass_gives_the_separate_pass_weights_loss_and_gradients(checkpointing):
    """`loss.importance.grad_pass=fused` takes the saliency from the loss's own forward. On a dropout-free model
    (the tiny Llama) that is the same gradient as the separate pass: same weights, loss and parameter gradients,
    also with activation checkpointing."""
    results = {}
    for grad_pass in ("separate", "fused"):
        cfg, policy, reference, batch, ids = setup(["loss=tidpo", f"loss.importance.grad_pass={grad_pass}"])
        if checkpointing:
            policy.gradient_checkpointing_enable()
        policy.train()
        results[grad_pass] = loss_and_grads(cfg, policy, reference, batch, ids)
    (loss_s, grads_s, m_s), (loss_f, grads_f, m_f) = results["separate"], results["fused"]
    assert loss_f == pytest.approx(loss_s.item(), abs=1e-6)
    assert m_f["importance/max"] == pytest.approx(m_s["importance/max"], abs=1e-5)
    assert m_f["importance/entropy"] == pytest.approx(m_s["importance/entropy"], abs=1e-6)
    for a, b in zip(grads_f, grads_s):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_f)


def test_fused_pass_falls_back_to_the_separate_one_while_dropout_is_active(monkeypatch):
    from tidpo_cli import importance, objective

    calls = []
    monkeypatch.setattr(objective, "gradient_saliency",  # the separate pass's own forward and backward
                        lambda *a, **k: calls.append(1) or importance.gradient_saliency(*a, **k))
    cfg, policy, reference, batch, ids = setup(["loss=tidpo", "loss.importance.grad_pass=fused"])
    policy.train()
    batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
    assert calls == []  # no dropout: fused
    policy.config.attention_dropout = 0.1
    batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
    assert calls == [1]  # dropout would make the two passes differ: the separate one runs


def test_grad_pass_auto_is_fused_in_training_without_dropout():
    from tidpo_cli.objective import fused_pass

    cfg, policy, *_ = setup(["loss=tidpo"])
    assert cfg.loss.importance.grad_pass == "auto"  # the default
    policy.train()
    assert fused_pass(policy, cfg.loss.importance)
    with torch.no_grad():  # evaluation keeps no graph to take the gradient from
        assert not fused_pass(policy, cfg.loss.importance)
    separate = compose_config([*QUICK, "loss=tidpo", "loss.importance.grad_pass=separate"]).loss.importance
    assert not fused_pass(policy, separate)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_saliency_gradient_never_flows_through_the_forward_outputs(packed):
    """A DeepSpeed engine hooks the tensors its forward returns and takes any gradient through them for the start
    of its training backward (scaling it, then reducing gradients when it ends). The fused pass must take its
    saliency gradient around them: here the logits of every policy forward carry such a hook, which may fire once
    per forward, in the training backward, and not in the saliency's."""
    from tidpo_cli.packing import pack_pairs

    cfg, policy, reference, batch, ids = setup(["loss=tidpo_no_triplet", "loss.importance.grad_pass=fused"])
    if packed:
        batch = {**batch, **pack_pairs(batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"], ids.pad)}
    policy.train()
    fired, forwards = [], []

    def hook_outputs(module, args, kwargs, output):
        forwards.append(1)
        output.logits.register_hook(lambda grad: fired.append(torch.is_grad_enabled()))

    handle = policy.register_forward_hook(hook_outputs, with_kwargs=True)
    try:
        loss, metrics = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
        assert fired == []  # the saliency gradient is taken already, and went around the logits
        loss.backward()
    finally:
        handle.remove()
    assert len(forwards) == 1 and len(fired) == 1  # one policy forward, one backward through its outputs
    assert metrics.means()["importance/max"] > 1  # real gradient weights, not the uniform fallback
