"""TI-DPO wired into a step: the ablation that must equal DPO, the metrics, and every loss preset training."""

import json

import pytest
import torch

from helpers import QUICK, REPO, compose_config
from tidpo_cli.anchors import anchor_batch
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.importance import token_importance
from tidpo_cli.losses import triplet_loss
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds, batch_loss
from tidpo_cli.trainer import train

# tis_dpo needs two trained contrastive models: test_loss_composition.py runs its recipe end to end.
PRESETS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml") if p.stem not in ("base", "tis_dpo"))


def setup(loss_overrides, share_prompt=False):
    cfg = compose_config([*QUICK, *loss_overrides])
    tokenizer = load_tokenizer(cfg.model)
    batch = collate(load_splits(cfg.data, tokenizer, seed=0).train[:6], tokenizer.pad_token_id,
                    share_prompt=share_prompt)
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


# --- The objective recomputed from METHOD.md, independently of objective.py: plain forwards of the unpacked rows, the
# public `token_importance` for the weights, and the formulas of METHOD §2 and §3 written out here.

def plain_forward(model, input_ids, attention_mask, prompt_lengths):
    """(logits [N, T, V] in fp32, log p(token t | tokens < t) [N, T] (0 at t = 0), response positions [N, T] bool:
    from each row's prompt end to its last attended token)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)
    positions = torch.arange(input_ids.shape[1])[None, :]
    response = (positions >= prompt_lengths[:, None]) & attention_mask.bool()
    return logits, logp, response


def response_values(values, response):
    """Each row's values at its response positions, left-aligned and zero-padded, with a bool mask: [N, L]."""
    rows = [v[m] for v, m in zip(values, response)]
    width = max(len(r) for r in rows)
    out, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)], mask[i, :len(r)] = r, True
    return out, mask


def expected_triplet(policy, reference, batch, anchors, margin):
    """METHOD §3: `triplet_loss` on the anchor's, the chosen and the rejected per-token log-ratios, each over its own
    response tokens, rebuilt from plain forwards of the anchor rows and the pairs' rows."""
    half = batch["input_ids"].shape[0] // 2
    ratios = {}
    for name, rows in (("pairs", batch), ("anchors", anchors)):
        args = rows["input_ids"], rows["attention_mask"], rows["prompt_lengths"]
        _, logp, response = plain_forward(policy, *args)
        _, ref_logp, _ = plain_forward(reference, *args)
        ratios[name] = response_values(logp - ref_logp, response)
    (m, m_mask), (d, d_mask) = ratios["pairs"], ratios["anchors"]
    return triplet_loss(d, d_mask, m[:half], m_mask[:half], m[half:], m_mask[half:], margin)


def expected_loss(policy, reference, batch, loss_cfg, anchors=None):
    """METHOD §2 (+ gamma x §3) summed over the pairs: M(y) = sum_t w_t m_t over the response tokens,
    K(y) = sum_t KL(pi_ref || pi_theta) over the full vocabulary at the response positions,
    z = M(y_w) - M(y_l) - alpha (K(y_l) - K(y_w)), loss = -log sigmoid(beta z)."""
    ids, mask, prompt_lengths = batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"]
    half = ids.shape[0] // 2
    logits, logp, response = plain_forward(policy, ids, mask, prompt_lengths)
    ref_logits, ref_logp, _ = plain_forward(reference, ids, mask, prompt_lengths)
    imp = loss_cfg.importance
    span = response if imp.span == "response" else mask.bool()
    w = (token_importance(policy, ids, mask, span, lam=imp.lam, sigma_div=imp.sigma_div)
         if imp.mode == "gradient" else torch.ones_like(logp))
    M = (w * (logp - ref_logp) * response).sum(-1)
    log_ref, log_pol = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    kl = (log_ref.exp() * (log_ref - log_pol)).sum(-1)  # at position t: the distribution of token t + 1
    K = (kl[:, :-1] * response[:, 1:]).sum(-1)
    z = (M[:half] - M[half:]) - loss_cfg.alpha * (K[half:] - K[:half])
    total = -torch.nn.functional.logsigmoid(loss_cfg.beta * z).sum()
    if anchors is not None:
        total = total + loss_cfg.gamma * half * expected_triplet(policy, reference, batch, anchors,
                                                                 loss_cfg.triplet.margin)
    return total.item()


@pytest.mark.parametrize("overrides, packed", [
    (["loss=tidpo_no_triplet"], False),
    (["loss=tidpo_no_triplet"], True),
    (["loss=tidpo_code"], False),  # weighted TDPO2 (alpha 0.5), span prompt_response, triplet; packing refuses it
    (["loss=tidpo_code", "loss.importance.span=response"], True),  # its KL and anchors in the packed layout
], ids=["no_triplet", "no_triplet-packed", "code", "code-response_span-packed"])
def test_batch_loss_equals_the_method_recomputed_from_plain_forwards(overrides, packed):
    cfg, policy, reference, batch, ids = setup(overrides, share_prompt=packed)
    assert ("packed_ids" in batch) == packed
    policy.train()  # as the loop runs it
    anchors = None
    if cfg.loss.gamma:  # the anchors batch_loss samples itself with this seed
        anchors = anchor_batch(batch, policy, cfg.loss.anchor, pad_id=ids.pad, eos_id=ids.eos,
                               max_length=ids.max_length, seed=0)
    expected = expected_loss(policy, reference, batch, cfg.loss, anchors)
    loss, _ = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    dpo = expected_loss(policy, reference, batch, compose_config([*QUICK, "loss=dpo"]).loss)
    assert abs(expected - dpo) > 1e-3  # the weights (and KL, triplet) move the loss well beyond the tolerance


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
    # The triplet term rebuilt here: the anchors batch_loss samples with seed 0, and the anchor's, chosen and
    # rejected log-ratios from plain forwards; gamma scales it into the loss (gamma 0: the loss drops by it).
    anchors = anchor_batch(batch, policy, cfg.loss.anchor, pad_id=ids.pad, eos_id=ids.eos, max_length=ids.max_length,
                           seed=0)
    triplet = expected_triplet(policy, reference, batch, anchors, cfg.loss.triplet.margin).item()
    assert triplet > 0.01  # an active hinge, so a swapped positive and negative would show
    assert metrics["triplet/loss"] == pytest.approx(triplet, rel=1e-4)
    cfg0 = compose_config([*QUICK, "loss=tidpo", "loss.gamma=0"])
    loss0, _, _ = loss_and_grads(cfg0, policy, reference, batch, ids)
    assert loss.item() == pytest.approx(loss0.item() + cfg.loss.gamma * triplet * 6, rel=1e-5)


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
