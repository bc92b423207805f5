"""TIS-DPO token weights (tidpo_cli/tis.py): hand-worked cases, an independent loop implementation of the
authors' estimate, `estimate` against one-row-at-a-time forward passes, and the cache."""

import json
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import TokenizedPair
from tidpo_cli.losses import response_mask
from tidpo_cli.tis import cache_meta, estimate, estimate_by_key, load_cache, pair_key, save_cache, token_weights

VOCAB, PAD, EOS = 50, 0, 1


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    # float64 so padded-batch and single-row forwards agree far below the 2-decimal rounding.
    return LlamaForCausalLM(config).double()


def random_pairs(n: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, VOCAB) for _ in range(k)]  # noqa: E731  (3.. : never PAD/EOS/BOS)
    pairs = []
    for i in range(n):
        chosen = ids(rng.randint(1, 6)) + [EOS]
        rejected = ids(rng.randint(1, 6)) + ([EOS] if i % 3 else [])  # some responses cut (no EOS)
        pairs.append(TokenizedPair([2] + ids(rng.randint(1, 5)), chosen, rejected, f"t:{i}", i % 3 == 0))
    return pairs


# --- an independent implementation, written from the formula with plain loops ---------------------------------

def reference_weights(pos_row, neg_row, mask_row, chosen, transform="rank_based", round_digits=2, **p):
    """One row: lists in, list out (0 off the mask). s = +-(log p+ - log p-), + on chosen, rounded."""
    idx = [t for t, m in enumerate(mask_row) if m]
    s = []
    for t in idx:
        diff = float(pos_row[t]) - float(neg_row[t])
        if not chosen:
            diff = -diff
        s.append(round(diff, round_digits) if round_digits is not None else diff)
    n = len(s)
    w = []
    for i, x in enumerate(s):
        if transform == "rank_based":
            # rank = how many scores are smaller, or equal and earlier (a stable ascending sort)
            rank = sum(1 for j, y in enumerate(s) if y < x or (y == x and j < i))
            w.append(1.0 if n == 1 else p.get("min_scale", 0.7) + rank / (n - 1) * (p.get("max_scale", 1.3)
                                                                                   - p.get("min_scale", 0.7)))
        elif transform == "threshold_and_scale":
            lo, hi, a, b = p.get("min_val", -1.5), p.get("max_val", 1.5), p.get("min_scale", 0.7), p.get("max_scale", 1.3)
            c = min(hi, max(lo, x))
            w.append(a + (c - lo) / (hi - lo) * (b - a))
        elif transform == "threshold":
            w.append(min(p.get("upper_threshold", 1.0), max(p.get("lower_threshold", -1.0), x)))
        elif transform == "binary":
            # walk the descending order; the LAST copy of a value decides (the authors' dict overwrite)
            keep = int(n * p.get("top_percent", 100) / 100)
            walk = sorted(range(n), key=lambda j: -s[j])
            decided = {}
            for place, j in enumerate(walk):
                decided[s[j]] = 1.0 if place < keep else 0.0
            w.append(decided[x])
        elif transform == "origin":
            w.append(x)
        elif transform == "exp":
            w.append(p["k"] * math.exp(p["mu"] * min(p["upper"], max(p["lower"], x))))
    out = [0.0] * len(mask_row)
    for t, v in zip(idx, w):
        out[t] = v
    return out


def random_logps(rows, width, seed, coarse=False):
    g = torch.Generator().manual_seed(seed)
    pos = -3 * torch.rand(rows, width, generator=g, dtype=torch.float64)
    neg = -3 * torch.rand(rows, width, generator=g, dtype=torch.float64)
    if coarse:  # put many differences on a 0.05 grid, so ties after rounding happen
        neg = pos - torch.randint(-8, 9, (rows, width), generator=g).double() * 0.05
    mask = torch.rand(rows, width, generator=g) < 0.7
    mask[:, 0] = False
    mask[0] = False  # an empty row
    mask[1] = False
    mask[1, 3] = True  # a one-token row
    return pos * mask, neg * mask, mask


# --- hand-worked cases --------------------------------------------------------------------------------------

def test_hand_worked_rank_based_sign_and_rounding():
    # Row 0 chosen, row 1 rejected, same log-probs; masked positions 1, 2, 3.
    #   log p+ = [-1.0, -2.0, -0.5], log p- = [-1.5, -1.0, -0.5]
    #   chosen   s = p+ - p- = [ 0.5, -1.0, 0.0] -> ascending ranks [2, 0, 1] -> 0.7 + r/2 * 0.6 = [1.3, 0.7, 1.0]
    #   rejected s = p- - p+ = [-0.5,  1.0, 0.0] -> ranks [0, 2, 1]         -> [0.7, 1.3, 1.0]
    # Row 2 chosen, positions 1, 2: p+ - p- = [0.123, 0.121] -> rounded [0.12, 0.12], a tie -> position order:
    #   [0.7, 1.3]  (unrounded the order would flip: [1.3, 0.7]).
    pos = torch.tensor([[0, -1.0, -2.0, -0.5, 0], [0, -1.0, -2.0, -0.5, 0], [0, -1.0, -1.0, 0, 0]])
    neg = torch.tensor([[0, -1.5, -1.0, -0.5, 0], [0, -1.5, -1.0, -0.5, 0], [0, -1.123, -1.121, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    w = token_weights(pos, neg, mask, chosen=torch.tensor([True, False, True]))
    expected = torch.tensor([[0, 1.3, 0.7, 1.0, 0], [0, 0.7, 1.3, 1.0, 0], [0, 0.7, 1.3, 0, 0]])
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, expected)
    unrounded = token_weights(pos, neg, mask, chosen=True, round_digits=None)
    torch.testing.assert_close(unrounded[2], torch.tensor([0, 1.3, 0.7, 0, 0]))


def test_hand_worked_other_transforms():
    # One chosen row, s = p+ - p- = [0.5, -2.0, 3.0, 0.0] (p- = 0).
    pos = torch.tensor([[0.5, -2.0, 3.0, 0.0]])
    neg = torch.zeros(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    # threshold_and_scale: clamp to [-1.5, 1.5], 0.7 + (c + 1.5) / 3 * 0.6: 0.5 -> 1.1, -2 -> 0.7, 3 -> 1.3, 0 -> 1.0
    torch.testing.assert_close(token_weights(pos, neg, mask, chosen=True, transform="threshold_and_scale"),
                               torch.tensor([[1.1, 0.7, 1.3, 1.0]]))
    # threshold: clamp to [-1, 1]
    torch.testing.assert_close(token_weights(pos, neg, mask, chosen=True, transform="threshold"),
                               torch.tensor([[0.5, -1.0, 1.0, 0.0]]))
    # binary, top 50 %: int(4 * 50 / 100) = 2 -> the two largest (3.0, 0.5) get 1
    torch.testing.assert_close(token_weights(pos, neg, mask, chosen=True, transform="binary", top_percent=50),
                               torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    # binary with the repo's default top_percent 100: all ones (plain DPO)
    torch.testing.assert_close(token_weights(pos, neg, mask, chosen=True, transform="binary"), torch.ones(1, 4))
    # paper form, k = 2, mu = 0.5, [L, U] = [-1, 1]: 2e^0.25, 2e^-0.5, 2e^0.5, 2
    e = math.exp
    torch.testing.assert_close(
        token_weights(pos, neg, mask, chosen=True, transform="exp", k=2.0, mu=0.5, lower=-1.0, upper=1.0),
        torch.tensor([[2 * e(0.25), 2 * e(-0.5), 2 * e(0.5), 2.0]]))
    # same row as a rejected response: s flips sign -> exp weights 2e^-0.25, 2e^0.5, 2e^-0.5, 2
    torch.testing.assert_close(
        token_weights(pos, neg, mask, chosen=False, transform="exp", k=2.0, mu=0.5, lower=-1.0, upper=1.0),
        torch.tensor([[2 * e(-0.25), 2 * e(0.5), 2 * e(-0.5), 2.0]]))


def test_binary_ties_follow_the_authors_last_copy_rule():
    # s = [0.1, 0.1, 0.0], top 34 %: keep int(3 * 34 / 100) = 1 place; both 0.1's last copy sits at place 1 >= 1
    # -> 0 for both (a plain top-1 would give one of them 1).
    pos = torch.tensor([[0.1, 0.1, 0.0]])
    w = token_weights(pos, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), chosen=True, transform="binary",
                      top_percent=34)
    torch.testing.assert_close(w, torch.zeros(1, 3))


def test_random_transform_is_in_range_and_seeded():
    pos, neg, mask = random_logps(6, 12, seed=5)
    a = token_weights(pos, neg, mask, chosen=True, transform="random", generator=torch.Generator().manual_seed(1))
    b = token_weights(pos, neg, mask, chosen=True, transform="random", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert ((a[mask] >= 0.7) & (a[mask] <= 1.3)).all() and (a[~mask] == 0).all()


def test_bad_arguments():
    pos, neg, mask = random_logps(3, 5, seed=0)
    with pytest.raises(ValueError, match="unknown transform"):
        token_weights(pos, neg, mask, chosen=True, transform="softmax")
    with pytest.raises(ValueError, match="lower"):
        token_weights(pos, neg, mask, chosen=True, transform="exp")
    with pytest.raises(ValueError, match="chosen"):
        token_weights(pos, neg, mask, chosen=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="shapes"):
        token_weights(pos, neg[:, :4], mask, chosen=True)


# --- against the independent loops ---------------------------------------------------------------------------

CASES = [
    ("rank_based", {}), ("rank_based", {"min_scale": 0.5, "max_scale": 1.5}), ("threshold_and_scale", {}),
    ("threshold_and_scale", {"min_val": -2.0, "max_val": 2.0, "min_scale": 0.5, "max_scale": 1.5}),
    ("threshold", {}), ("binary", {}), ("binary", {"top_percent": 50}), ("binary", {"top_percent": 75}),
    ("origin", {}), ("exp", {"k": 1.0, "mu": 1.0, "lower": -0.5, "upper": 1.5}),
]


@pytest.mark.parametrize("transform,params", CASES)
@pytest.mark.parametrize("coarse", [False, True])
def test_matches_independent_loops(transform, params, coarse):
    pos, neg, mask = random_logps(8, 15, seed=3, coarse=coarse)
    chosen = torch.tensor([True, False, True, True, False, False, True, False])
    got = token_weights(pos, neg, mask, chosen=chosen, transform=transform, **params)
    for row in range(8):
        want = reference_weights(pos[row].tolist(), neg[row].tolist(), mask[row].tolist(), bool(chosen[row]),
                                 transform, **params)
        torch.testing.assert_close(got[row], torch.tensor(want, dtype=torch.float32))


def test_rank_weights_depend_on_the_sign():
    pos, neg, mask = random_logps(4, 20, seed=8)
    as_chosen = token_weights(pos, neg, mask, chosen=True)
    as_rejected = token_weights(pos, neg, mask, chosen=False)
    swapped = token_weights(neg, pos, mask, chosen=True)
    torch.testing.assert_close(as_rejected, swapped)
    assert not torch.allclose(as_chosen, as_rejected)
    # rank weights: on each row of >= 2 tokens, the extremes are exactly min_scale and max_scale
    for row in range(2, 4):
        values = as_chosen[row][mask[row]]
        assert values.min().item() == pytest.approx(0.7) and values.max().item() == pytest.approx(1.3)


# --- estimate against one row at a time ----------------------------------------------------------------------

def single_row_logps(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    return [logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(response)]


@pytest.mark.parametrize("eos_id", [EOS, None])
def test_estimate_matches_single_row_forwards(eos_id):
    positive, negative = tiny_llama(0), tiny_llama(1)
    positive.train()  # estimate must run in eval mode and hand each model's mode back
    negative.eval()
    pairs = random_pairs(7, seed=4)
    batches = [collate(pairs[:4], PAD), collate(pairs[4:], PAD)]
    got = estimate(positive, negative, batches, eos_id=eos_id)
    assert positive.training and not negative.training
    assert len(got) == len(pairs)
    for pair, (chosen_w, rejected_w) in zip(pairs, got):
        for response, is_chosen, w in [(pair.chosen_ids, True, chosen_w), (pair.rejected_ids, False, rejected_w)]:
            p = single_row_logps(positive, pair.prompt_ids, response)
            n = single_row_logps(negative, pair.prompt_ids, response)
            drop_eos = eos_id is not None and response[-1] == eos_id
            keep = [True] * (len(response) - 1) + [not drop_eos]
            want = reference_weights(p, n, keep, is_chosen)
            assert len(w) == len(response)
            assert w == pytest.approx(want, abs=1e-6)
            if drop_eos:
                assert w[-1] == 0.0


def test_estimate_list_order_is_the_response_mask_order():
    positive, negative = tiny_llama(2), tiny_llama(3)
    pairs = random_pairs(3, seed=9)
    batch = collate(pairs, PAD)
    got = estimate(positive, negative, [batch], eos_id=EOS, transform="origin", round_digits=None)
    mask = response_mask(batch["labels"])
    for i, (c, r) in enumerate(got):
        assert len(c) == int(mask[i].sum()) and len(r) == int(mask[len(pairs) + i].sum())
        # origin + no rounding: chosen weight of token k is log p+ - log p- at that token
        p = single_row_logps(positive, pairs[i].prompt_ids, pairs[i].chosen_ids)
        n = single_row_logps(negative, pairs[i].prompt_ids, pairs[i].chosen_ids)
        assert c[:-1] == pytest.approx([a - b for a, b in zip(p, n)][:-1], abs=1e-6)  # float32 weights


# --- cache ---------------------------------------------------------------------------------------------------

def test_pair_key_is_stable_and_sees_every_id():
    a = TokenizedPair([2, 5], [6, 1], [7, 1], "x:1", False)
    assert pair_key(a) == pair_key(TokenizedPair([2, 5], [6, 1], [7, 1], "other:9", True))
    assert len(pair_key(a)) == 64 and int(pair_key(a), 16) >= 0
    assert pair_key(a) != pair_key(TokenizedPair([2], [5, 6, 1], [7, 1], "x:1", False))  # moved boundary
    assert pair_key(a) != pair_key(TokenizedPair([2, 5], [7, 1], [6, 1], "x:1", False))  # swapped sides
    assert pair_key(a) != pair_key(TokenizedPair([2, 5], [6, 1], [8, 1], "x:1", False))


def test_cache_round_trip_and_refusal(tmp_path):
    positive, negative = tiny_llama(0), tiny_llama(1)
    pairs = random_pairs(5, seed=1)
    weights = estimate_by_key(positive, negative, pairs, PAD, batch_size=2, eos_id=EOS)
    assert set(weights) == {pair_key(p) for p in pairs}
    pos_dir, neg_dir = tmp_path / "pos", tmp_path / "neg"
    pos_dir.mkdir()
    neg_dir.mkdir()
    meta = cache_meta(pos_dir, neg_dir, eos_id=EOS)
    path = tmp_path / "cache" / "tis.json"
    assert load_cache(path, meta) is None  # no file yet
    save_cache(path, weights, meta)
    assert [p.name for p in path.parent.iterdir()] == ["tis.json"]  # no temporary file left behind
    loaded = load_cache(path, meta)
    assert loaded == weights  # exact floats
    # the same settings spelled out (defaults) and the same paths spelled relatively are the same cache
    assert load_cache(path, cache_meta(pos_dir, neg_dir, eos_id=EOS, min_scale=0.7, transform="rank_based")) == weights
    # other models, other settings: refused
    assert load_cache(path, cache_meta(neg_dir, pos_dir, eos_id=EOS)) is None
    assert load_cache(path, cache_meta(pos_dir, tmp_path / "other", eos_id=EOS)) is None
    assert load_cache(path, cache_meta(pos_dir, neg_dir, eos_id=EOS, min_scale=0.6)) is None
    assert load_cache(path, cache_meta(pos_dir, neg_dir, eos_id=None)) is None
    assert load_cache(path, cache_meta(pos_dir, neg_dir, eos_id=EOS, transform="threshold_and_scale")) is None
    # overwriting replaces the whole file
    save_cache(path, {}, meta)
    assert load_cache(path, meta) == {}
    # a file that is not a cache is an error, not a silent miss
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable"):
        load_cache(path, meta)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a TIS weight cache"):
        load_cache(path, meta)


def test_cache_meta_rejects_unknown_settings(tmp_path):
    with pytest.raises(ValueError, match="not token_weights hyper-parameters"):
        cache_meta("a", "b", eos_id=1, min_scal=0.7)
    with pytest.raises(ValueError, match="chosen"):
        cache_meta("a", "b", eos_id=1, chosen=True)
    m = cache_meta("hub/pos", "hub/neg", eos_id=1)
    assert m["positive_model"] == "hub/pos" and m["hparams"]["transform"] == "rank_based"
    assert m["hparams"]["round_digits"] == 2 and m["hparams"]["lower"] is None
