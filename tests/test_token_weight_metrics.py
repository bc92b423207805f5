"""Where the token weight goes: `importance/last_share` and `importance/critical_share` by hand, the critical
positions from the data (the synthetic task's own, and `chosen_critical` / `rejected_critical` columns), the
metrics in a training run's metrics.jsonl, and `tidpo explain`'s shares."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import QUICK, compose_config
from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import BadRow, TokenizedPair
from tidpo_cli.data.formats import to_example
from tidpo_cli.data.synthetic import make_pair
from tidpo_cli.data.tokenize import tokenize_example
from tidpo_cli.importance import weight_shares
from tidpo_cli.losses import IGNORE_INDEX
from tidpo_cli.objective import add_weight_metrics
from tidpo_cli.tokenizer import build_byte_tokenizer
from tidpo_cli.tracking import MetricSums

TOKENIZER = build_byte_tokenizer()  # id == byte for ASCII text: token i of a response is its character i


def hand_batch():
    """Four responses (two pairs) of width 6; response positions 2-5, 2-4, 3-5 and 1-5."""
    spans = [(2, 6), (2, 5), (3, 6), (1, 6)]
    labels = torch.full((4, 6), IGNORE_INDEX)
    for row, (start, end) in enumerate(spans):
        labels[row, start:end] = 7
    weights = torch.tensor([[0.0, 0.0, 0.5, 2.0, 0.5, 1.0],   # sum 4: last 1.0 -> 0.25; critical (3) 2.0 -> 0.5
                            [0.0, 0.0, 1.5, 0.9, 0.6, 0.0],   # sum 3: last 0.6 -> 0.2; not marked
                            [0.0, 0.0, 0.0, 0.3, 0.3, 2.4],   # sum 3: last 2.4 -> 0.8; critical (3, 4) 0.6 -> 0.2
                            [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # sum 5: last 1.0 -> 0.2; marked, none critical -> 0
    critical = torch.zeros(4, 6, dtype=torch.bool)
    critical[0, 3] = critical[2, 3] = critical[2, 4] = True
    return labels, weights, critical, torch.tensor([True, False, True, True])


def test_shares_by_hand():
    labels, weights, critical, marked = hand_batch()
    span = labels != IGNORE_INDEX
    metrics = MetricSums()
    add_weight_metrics(metrics, weights, span, span, {"labels": labels, "critical_mask": critical,
                                                      "critical_rows": marked})
    means = metrics.means()
    assert means["importance/last_share"] == pytest.approx((0.25 + 0.2 + 0.8 + 0.2) / 4)
    assert means["importance/critical_share"] == pytest.approx((0.5 + 0.2 + 0.0) / 3)  # the marked responses only
    assert weight_shares(weights, span, critical).tolist() == pytest.approx([0.5, 0.0, 0.2, 0.0])
    # Over a prompt + response span the share is of the whole span's weight: 2 of 0.5 + 0.5 + 1 + 2.
    assert weight_shares(torch.tensor([[0.5, 0.5, 1.0, 2.0]]), torch.ones(1, 4, dtype=torch.bool),
                         torch.tensor([[False, False, False, True]])).tolist() == pytest.approx([0.5])


def test_unmarked_data_logs_no_critical_share_but_every_process_the_same_names():
    labels, weights, _, _ = hand_batch()
    span = labels != IGNORE_INDEX
    metrics = MetricSums()
    add_weight_metrics(metrics, weights, span, span, {"labels": labels})
    assert "importance/critical_share" not in metrics.means() and "importance/last_share" in metrics.means()
    assert metrics.counts["importance/critical_share"] == 0  # in the sums every rank adds up, with count 0


@pytest.mark.parametrize("seed", range(20))
def test_synthetic_rows_mark_exactly_the_letters_where_the_replies_differ(seed):
    row = make_pair(random.Random(seed), 4, 8, 2)
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    differing = {i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b}
    for key in ("chosen_critical", "rejected_critical"):
        assert {i for start, end in row[key] for i in range(start, end)} == differing
    assert 1 <= len(differing) <= 2


def test_synthetic_critical_tokens_are_the_changed_letters():
    row = make_pair(random.Random(3), 4, 8, 2)
    pair = tokenize_example(to_example(row, "conversational", TOKENIZER, "synthetic:0"), TOKENIZER, 64, 32)
    for ids, other, critical in ((pair.chosen_ids, pair.rejected_ids, pair.critical[0]),
                                 (pair.rejected_ids, pair.chosen_ids, pair.critical[1])):
        assert list(critical) == [i for i, (a, b) in enumerate(zip(ids, other)) if a != b]


def pair_of(row, fmt="prompt_chosen_rejected", max_length=64):
    return tokenize_example(to_example(row, fmt, TOKENIZER, "row"), TOKENIZER, max_length, min(16, max_length - 1))


def test_critical_columns_map_character_spans_to_the_tokens_that_overlap_them():
    row = {"prompt": "Q?", "chosen": "yes 42", "rejected": "no 41", "chosen_critical": [[4, 6]],
           "rejected_critical": [[3, 4], [4, 5]]}
    assert pair_of(row).critical == ((4, 5), (3, 4))
    assert pair_of({**row, "rejected_critical": None}).critical == ((4, 5), None)
    assert pair_of({**row, "chosen_critical": []}).critical == ((), (3, 4))  # marked: nothing critical
    # Spans into the column as written: a response that repeats the prompt has it cut, and the spans follow.
    repeated = {"prompt": "Q?", "chosen": "Q?yes 42", "rejected": "Q?no 41", "chosen_critical": [[6, 8]],
                "rejected_critical": [[5, 7]]}
    assert pair_of(repeated).critical == ((4, 5), (3, 4))
    # hh_rlhf: spans into the whole dialogue.
    dialogue = "\n\nHuman: hi\n\nAssistant:"
    hh = {"chosen": dialogue + " yes", "rejected": dialogue + " no", "chosen_critical": [[len(dialogue) + 1, len(dialogue) + 4]],
          "rejected_critical": [[len(dialogue) + 2, len(dialogue) + 3]]}
    assert pair_of(hh, "hh_rlhf").critical == ((1, 2, 3), (2,))
    # Conversational: spans into the reply's content, placed where the chat template renders it.
    chat = {"prompt": [{"role": "user", "content": "Copy: a b"}], "chosen": [{"role": "assistant", "content": "a b"}],
            "rejected": [{"role": "assistant", "content": "a x"}], "chosen_critical": [[2, 3]],
            "rejected_critical": [[2, 3]]}
    assert pair_of(chat, "conversational").critical == ((2,), (2,))
    # A cut response keeps the critical tokens it kept: max_length 6 leaves 3 response tokens after the 3 of "<bos>Q?".
    assert pair_of(row, max_length=6).critical == ((), ())


@pytest.mark.parametrize("value, words", [
    ("4-6", ["'chosen_critical' is a string", "list of [start, end]"]),
    ([[4]], ["not [start, end]"]),
    ([[4.0, 6]], ["not [start, end]"]),
    ([[True, 6]], ["not [start, end]"]),
    ([[5, 5]], ["outside its text"]),
    ([[4, 7]], ["outside its text"]),
    ([[-1, 2]], ["outside its text"]),
])
def test_bad_critical_spans_make_the_row_bad(value, words):
    row = {"prompt": "Q?", "chosen": "yes 42", "rejected": "no 41", "chosen_critical": value}
    with pytest.raises(BadRow) as caught:
        to_example(row, "prompt_chosen_rejected", TOKENIZER, "row")
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_spans_in_the_prompt_or_an_unplaceable_reply_make_the_row_bad():
    dialogue = "\n\nHuman: hi\n\nAssistant:"
    with pytest.raises(BadRow, match="characters of the prompt"):
        to_example({"chosen": dialogue + " yes", "rejected": dialogue + " no", "chosen_critical": [[2, 5]]},
                   "hh_rlhf", TOKENIZER, "row")
    two = {"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
           "rejected": [{"role": "assistant", "content": "c"}], "chosen_critical": [[0, 1]]}
    with pytest.raises(BadRow, match="reply of one message"):
        to_example(two, "conversational", TOKENIZER, "row")
    # "d" is also in the rendered reply's "<|end|>": where the content sits is ambiguous.
    ambiguous = {"prompt": "hi", "chosen": [{"role": "assistant", "content": "d"}],
                 "rejected": [{"role": "assistant", "content": "c"}], "chosen_critical": [[0, 1]]}
    with pytest.raises(BadRow, match="not found exactly once"):
        to_example(ambiguous, "conversational", TOKENIZER, "row")


def test_collate_marks_the_critical_tokens_of_the_marked_responses():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6, 7], "a", False, critical=((1, 2), None)),
             TokenizedPair([1], [8, 9], [10, 11, 12], "b", False, critical=((), (0,)))]
    batch = collate(pairs, 0, share_prompt=True)
    assert batch["critical_rows"].tolist() == [True, True, False, True]
    assert batch["critical_mask"].nonzero().tolist() == [[0, 3], [0, 4], [3, 1]]  # prompt length + index
    assert "critical_mask" not in collate([TokenizedPair([1], [2], [3], "c", False)], 0)


@pytest.mark.parametrize("options", [
    ["loss.importance.target=sequence_logp", "loss.importance.grad_pass=separate", "trainer.share_prompt=false"],
    ["loss.importance.target=margin", "loss.importance.attribution=grad_x_input", "loss.importance.exclude_last=true"],
], ids=["sequence_logp-separate-rows", "margin-grad_x_input-exclude_last-packed"])
def test_training_logs_the_shares_in_metrics_jsonl(tmp_path, options):
    from tidpo_cli.trainer import train

    cfg = compose_config([*QUICK, "loss=tidpo_no_triplet", "trainer.max_steps=2", "trainer.save_final=false",
                          *options])
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    evaluated = [r for r in rows if "eval/loss" in r]
    assert len(trained) == 2 and evaluated
    for row in trained:
        assert 0 < row["importance/critical_share"] < 1 and 0 < row["importance/last_share"] < 1
    for row in evaluated:
        assert 0 < row["eval/importance/critical_share"] < 1 and 0 < row["eval/importance/last_share"] < 1


def test_bad_importance_options_are_one_line():
    """The schema's one line (the CLI prints it and exits 2, as for every ConfigError: test_cli_config). Checked
    through `validate`, not an in-process `tidpo train`, whose Hydra logging would keep pytest's closed streams."""
    from tidpo_cli.config import validate
    from tidpo_cli.errors import ConfigError

    for override, allowed in (("loss.importance.target=max_logit", "last_max_logit, sequence_logp, margin"),
                              ("loss.importance.attribution=grad", "grad_l1, grad_x_input")):
        with pytest.raises(ConfigError) as caught:
            validate(compose_config(["loss=tidpo", override]))
        err = str(caught.value)
        assert "\n" not in err and override.split("=")[0] in err and allowed in err, err


def test_explain_reports_the_shares_and_marks_the_critical_tokens(tmp_path, capsys):
    from tidpo_cli.explain import explain_main
    from tidpo_cli.modeling import build_tiny_llama

    torch.manual_seed(0)
    model = build_tiny_llama({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 2}, TOKENIZER)
    model.save_pretrained(tmp_path / "model")
    TOKENIZER.save_pretrained(tmp_path / "model")
    rows = [{"prompt": "Q?", "chosen": "yes 42", "rejected": "no 41", "chosen_critical": [[4, 6]],
             "rejected_critical": [[3, 4]]},
            {"prompt": "R?", "chosen": "ok", "rejected": "no"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    explain_main([str(tmp_path / "model"), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    marked, unmarked = json.loads((tmp_path / "out" / "explain.json").read_text(encoding="utf-8"))["examples"]
    for side, critical in (("chosen", [4, 5]), ("rejected", [3])):
        entry = marked[side]
        weights = entry["weights"]
        assert entry["critical"] == critical
        assert entry["critical_share"] == pytest.approx(sum(weights[i] for i in critical) / sum(weights), rel=1e-6)
        assert entry["last_share"] == pytest.approx(weights[-1] / sum(weights), rel=1e-6)
    for side in ("chosen", "rejected"):
        assert unmarked[side]["critical"] is None and unmarked[side]["critical_share"] is None
        assert 0 < unmarked[side]["last_share"] < 1
    assert "over 4 responses" in printed and "over 2 marked responses" in printed
    page = (tmp_path / "out" / "explain.html").read_text(encoding="utf-8")
    # three critical tokens, each underlined in both rows (raw importance, weights)
    assert page.count("text-decoration:underline") == 6 and "critical tokens (underlined)" in page


def test_flipped_labels_swap_the_critical_tokens_with_the_responses():
    from tidpo_cli.data.examples import TokenizedPair
    from tidpo_cli.data.splits import flip_labels

    pair = TokenizedPair([1, 2], [3, 4, 5], [6, 7], "r", False, critical=((0, 2), (1,)))
    (flipped,) = flip_labels([pair], 1.0, seed=0)
    assert flipped.chosen_ids == [6, 7] and flipped.rejected_ids == [3, 4, 5]
    assert flipped.critical == ((1,), (0, 2))
