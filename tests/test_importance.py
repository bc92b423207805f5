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


# --- The other saliency targets and attributions (loss.importance.target / attribution), in both passes and both
# batch layouts, against central finite differences of targets written out here from the model's plain logits.

PAIRS = [([257, 72, 105], [33, 10, 44, 258], [97, 258]), ([257, 50], [60, 61, 258], [62, 63, 64, 65, 258])]


TARGET_NAMES = ("last_max_logit", "sequence_logp", "margin")


def finite_difference_gradients(model, row_ids, prompt_length, sign, h=1e-5):
    """{target: [T, H] d target / d e} by central differences, each target computed from the full logits of one
    unpadded row: last_max_logit = the largest logit at the last token; sequence_logp = sum over the response tokens
    of log softmax(logits at t - 1)[token t]; margin = sign * sequence_logp (the pair's log p(chosen) -
    log p(rejected) as a function of this row's embeddings: the other row's term does not move)."""
    ids = torch.tensor([row_ids])
    embeds = model.get_input_embeddings()(ids).detach()

    def values(e):
        with torch.no_grad():
            logits = model(inputs_embeds=e).logits[0]
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        total = logp[prompt_length - 1:].sum().item()  # the tokens from prompt_length on
        return torch.tensor([logits[-1].max().item(), total, sign * total], dtype=torch.float64)

    grad = torch.zeros((len(TARGET_NAMES), *embeds.shape[1:]), dtype=torch.float64)
    for position in range(embeds.shape[1]):
        for dim in range(embeds.shape[2]):
            plus, minus = embeds.clone(), embeds.clone()
            plus[0, position, dim] += h
            minus[0, position, dim] -= h
            grad[:, position, dim] = (values(plus) - values(minus)) / (2 * h)
    return dict(zip(TARGET_NAMES, grad)), embeds[0]


@pytest.fixture(scope="module")
def float64_model():
    patch = pytest.MonkeyPatch()
    patch.setattr(LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    yield tiny_model(torch.float64, attn="sdpa")
    patch.undo()


@pytest.fixture(scope="module")
def expected_saliency(float64_model):
    """{(target, attribution): [(row, position, prompt length, value)]} from finite differences, for every row of the
    collated PAIRS (chosen rows, then rejected rows) and every position of that row."""
    model = float64_model.eval()
    rows = [(p + c, len(p), 1.0) for p, c, _ in PAIRS] + [(p + r, len(p), -1.0) for p, _, r in PAIRS]
    expected = {}
    for row, (ids, prompt_length, sign) in enumerate(rows):
        grads, embeds = finite_difference_gradients(model, ids, prompt_length, sign)
        for target, grad in grads.items():
            for attribution, values in (("grad_l1", grad.abs().sum(-1)),
                                        ("grad_x_input", (grad * embeds).abs().sum(-1))):
                expected.setdefault((target, attribution), []).extend(
                    (row, position, prompt_length, value.item()) for position, value in enumerate(values))
    return expected


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("attribution", ["grad_l1", "grad_x_input"])
@pytest.mark.parametrize("target", ["last_max_logit", "sequence_logp", "margin"])
def test_targets_and_attributions_match_finite_differences_in_both_passes(float64_model, expected_saliency, target,
                                                                         attribution, packed):
    from tidpo_cli.data.collate import collate
    from tidpo_cli.data.examples import TokenizedPair
    from tidpo_cli.importance import saliency_from_forward
    from tidpo_cli.layouts import layout_of
    from tidpo_cli.objective import forward_from_embeddings, saliency_targets

    model = float64_model
    model.train()  # the separate pass switches dropout off itself; the fused one runs as the loss's forward does
    batch = collate([TokenizedPair(p, c, r, "test", False) for p, c, r in PAIRS], 256, share_prompt=packed)
    layout = layout_of(batch)
    separate = layout.unpack(gradient_saliency(
        model, layout.ids(), **layout.model_kwargs(model), attribution=attribution,
        target_values=lambda hidden: saliency_targets(model, hidden, batch, slice(None), target)))
    forwarded = forward_from_embeddings(model, batch)
    fused = layout.unpack(saliency_from_forward(
        forwarded[3], saliency_targets(model, forwarded[4], batch, slice(0, 4), target), attribution))
    assert model.training
    for row, position, prompt_length, value in expected_saliency[(target, attribution)]:
        if packed and position < prompt_length:
            continue  # a packed batch's prompt is shared by both responses: its gradient is theirs summed
        for raw in (separate, fused):
            assert raw[row, position].item() == pytest.approx(value, rel=1e-6, abs=1e-9), (row, position)


def test_sequence_targets_leave_the_last_token_without_gradient_and_margin_is_sequence_logp_up_to_sign(
        expected_saliency):
    """Nothing is predicted from a response's last token, so the log-likelihood targets give it no gradient; and a
    row's log-likelihood depends on its own embeddings only, so the margin's absolute attribution is the
    sequence log-likelihood's."""
    for attribution in ("grad_l1", "grad_x_input"):
        sequence = expected_saliency[("sequence_logp", attribution)]
        margin = expected_saliency[("margin", attribution)]
        assert [v for *_, v in margin] == pytest.approx([v for *_, v in sequence], rel=1e-9, abs=1e-12)
        lasts = {row: position for row, position, *_ in sequence}
        assert all(abs(v) < 1e-6 for row, position, _, v in sequence if position == lasts[row])
        assert any(v > 1e-3 for *_, v in sequence)


def test_exclude_last_by_hand():
    # raw over a 4-token span [1, 3, 0, 4]; the last token is left out and weighs 1. The other three: I = [1/4, 3/4, 0],
    # their own prior over 3 positions, W = 0.7 I + 0.3 P, scaled to sum 3 (mean 1 among themselves).
    raw = torch.tensor([[9.0, 1.0, 3.0, 0.0, 4.0, 9.0]])
    span = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    prior = hand_prior(3, 4.0)
    mixed = [0.7 * i + 0.3 * p for i, p in zip([1 / 4, 3 / 4, 0], prior)]
    expected = [0.0] + [3 * m / sum(mixed) for m in mixed] + [1.0, 0.0]
    result = mix_weights(raw, span, lam=0.7, sigma_div=4.0, exclude_last=True)
    assert result.weights[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert result.weights[0, 1:5].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert result.fallbacks == 0
    # A span of two tokens leaves one to normalise: all 1, counted as a fallback; zero saliency: the prior alone.
    short = mix_weights(torch.tensor([[5.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool), lam=0.7, sigma_div=4.0,
                        exclude_last=True)
    assert short.weights.tolist() == [[1.0, 1.0]] and short.fallbacks == 1
    zero = mix_weights(torch.tensor([[0.0, 0.0, 0.0, 7.0]]), torch.ones(1, 4, dtype=torch.bool), lam=0.7,
                       sigma_div=4.0, exclude_last=True)
    assert zero.weights[0].tolist() == pytest.approx([3 * p for p in prior] + [1.0], abs=1e-6)
    assert zero.fallbacks == 1
