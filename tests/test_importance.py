"""Token importance (METHOD §1): the gradient against finite differences, the prior by hand, fallbacks,
and a backward pass that leaves every parameter gradient alone."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tidpo_cli.importance import gradient_saliency, importance_pass, mix_weights, token_importance, weight_stats
from tidpo_cli.modeling import build_tiny_llama
from tidpo_cli.tokenizer import build_byte_tokenizer

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}


def tiny_model(dtype=torch.float32, seed=0, attn="eager"):
    torch.manual_seed(seed)
    return build_tiny_llama(TINY, build_byte_tokenizer(), dtype=dtype, attn_implementation=attn)


def rms_norm_in_input_dtype(self, hidden_states):
    # Llama's RMSNorm computes in float32 whatever the input dtype; a float64 check needs float64 throughout.
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_saliency_matches_central_finite_differences_in_float64(monkeypatch):
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    model = tiny_model(torch.float64, attn="sdpa")  # eager attention takes its softmax in float32
    model.train()  # the pass must switch dropout off itself and restore the mode
    input_ids = torch.tensor([[257, 72, 105, 33, 10, 258], [257, 97, 98, 258, 256, 256]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    raw = gradient_saliency(model, input_ids, attention_mask)
    assert model.training

    # Independent route: the full model on perturbed embeddings, target = max logit at the last real token.
    model.eval()
    h = 1e-5
    for row, last in [(0, 5), (1, 3)]:
        embeds = model.get_input_embeddings()(input_ids[row: row + 1]).detach()
        mask = attention_mask[row: row + 1]

        def target(e):
            with torch.no_grad():
                return model(inputs_embeds=e, attention_mask=mask).logits[0, last].max().item()

        for position in range(last + 1):
            l1 = 0.0
            for dim in range(embeds.shape[-1]):
                plus, minus = embeds.clone(), embeds.clone()
                plus[0, position, dim] += h
                minus[0, position, dim] -= h
                l1 += abs((target(plus) - target(minus)) / (2 * h))
            assert raw[row, position].item() == pytest.approx(l1, rel=1e-6)


def test_saliency_touches_no_parameter_gradient():
    model = tiny_model()
    input_ids = torch.randint(0, 256, (3, 7))
    mask = torch.ones_like(input_ids)
    # Fresh model: every .grad is None and stays None.
    gradient_saliency(model, input_ids, mask)
    assert all(p.grad is None for p in model.parameters())
    # Mid-accumulation: the accumulated gradients are left exactly as they were.
    model(input_ids=input_ids, attention_mask=mask).logits.sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    importance_pass(model, input_ids, mask, mask, mode="gradient")
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


def hand_prior(n, sigma_div):
    mu, sigma = (n - 1) / 2, n / sigma_div
    values = [math.exp(-0.5 * ((t - mu) / sigma) ** 2) for t in range(n)]
    return [v / sum(values) for v in values]


def test_lambda_zero_gives_the_normalised_prior_scaled_to_mean_one():
    span = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    raw = torch.rand(2, 8) + 0.1
    result = mix_weights(raw, span, lam=0.0, sigma_div=4.0)
    expected_row0 = [0, 0] + [5 * p for p in hand_prior(5, 4.0)] + [0]
    expected_row1 = [0] + [3 * p for p in hand_prior(3, 4.0)] + [0, 0, 0, 0]
    assert result.weights[0].tolist() == pytest.approx(expected_row0, abs=1e-6)
    assert result.weights[1].tolist() == pytest.approx(expected_row1, abs=1e-6)
    assert result.fallbacks == 0


def test_mixing_by_hand():
    # raw over a 4-token span: [1, 3, 0, 4] -> I = [1/8, 3/8, 0, 4/8]; W = 0.7 I + 0.3 P, then mean 1.
    raw = torch.tensor([[1.0, 3.0, 0.0, 4.0]])
    span = torch.ones(1, 4, dtype=torch.bool)
    prior = hand_prior(4, 4.0)
    mixed = [0.7 * i + 0.3 * p for i, p in zip([1 / 8, 3 / 8, 0, 4 / 8], prior)]
    expected = [4 * m / sum(mixed) for m in mixed]
    weights = mix_weights(raw, span, lam=0.7, sigma_div=4.0).weights
    assert weights[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert weights.sum().item() == pytest.approx(4.0, abs=1e-5)


def test_softmax_normalisation_and_no_prior():
    raw = torch.tensor([[0.0, 1.0, 2.0]])
    span = torch.ones(1, 3, dtype=torch.bool)
    soft = [math.exp(v) for v in (0.0, 1.0, 2.0)]
    expected = [3 * s / sum(soft) for s in soft]
    weights = mix_weights(raw, span, lam=1.0, sigma_div=4.0, prior="none", normalize="softmax").weights
    assert weights[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_fallbacks_are_counted():
    raw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    span = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    result = mix_weights(raw, span, lam=0.7, sigma_div=4.0)
    assert result.fallbacks == 2  # row 0: zero saliency -> prior alone; row 1: a single span token -> 1
    assert result.weights[0, :3].tolist() == pytest.approx([3 * p for p in hand_prior(3, 4.0)], abs=1e-6)
    assert result.weights[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert result.weights[2].sum().item() == pytest.approx(4.0, abs=1e-5)


def test_token_importance_public_api_shape_mean_and_detached():
    model = tiny_model()
    input_ids = torch.randint(0, 256, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    span = torch.zeros_like(input_ids, dtype=torch.bool)
    span[0, 4:9] = True
    span[1, 3:7] = True
    w = token_importance(model, input_ids, attention_mask, span, lam=0.7, sigma_div=4.0)
    assert w.shape == (2, 9) and w.dtype == torch.float32 and not w.requires_grad
    assert (w[~span] == 0).all()
    assert w[0, 4:9].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w[1, 3:7].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_uniform_and_random_modes():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(ids)
    span = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(importance_pass(model, ids, mask, span, mode="uniform").weights, span.float())
    a = importance_pass(model, ids, mask, span, mode="random", generator=torch.Generator().manual_seed(1)).weights
    b = importance_pass(model, ids, mask, span, mode="random", generator=torch.Generator().manual_seed(1)).weights
    c = importance_pass(model, ids, mask, span, mode="random", generator=torch.Generator().manual_seed(2)).weights
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[0, 1:].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_weight_stats_by_hand():
    weights = torch.tensor([[1.0, 1.0, 0.0], [0.5, 1.5, 0.0]])
    span = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    stats = weight_stats(weights, span)
    # row 0: p = [0.5, 0.5] -> ln 2; row 1: p = [0.25, 0.75]
    expected_entropy = math.log(2) - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert stats["importance/entropy"] == pytest.approx(expected_entropy, abs=1e-6)
    assert stats["importance/max"] == pytest.approx(1.0 + 1.5)
