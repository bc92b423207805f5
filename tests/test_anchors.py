"""Anchor sampling: reproducible, bounded by max_new_tokens and EOS, correct for ragged prompt batches."""

import pytest
import torch

from tidpo_cli.anchors import anchor_batch, anchor_contexts, generate
from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import TokenizedPair
from tidpo_cli.losses import IGNORE_INDEX
from tidpo_cli.modeling import build_tiny_llama
from tidpo_cli.tokenizer import build_byte_tokenizer

TOKENIZER = build_byte_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
CONTEXTS = [torch.tensor([257, 10, 11]), torch.tensor([257, 20, 21, 22, 23, 24, 25]), torch.tensor([257, 30, 31, 32, 33])]


def model(seed=0):
    torch.manual_seed(seed)
    return build_tiny_llama({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 2}, TOKENIZER)


def sample(m, seed, **kw):
    options = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95, seed=seed)
    return generate(m, CONTEXTS, **{**options, **kw})


def test_sampling_is_reproducible_under_a_seed_and_leaves_the_global_rng_alone():
    m = model()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = sample(m, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = sample(m, seed=7)
    c = sample(m, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(len(x) != len(y) or not torch.equal(x, y) for x, y in zip(a, c))


def test_max_new_tokens_and_eos_bound_every_anchor():
    m = model()
    for seed in range(4):
        for row in sample(m, seed=seed, max_new_tokens=5):
            assert 1 <= len(row) <= 5
            eos_at = (row == EOS).nonzero()
            if len(eos_at):  # ends at its first EOS, which it keeps
                assert int(eos_at[0]) == len(row) - 1


def test_a_model_that_says_eos_at_once_gives_one_token_anchors():
    m = model()
    boost = torch.zeros(len(TOKENIZER))
    boost[EOS] = 1e4
    m.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    assert [row.tolist() for row in sample(m, seed=0)] == [[EOS]] * 3


def test_ragged_prompts_in_one_batch_match_each_prompt_alone():
    """Left padding and positions are right: greedy (top_k=1) anchors of a batch equal those made one by one."""
    m = model()
    together = sample(m, seed=0, top_k=1)
    for context, row in zip(CONTEXTS, together):
        alone = generate(m, [context], pad_id=PAD, eos_id=EOS, max_new_tokens=12, temperature=1.0, top_k=1,
                         top_p=1.0, seed=0)[0]
        assert torch.equal(row, alone)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("rows, cache", [(None, 64), (lambda r: r + 5, 256), (lambda r: r, 16)])
def test_a_static_cache_and_dummy_rows_leave_the_eager_samples_as_they_are(monkeypatch, rows, cache):
    """The compiled path's shapes without the compile (HF's `disable_compile`, so it is fast): whatever the buckets
    (3 rows padded to 4 or to 8, or none; a cache of 64, 256 or 32 tokens), the real rows get the tokens the eager
    dynamic-cache path draws under the same seed."""
    from tidpo_cli import anchors
    m = model()
    eager = [sample(m, seed=s) for s in range(3)]
    original = anchors.static_cache
    monkeypatch.setattr(anchors, "static_cache", lambda *a: {**original(*a), "disable_compile": True})
    monkeypatch.setattr(anchors, "CACHE_BUCKET", cache)
    if rows:
        monkeypatch.setattr(anchors, "row_bucket", rows)
    assert all(same(sample(m, seed=s, compile=True), eager[s]) for s in range(3))


def test_under_autocast_the_compiled_path_draws_what_autocast_draws_from_the_fp32_weights(monkeypatch):
    """Under bf16 autocast the compiled path samples on the twin whose Linear weights hold their casts
    (twin.autocast_weights): the tokens of the model itself on that path's shapes (its static cache and dummy rows,
    not compiled: fast), for several seeds. Eager sampling leaves it to autocast's own cache."""
    from contextlib import contextmanager, nullcontext

    from tidpo_cli import anchors
    m = model()
    samplers, original = [], anchors.autocast_weights

    @contextmanager
    def seen(model, dtype):
        with original(model, dtype) as sampler:
            samplers.append((sampler is not model, dtype))
            yield sampler

    monkeypatch.setattr(anchors, "autocast_weights", seen)
    static_cache = anchors.static_cache
    monkeypatch.setattr(anchors, "static_cache", lambda *a: {**static_cache(*a), "disable_compile": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample(m, seed=0)
        assert samplers == []  # eager: no twin
        twin = [sample(m, seed=s, compile=True) for s in range(4)]
        assert samplers == [(True, torch.bfloat16)] * 4
        monkeypatch.setattr(anchors, "autocast_weights", lambda model, dtype: nullcontext(model))
        plain = [sample(m, seed=s, compile=True) for s in range(4)]
    assert all(same(a, b) for a, b in zip(twin, plain))


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_compiled_decoding_draws_the_eager_samples_and_compiles_once_per_bucket(monkeypatch, autocast):
    """Compiled for real on the CPU (the compile config's all-devices switch). The same tokens as eager, not only
    the same distribution: the compiled kernels round differently, but on this toy no draw sits near enough a
    boundary to flip. A second generation in the same buckets (other prompts, 4 rows, changed weights) compiles
    nothing new and draws the new weights' eager tokens. Also under bf16 autocast, as trainer.precision=bf16
    samples, where it runs on the twin whose Linear weights hold their casts. There bf16's coarse rounding does
    flip draws between compiled and eager kernels for some weights (the changed ones here), so the second
    generation is held to the model compiled as it is, which reads its weights afresh."""
    import contextlib

    from torch._dynamo.utils import counters
    m = model()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        before = counters["stats"]["unique_graphs"]
        assert same(sample(m, seed=3, compile=True), sample(m, seed=3))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > before  # it did compile
        others = [c[:-1] for c in CONTEXTS] + [CONTEXTS[1]]
        options = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95, seed=4)
        with torch.no_grad():
            m.lm_head.weight.mul_(3.0)  # a training step between: the compiled step must see the new weights
        compiled = generate(m, others, compile=True, **options)
        assert counters["stats"]["unique_graphs"] == graphs
        if not autocast:
            assert same(compiled, generate(m, others, **options))
        else:  # the twin's casts refreshed: what the model compiled as it is draws (casting every weight every token)
            from tidpo_cli import anchors
            monkeypatch.setattr(anchors, "autocast_weights", lambda model, dtype: contextlib.nullcontext(model))
            assert same(generate(m, others, compile=True, **options), compiled)


def test_compile_auto_is_off_on_the_cpu_and_a_bad_value_is_refused(monkeypatch):
    from helpers import compose_config
    from tidpo_cli import anchors
    from tidpo_cli.errors import ConfigError

    cfg = compose_config(["loss=tidpo"]).loss.anchor
    assert cfg.compile == "auto" and anchors.compiled_sampling("auto", torch.device("cuda", 0))
    seen = []
    monkeypatch.setattr(anchors, "generate", lambda model, contexts, **kw: seen.append(kw["compile"]) or
                        [torch.tensor([EOS])] * len(contexts))
    anchor_batch(collate(pairs(), PAD), model(), cfg, pad_id=PAD, eos_id=EOS, max_length=32, seed=0)
    assert seen == [False]
    assert compose_config(["loss=tidpo", "loss.anchor.compile=true"]).loss.anchor.compile is True
    with pytest.raises(ConfigError, match="loss.anchor.compile='maybe' is not allowed: expected one of auto"):
        compose_config(["loss=tidpo", "loss.anchor.compile=maybe"])


def test_generation_keeps_training_mode_and_needs_no_grad():
    m = model()
    m.train()
    inside = []  # (grad mode, dropout mode) at every forward of the sampling
    m.register_forward_hook(lambda module, args, out: inside.append((torch.is_grad_enabled(), module.training)))
    with torch.enable_grad():
        rows = sample(m, seed=0)
    assert len(inside) >= 2  # the prompt's forward and at least one decoding step's
    assert set(inside) == {(False, False)}  # no graph kept, dropout off
    assert m.training and torch.is_grad_enabled()  # both restored afterwards
    assert all(len(r) >= 1 for r in rows)


def pairs():
    return [TokenizedPair([257, 1, 2], [5, 6, 7, EOS], [5, 9, EOS], "a", False),
            TokenizedPair([257, 3], [8, 8, EOS], [8, 9, 9, 9, EOS], "b", False)]


def test_anchor_contexts_prompt_and_chosen_prefix():
    batch = collate(pairs(), PAD)
    prompt = anchor_contexts(batch, "prompt", 0.5)
    assert [c.tolist() for c in prompt] == [[257, 1, 2], [257, 3]]
    prefix = anchor_contexts(batch, "chosen_prefix", 0.5)
    assert [c.tolist() for c in prefix] == [[257, 1, 2, 5, 6], [257, 3, 8]]  # half of 4 and of 3 tokens


def test_anchor_batch_labels_cover_the_anchor_response_only():
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"source": "prompt", "prefix_fraction": 0.5, "max_new_tokens": 6, "temperature": 1.0,
                            "top_k": 0, "top_p": 1.0, "zero3_weights": "auto", "compile": "auto"})
    batch = collate(pairs(), PAD)
    anchors = anchor_batch(batch, model(), cfg, pad_id=PAD, eos_id=EOS, max_length=32, seed=0)
    assert anchors["input_ids"].shape[0] == 2
    for i, prompt_len in enumerate([3, 2]):
        labels, ids, mask = anchors["labels"][i], anchors["input_ids"][i], anchors["attention_mask"][i]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        n = int(mask.sum())
        assert 1 <= n - prompt_len <= 6
        assert torch.equal(labels[prompt_len:n], ids[prompt_len:n])
        assert (labels[n:] == IGNORE_INDEX).all()


def test_refresh_every_samples_the_anchors_of_k_steps_in_one_generation(tmp_path, monkeypatch):
    """Every pair still gets its own anchor, but all of a window's are sampled at its first step; a run resumed at
    a window's edge equals the uninterrupted one."""
    import json

    from helpers import QUICK, compose_config
    from tidpo_cli import anchors
    from tidpo_cli.trainer import train

    calls = []
    original = anchors.generate
    monkeypatch.setattr(anchors, "generate", lambda model, contexts, **kw: calls.append(len(contexts))
                        or original(model, contexts, **kw))
    run = [*QUICK, "loss=tidpo", "loss.anchor.refresh_every=3", "trainer.save_every=3", "trainer.save_final=false",
           "trainer.schedule=constant"]  # the same lr whatever max_steps, so stopping at 3 changes nothing
    train(compose_config([*run, "trainer.max_steps=6"]), tmp_path / "whole")
    assert calls == [24, 24]  # 3 steps x 8 pairs, twice

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["anchor/length"]) for r in rows if "anchor/length" in r]

    train(compose_config([*run, "trainer.max_steps=3"]), tmp_path / "resumed")
    train(compose_config([*run, "trainer.max_steps=6"]), tmp_path / "resumed")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert [s for s, *_ in resumed] == list(range(1, 7))
    for (_, a, la), (_, b, lb) in zip(whole, resumed):
        assert a == pytest.approx(b, abs=1e-6) and la == lb


def test_each_row_draws_on_its_own_whatever_it_is_batched_with():
    """A context's sample depends on its seed alone, not on the rows beside it: sampled alone, with others before
    or after it, or as part of two micro-batches in one generation (what a step of several micro-batches does)."""
    from omegaconf import OmegaConf

    from tidpo_cli.anchors import sample_anchors

    m = model()
    options = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95)
    together = generate(m, CONTEXTS, seed=[11, 12, 13], **options)
    alone = [generate(m, [c], seed=[s], **options)[0] for c, s in zip(CONTEXTS, [11, 12, 13])]
    reordered = generate(m, CONTEXTS[::-1], seed=[13, 12, 11], **options)[::-1]
    assert same(together, alone) and same(together, reordered)
    assert not same(together, generate(m, CONTEXTS, seed=[11, 12, 14], **options))  # the seed does matter

    cfg = OmegaConf.create({"source": "prompt", "prefix_fraction": 0.5, "max_new_tokens": 6, "temperature": 1.0,
                            "top_k": 0, "top_p": 1.0, "zero3_weights": "auto", "compile": False})
    first, second = collate(pairs(), PAD), collate(pairs()[::-1], PAD)
    merged = sample_anchors([first, second], m, cfg, pad_id=PAD, eos_id=EOS, max_length=32, seeds=[5, 6])
    apart = [anchor_batch(b, m, cfg, pad_id=PAD, eos_id=EOS, max_length=32, seed=s) for b, s in ((first, 5), (second, 6))]
    for a, b in zip(merged, apart):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))


def test_the_row_seeded_draw_samples_the_warped_distribution():
    """Gumbel-max over the warped scores: for fixed logits, the share of each token over many seeds is softmax(logits /
    temperature) within top-k / top-p (computed here by hand), and tokens outside them never come."""
    from tidpo_cli.anchors import sampling_processors

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    ids = torch.zeros(20000, 3, dtype=torch.long)
    seeds = torch.arange(20000)

    def shares(temperature, top_k, top_p):
        scores = sampling_processors(temperature, top_k, top_p, seeds, context_width=2)(ids, logits.clone())
        return torch.bincount(scores.argmax(-1), minlength=6).double() / 20000

    p = torch.softmax(logits[0].double() / 0.8, -1)
    assert torch.allclose(shares(0.8, 0, 1.0), p, atol=0.01)
    top3 = torch.softmax(logits[0, :3].double(), -1)
    got = shares(1.0, 3, 1.0)
    assert torch.allclose(got[:3], top3, atol=0.01) and got[3:].sum() == 0
    # top-p 0.7 over softmax(logits) = 0.56, 0.21, 0.13, ...: the smallest set holding 0.7 is the first two
    two = torch.softmax(logits[0, :2].double(), -1)
    got = shares(1.0, 0, 0.7)
    assert torch.allclose(got[:2], two, atol=0.01) and got[2:].sum() == 0


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_anchors_are_sampled_in_the_precision_of_the_forwards(tmp_path, monkeypatch, precision):
    """trainer.precision=bf16 is autocast around the loss's forwards; the step's anchors, sampled before them, are
    sampled under the same autocast (as the loss samples them itself when a batch comes without), not in fp32."""
    from helpers import QUICK, compose_config
    from tidpo_cli import anchors
    from tidpo_cli.trainer import train

    seen = []
    original = anchors.generate
    monkeypatch.setattr(anchors, "generate", lambda model, contexts, **kw: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))) or original(model, contexts, **kw))
    train(compose_config([*QUICK, "loss=tidpo", f"trainer.precision={precision}", "trainer.max_steps=2",
                          "trainer.save_final=false", "trainer.eval_before=false"]), tmp_path)
    assert len(seen) == 2  # one generation a step
    assert set(seen) == ({(True, torch.bfloat16)} if precision == "bf16" else {(False, torch.bfloat16)})


def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser on Python ints (Steele, Lea and Flood 2014; the constants of Vigna's splitmix64.c)."""
    m = (1 << 64) - 1
    z = (z * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_the_draws_noise_is_the_hash_of_seed_token_and_entry():
    """Each noise value is u = (top 53 bits of splitmix(splitmix(seed * 1000003 + token) + entry) + 0.5) / 2^53
    and the draw adds -log(-log u), computed here on Python ints, one value at a time."""
    import math

    from tidpo_cli.anchors import RowSeededDraw

    seeds, tokens, vocab = torch.tensor([0, 7, 123456789]), torch.tensor([0, 1, 5]), 40
    noise = RowSeededDraw.noise(seeds, tokens, vocab)
    assert noise.shape == (3, 3, vocab) and noise.dtype == torch.float64
    m = (1 << 64) - 1
    for r, seed in enumerate(seeds.tolist()):
        for t, token in enumerate(tokens.tolist()):
            for entry in (0, 1, 17, vocab - 1):
                key = _splitmix64((_splitmix64(seed * 1_000_003 + token) + entry) & m)
                u = ((key >> 11) + 0.5) * 2.0 ** -53
                assert math.isclose(float(noise[r, t, entry]), math.log(-math.log(u)), rel_tol=1e-14, abs_tol=1e-15)


@pytest.mark.parametrize("tokens_a_block", [1, 3])
def test_hashing_the_noise_a_block_of_tokens_at_once_draws_what_one_token_at_a_time_draws(monkeypatch,
                                                                                        tokens_a_block):
    """The draw hashes the noise of several tokens at once; blocks of 1 and 3 tokens (and one for the whole
    generation) give the same anchors, and the same as a generation of fewer tokens up to its end."""
    from tidpo_cli.anchors import RowSeededDraw

    m = model()
    whole = sample(m, 4, max_new_tokens=10)
    rows, vocab = len(CONTEXTS), m.config.vocab_size
    monkeypatch.setattr(RowSeededDraw, "BLOCK", rows * vocab * tokens_a_block)
    assert same(sample(m, 4, max_new_tokens=10), whole)
    shorter = sample(m, 4, max_new_tokens=4)
    assert all(torch.equal(s, w[:len(s)]) for s, w in zip(shorter, whole))
