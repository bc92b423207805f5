"""The diversity metrics of `tidpo eval --samples N` (the paper's Table B9): Distinct-n, Self-BLEU and the policy's
per-token entropy against values counted by hand on fixed strings and logits; and one tiny run's `tidpo eval
RUN --samples 4` printing them and writing them, defined, into eval.json and eval.md."""

import json
import math
from types import SimpleNamespace

import pytest
import sacrebleu
import torch

from transformers import AutoModelForCausalLM

from helpers import QUICK, compose_config
from tidpo_cli import evaluation
from tidpo_cli.cli import main
from tidpo_cli.diversity import DEFINITIONS, distinct_n, self_bleu, token_entropy
from tidpo_cli.evaluation import diversity_metrics, sample_entropy
from tidpo_cli.tokenizer import build_byte_tokenizer
from tidpo_cli.trainer import train

NAMES = ("samples/distinct_2", "samples/distinct_4", "samples/self_bleu", "samples/entropy")


@pytest.mark.parametrize("samples, n, expected", [
    # bigrams: "a b", "b c", "c d" | "a b", "b c", "c e": 6 in all, 4 distinct
    (["a b c d", "a b c e"], 2, 4 / 6),
    # 4-grams: "a b c d" | "a b c e": 2 in all, both distinct
    (["a b c d", "a b c e"], 4, 2 / 2),
    # bigrams: "a b", "b c", "c d", "d e" | "a b", "b c", "c d": 7 in all, 4 distinct
    (["a b c d e", "a b c d"], 2, 4 / 7),
    # 4-grams: "a b c d", "b c d e" | "a b c d": 3 in all, 2 distinct
    (["a b c d e", "a b c d"], 4, 2 / 3),
    # pooled over samples, not averaged per sample: each sample alone is 1.0, together "x y" repeats: 2 of 3
    (["x y", "x y z"], 2, 2 / 3),
    # a sample shorter than n adds no n-gram; words are split on any whitespace and compared case-sensitively
    (["a  b\nc", "b", "A b"], 2, 3 / 3),
])
def test_distinct_n_counts_distinct_over_all_ngrams_of_the_pooled_samples(samples, n, expected):
    assert distinct_n(samples, n) == pytest.approx(expected)


def test_distinct_n_of_samples_without_an_ngram_is_undefined_not_zero():
    assert distinct_n(["a b c", "d"], 4) is None and distinct_n([], 2) is None


def test_self_bleu_worked_out_by_hand():
    assert self_bleu([["a b c d", "a b c d"]]) == pytest.approx(100.0)  # identical: every precision 1, no penalty
    assert self_bleu([["a b c d", "e f g h"]]) == 0.0  # no n-gram in common: 0, smoothing or not
    # "a b c d" against "a b c e" (and back, the same counts): 1..4-gram matches 3/4, 2/3, 1/2, 0/1; `exp`
    # smoothing turns the first zero count into 1 / (2 * 1); same length, so no brevity penalty.
    by_hand = 100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** (1 / 4)
    assert self_bleu([["a b c d", "a b c e"]]) == pytest.approx(by_hand)
    # each sample against the *other* samples: the third matches nothing, the first two match each other
    assert self_bleu([["a b c d", "a b c d", "e f g h"]]) == pytest.approx((100 + 100 + 0) / 3)
    # the mean over prompts of each prompt's mean
    assert self_bleu([["a b c d", "a b c d"], ["a b c d", "e f g h"]]) == pytest.approx(50.0)


def test_self_bleu_is_sacrebleus_sentence_bleu_of_each_sample_against_the_other():
    a, b = "the cat sat on the mat .", "the cat sat on a mat today"
    direct = (sacrebleu.sentence_bleu(a, [b]).score + sacrebleu.sentence_bleu(b, [a]).score) / 2
    assert self_bleu([[a, b]]) == pytest.approx(direct)
    assert 0 < direct < 100


def test_self_bleu_needs_two_samples_of_a_prompt():
    assert self_bleu([["a b"], ["c d"]]) is None
    assert self_bleu([["a b"], ["c d e f", "c d e f"]]) == pytest.approx(100.0)  # the lone sample is left out


def test_token_entropy_of_hand_made_distributions():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4
                           [math.log(0.5), math.log(0.25), math.log(0.25), float("-inf")],  # 1/2 ln 2 + 2 * 1/4 ln 4
                           [3.0, float("-inf"), float("-inf"), float("-inf")]])  # certain: 0, not nan
    expected = torch.tensor([math.log(4), 1.5 * math.log(2), 0.0])
    assert torch.allclose(token_entropy(logits), expected, atol=1e-6)
    # in float32 whatever the logits' dtype; one entropy per position of a (batch, length, vocab) tensor
    got = token_entropy(torch.zeros(2, 3, 4, dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    assert torch.allclose(got, torch.full((2, 3), math.log(4)))


class PositionUniform(torch.nn.Module):
    """A stand-in policy: its logits at position t are uniform over the first t + 1 of 8 tokens, entropy ln(t + 1)."""

    def forward(self, input_ids):
        assert not self.training and not torch.is_grad_enabled()
        positions, vocab = torch.arange(input_ids.shape[1])[:, None], torch.arange(8)[None]
        return SimpleNamespace(logits=torch.where(vocab <= positions, 0.0, float("-inf"))[None])


def test_sample_entropy_averages_over_the_positions_that_predict_sampled_tokens():
    model = PositionUniform().train()
    contexts = [torch.tensor([5, 6]), torch.tensor([5, 6, 7])]
    continuations = [torch.tensor([1, 2, 0]), torch.tensor([3])]
    # row 1: positions 1, 2, 3 predict its 3 sampled tokens; row 2: position 2 predicts its one. All 4 pooled.
    expected = (math.log(2) + math.log(3) + math.log(4) + math.log(3)) / 4
    assert sample_entropy(model, contexts, continuations) == pytest.approx(expected)
    assert model.training  # the mode is given back


def test_diversity_metrics_pool_distinct_and_group_self_bleu():
    got = diversity_metrics([["a b c d", "a b c d"], ["a b c d", "e f g h"]], entropy=0.5)
    # 12 bigrams pooled: "a b", "b c", "c d" three times each, "e f", "f g", "g h" once: 6 distinct
    assert got == pytest.approx({"samples/distinct_2": 6 / 12, "samples/distinct_4": 2 / 4,
                                 "samples/self_bleu": 50.0, "samples/entropy": 0.5})
    # undefined ones are left out: no 4-gram, one sample a prompt
    assert diversity_metrics([["a b"], ["c d"]], entropy=0.5) == {"samples/distinct_2": 1.0, "samples/entropy": 0.5}
    assert set(DEFINITIONS) == set(NAMES)


def test_eval_with_samples_prints_and_writes_the_diversity_metrics(tmp_path, capsys, monkeypatch):
    """`tidpo eval RUN --samples 4` on a 3-step run. The tiny byte-level model samples bytes with hardly a space in
    them, so its sampling is replaced by fixed words (each prompt's 4 samples below) whose numbers are counted here by
    hand; the entropy is the trained model's own on them, recomputed here one row at a time in float64."""
    overrides = ["loss=dpo", *QUICK]
    train(compose_config(overrides), tmp_path / "run")
    tokenizer = build_byte_tokenizer()
    texts = ["a b c d e", "a b c d", "x y", "x y"]
    contexts, continuations = [], []

    def fixed_samples(model, given, *, eos_id, **_):
        sampled = [torch.tensor(tokenizer.encode(texts[i % 4], add_special_tokens=False) + [eos_id])
                   for i in range(len(given))]
        contexts.extend(given)
        continuations.extend(sampled)
        return sampled

    monkeypatch.setattr(evaluation, "generate", fixed_samples)
    out = tmp_path / "e"
    main(["eval", str(tmp_path / "run"), *overrides, "--samples", "4", "--sample-prompts", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    got = json.loads((out / "eval.json").read_text())
    table = (out / "eval.md").read_text()
    assert [item["samples"] for item in got["samples"]] == [texts, texts]
    for name in NAMES:
        assert name in printed
        assert got["definitions"][name] == DEFINITIONS[name]
        assert f"| {name} | {got['metrics'][name]:.4f} | {DEFINITIONS[name]} |" in table

    m = got["metrics"]
    # bigrams of one prompt's samples: a b, b c, c d, d e | a b, b c, c d | x y | x y: 9, twice; 5 distinct
    assert m["samples/distinct_2"] == pytest.approx(5 / 18)
    # 4-grams: a b c d, b c d e | a b c d: 3, twice; 2 distinct
    assert m["samples/distinct_4"] == pytest.approx(2 / 6)
    # Against the other three samples of its prompt: "a b c d e" matches 4/5, 3/4, 2/3, 1/2 (closest reference 4
    # words, shorter: no penalty); "a b c d" all, but its closest reference has 5 words: brevity penalty e^(1 - 5/4);
    # "x y" all of its 1- and 2-grams, and has no longer ones: 100. The two prompts are alike.
    by_hand = (100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4) + 100 * math.exp(1 - 5 / 4) + 100 + 100) / 4
    assert m["samples/self_bleu"] == pytest.approx(by_hand)

    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").double()
    entropies = []
    for context, continuation in zip(contexts, continuations):
        with torch.no_grad():
            logits = policy(input_ids=torch.cat([context, continuation])[None]).logits[0]
        for t in range(len(context), len(context) + len(continuation)):  # the logits at t - 1 predict token t
            logp = torch.log_softmax(logits[t - 1], -1)
            entropies.append(float(-(logp.exp() * logp).sum()))
    assert len(entropies) == 2 * (10 + 8 + 4 + 4)  # the words' bytes and an EOS each
    assert m["samples/entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert 0 < m["samples/entropy"] <= math.log(len(tokenizer))
