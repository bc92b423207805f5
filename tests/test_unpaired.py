"""KTO's unpaired data (data.format=unpaired: prompt, completion, true/false label rows, TRL's unpaired layout):
detection, bad rows, tokenization and collation, the loss against its formula, and what it refuses."""

import json
import math

import pytest
import torch

from helpers import compose_config, run_tidpo
from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import BadRow, TokenizedExample
from tidpo_cli.data.formats import detect_format, to_example
from tidpo_cli.data.prepare import prepare
from tidpo_cli.losses import response_mask, token_logps
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds, batch_loss, loss_items, mismatched_rows

ROWS = [
    {"prompt": "Say hi.", "completion": " Hi there!", "label": True},
    {"prompt": "Say hi.", "completion": " Go away.", "label": False},
    {"prompt": "Count to three.", "completion": " 1 2 3", "label": True},
    {"prompt": "Name a color.", "completion": " Seven.", "label": False},
    {"prompt": "Spell cat.", "completion": " c-a-t", "label": True},
]


def test_detected_and_read():
    assert detect_format(ROWS[0]) == "unpaired"
    ex = to_example({"prompt": "Q:", "completion": "Q: yes", "label": False}, "unpaired", None, "f:1")
    assert (ex.prompt, ex.completion, ex.desirable, ex.where) == ("Q:", " yes", False, "f:1")  # repeated prompt cut


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "a", "completion": " b"}, "missing key 'label'"),
    ({"prompt": "a", "completion": " b", "label": "yes"}, "'label' is a string, expected true or false"),
    ({"prompt": "a", "completion": " b", "label": 1}, "'label' is a number, expected true or false"),
    ({"prompt": "a", "completion": "", "label": True}, "empty 'completion'"),
    ({"prompt": " ", "completion": " b", "label": True}, "empty 'prompt'"),
    ({"prompt": "a", "completion": 3, "label": True}, "'completion' is a number, expected a string"),
])
def test_bad_rows_are_named(row, reason):
    with pytest.raises(BadRow, match=reason):
        to_example(row, "unpaired", None, "f:1")


def test_bad_rows_are_skipped_and_counted_or_stop_the_run_naming_the_row():
    tokenizer = load_tokenizer(compose_config([]).model)
    rows = [(f"d.jsonl:{i + 1}", r) for i, r in enumerate([*ROWS, {"prompt": "a", "completion": " b"}])]
    examples, report = prepare(rows, "auto", tokenizer, max_length=64, max_prompt_length=32)
    assert report.fmt == "unpaired" and report.used == 5 and report.skipped == 1
    assert report.first_skipped == ["d.jsonl:6: missing key 'label'"]
    assert all(isinstance(e, TokenizedExample) for e in examples)
    assert examples[0].completion_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(Exception, match="bad row at d.jsonl:6 .*missing key 'label'"):
        prepare(rows, "auto", tokenizer, max_length=64, max_prompt_length=32, on_bad_row="error")


def test_collated_one_row_per_example_with_its_label():
    examples = [TokenizedExample([1, 5], [7, 8, 2], True, "a", False), TokenizedExample([1], [9, 2], False, "b", False)]
    batch = collate(examples, pad_id=0, share_prompt=True)  # nothing to share: still one row each
    assert batch["input_ids"].tolist() == [[1, 5, 7, 8, 2], [1, 9, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 2], [-100, 9, 2, -100, -100]]
    assert batch["desirable"].tolist() == [True, False] and "packed_ids" not in batch
    assert loss_items(batch, "kto") == 2


def test_kto_on_unpaired_rows_against_its_formula():
    cfg = compose_config(["loss=kto", "loss.kto.undesirable_weight=1.5"])
    tokenizer = load_tokenizer(cfg.model)
    examples, _ = prepare([(str(i), r) for i, r in enumerate(ROWS)], "auto", tokenizer, max_length=64,
                          max_prompt_length=32)
    torch.manual_seed(0)
    policy = load_policy(cfg.model, tokenizer)
    reference = frozen_copy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = collate(examples, tokenizer.pad_token_id)
    loss, metrics = batch_loss(policy, reference, batch, cfg.loss, TokenIds(tokenizer.pad_token_id,
                               tokenizer.eos_token_id, 64), seed=0)

    def sums(model, rows):
        with torch.no_grad():
            logps = token_logps(model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits,
                                rows["labels"])
        return (logps * response_mask(rows["labels"])).sum(-1)

    ratio = (sums(policy, batch) - sums(reference, batch)).tolist()
    kl_rows = mismatched_rows(batch, tokenizer.pad_token_id)
    z0 = max(0.0, (sums(policy, kl_rows) - sums(reference, kl_rows)).mean().item())
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum(1 - sig(0.1 * (r - z0)) if row["label"] else 1.5 * (1 - sig(0.1 * (z0 - r)))
                   for r, row in zip(ratio, ROWS))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    means = metrics.means()
    assert means["kl"] == pytest.approx(z0, rel=1e-5, abs=1e-7)
    good = [0.1 * r for r, row in zip(ratio, ROWS) if row["label"]]
    assert means["rewards/chosen"] == pytest.approx(sum(good) / len(good), rel=1e-5, abs=1e-8)


def test_unpaired_data_with_a_pairwise_loss_is_refused_in_one_line(tmp_path):
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    result = run_tidpo(["train", "loss=dpo", "data=preference", "data.format=auto", f"data.path={data}",
                        "data.eval_size=0", "trainer.micro_batch_size=4", "trainer.max_steps=1"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the data is unpaired" in result.stderr and "loss=kto" in result.stderr
