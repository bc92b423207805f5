"""`tidpo benchmark`: lm-evaluation-harness on a trained checkpoint, with a multiple-choice task defined in local
files (no hub). The harness's accuracy is checked against choices scored here, one sequence at a time; and the
mistakes a user can make end in one line."""

from __future__ import annotations

import json
from pathlib import Path

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import QUICK, compose_config
from tidpo_cli.cli import main
from tidpo_cli.tokenizer import build_byte_tokenizer
from tidpo_cli.trainer import train

TASK = "tidpo_local_mc"

# Eight questions with three or four answers of unequal length; the gold index varies.
ROWS = [
    {"question": "Copy: a b c", "choices": ["a b c", "a x c", "b"], "label": 0},
    {"question": "Which letter comes after q?", "choices": ["p", "r", "qq", "z z"], "label": 1},
    {"question": "Copy: x y", "choices": ["y x", "x", "x y"], "label": 2},
    {"question": "Two plus two is", "choices": ["five", "4", "22"], "label": 1},
    {"question": "Copy: m n o p", "choices": ["m n o p", "m n", "p o n m", "o"], "label": 0},
    {"question": "The opposite of up is", "choices": ["left", "upward", "down"], "label": 2},
    {"question": "Copy: k", "choices": ["kk", "k", "j"], "label": 1},
    {"question": "Spell cat backwards", "choices": ["tac", "cat", "act", "c a t"], "label": 0},
]

TASK_YAML = """\
task: TASK
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def harness():
    """lm-eval is the optional extra `pip install "tidpo[benchmark]"`: without it these tests skip."""
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def run_dir(harness, tmp_path_factory) -> Path:
    """A DPO run of two steps whose last checkpoint holds the same weights as its final/."""
    root = tmp_path_factory.mktemp("bench") / "run"
    train(compose_config([*QUICK, "loss=dpo", "trainer.max_steps=2"]), root)
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (root / f"{TASK}.yaml").write_text(TASK_YAML.replace("TASK", TASK).replace("DATA", str(data)), encoding="utf-8")
    return root


def choice_logp(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) summed over the continuation's tokens, one unpadded row: the tokenizer adds
    BOS in front as it does for any text, and the byte-level tokens split exactly where the strings meet."""
    context_ids = tokenizer(context).input_ids
    ids = tokenizer(context + continuation).input_ids
    assert ids[:len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logps = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float(logps[len(context_ids) - 1:].sum())


def expected_accuracies(model_dir: Path) -> tuple[float, float]:
    """acc (the choice of highest log-likelihood is gold) and acc_norm (the same per character of the choice)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = build_byte_tokenizer()
    right = right_norm = 0
    for row in ROWS:
        context = f"Question: {row['question']}\nAnswer:"
        scores = [choice_logp(model, tokenizer, context, " " + choice) for choice in row["choices"]]
        per_char = [s / len(choice) for s, choice in zip(scores, row["choices"])]
        right += max(range(len(scores)), key=scores.__getitem__) == row["label"]
        right_norm += max(range(len(scores)), key=per_char.__getitem__) == row["label"]
    return right / len(ROWS), right_norm / len(ROWS)


def test_a_local_task_on_a_checkpoint_matches_choices_scored_here(run_dir, task_dir, capsys):
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    main(["benchmark", str(checkpoint), "--tasks", TASK, "--include-path", str(task_dir), "--device", "cpu",
          "--batch-size", "4"])
    out = run_dir / "benchmark"  # a checkpoint of a run writes into the run
    report = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert report["tasks"] == [TASK] and report["evaluated"] == str(checkpoint)
    assert report["versions"]["lm_eval"] != "not installed"
    scores = report["lm_eval"]["results"][TASK]
    accuracy = scores["acc,none"]
    assert 0 <= accuracy <= 1
    assert report["lm_eval"]["n-samples"][TASK]["effective"] == len(ROWS)
    # The exported checkpoint is the final model (the run's last step), scored independently here.
    assert (accuracy, scores["acc_norm,none"]) == pytest.approx(expected_accuracies(run_dir / "final"))
    table = (out / "benchmark.md").read_text(encoding="utf-8")
    assert f"| {TASK} | acc | {accuracy:.4f} |" in table
    assert f"| {TASK} | acc |" in capsys.readouterr().out
    assert [p.name for p in out.iterdir() if p.name.startswith(".model-")] == []  # the temporary export is gone


def fails_with(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tidpo: error: ") and "\n" not in err, err
    return err


def test_a_missing_model_path_is_one_line(harness, tmp_path, capsys):
    err = fails_with(["benchmark", str(tmp_path / "nope"), "--tasks", "mmlu"], capsys)
    assert str(tmp_path / "nope") in err and "does not exist" in err


def test_humaneval_needs_allow_code_eval(run_dir, capsys):
    for tasks in ("paper", "gsm8k,humaneval"):
        err = fails_with(["benchmark", str(run_dir), "--tasks", tasks], capsys)
        assert "humaneval" in err and "--allow-code-eval" in err


def test_an_unknown_local_include_path_and_bad_numbers_are_one_line(run_dir, tmp_path, capsys):
    err = fails_with(["benchmark", str(run_dir), "--tasks", TASK, "--include-path", str(tmp_path / "none")], capsys)
    assert "--include-path" in err and str(tmp_path / "none") in err
    err = fails_with(["benchmark", str(run_dir), "--limit", "0"], capsys)
    assert "--limit must be at least 1" in err


def test_without_lm_eval_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    err = fails_with(["benchmark", str(tmp_path), "--tasks", "mmlu"], capsys)
    assert err == 'tidpo: error: tidpo benchmark needs lm-evaluation-harness: pip install "tidpo[benchmark]"'


def test_chat_template_renders_the_prompts_with_the_tokenizers_template(run_dir, task_dir, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    contexts = []
    original = HFLM.loglikelihood

    def recording(self, requests, *args, **kwargs):
        contexts.extend(r.args[0] for r in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    out = tmp_path / "chat"
    main(["benchmark", str(run_dir / "final"), "--tasks", TASK, "--include-path", str(task_dir), "--device", "cpu",
          "--chat-template", "--out", str(out)])
    assert json.loads((out / "benchmark.json").read_text(encoding="utf-8"))["chat_template"] is True
    tokenizer = build_byte_tokenizer()
    rendered = {tokenizer.apply_chat_template([{"role": "user", "content": f"Question: {row['question']}\nAnswer:"}],
                                              tokenize=False, add_generation_prompt=True) for row in ROWS}
    assert contexts and set(contexts) == rendered  # every request's context is the rendered user turn
