"""`tidpo train` as a user runs it: the demo, real HH-RLHF rows, a local sweep, a local model path."""

import json
import re

import pytest
from transformers import AutoTokenizer

from helpers import HH_RLHF, QUICK, run_tidpo
from tidpo_cli.modeling import build_tiny_llama
from tidpo_cli.tokenizer import build_byte_tokenizer


def test_demo_learns_the_held_out_task(tmp_path):
    """`tidpo train` with no overrides is TI-DPO (importance weights + triplet loss with online anchors) on the
    synthetic task: held-out reward accuracy goes from 0 to at least 0.75."""
    result = run_tidpo(["train"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"held-out rewards/accuracies: ([0-9.]+) -> ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:]
    before, after = map(float, found.groups())
    assert before == 0.0  # policy == reference: every margin is exactly 0
    assert after >= 0.75
    run_dir = next((tmp_path / "runs").glob("*/*"))
    assert f"run dir: {run_dir}" in result.stdout
    for name in [".hydra/config.yaml", "metrics.jsonl", "train.log", "final/model.safetensors",
                 "final/config.json", "final/tokenizer.json"]:
        assert (run_dir / name).exists(), name
    assert "name: tidpo" in (run_dir / ".hydra" / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train_row = [r for r in rows if "loss" in r][-1]
    for name in ["importance/entropy", "importance/max", "importance/fallbacks", "triplet/loss",
                 "triplet/active_frac", "anchor/length", "rewards/accuracies"]:
        assert name in last_train_row, name
    log_text = (run_dir / "train.log").read_text()
    assert "held-out rewards/accuracies" in log_text
    # A non-terminal gets plain progress lines with step, loss, accuracy, samples/s and ETA.
    assert re.search(r"step \d+/\d+ \| loss [0-9.]+ \| acc [0-9.]+ \| [0-9.]+ samples/s \| eta ", result.stdout)


def test_hh_rlhf_file_trains_and_reports_skipped_rows(tmp_path):
    if not HH_RLHF.exists():
        pytest.skip(f"the shared HH-RLHF data is not at {HH_RLHF} (it sits beside the repo in CI and dev setups)")
    result = run_tidpo(["train", "data=hh_rlhf", f"data.path={HH_RLHF}", "trainer.max_steps=5",
                        "trainer.micro_batch_size=4", "trainer.eval_batch_size=32", "data.eval_size=32",
                        "data.max_length=256", "data.max_prompt_length=128", "logger.progress=plain",
                        "logger.print_every=1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read 2312 rows" in result.stdout
    assert "used 2308, skipped 4 (chosen and rejected do not share a prompt: 4)" in result.stdout
    assert "step 5/5" in result.stdout


def test_local_sweep_runs_one_job_per_value(tmp_path):
    result = run_tidpo(["train", "-m", "loss.beta=0.05,0.1", *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "runs" / "multirun").glob("*/*/*"))
    job_dirs = [j for j in jobs if j.is_dir() and (j / "metrics.jsonl").exists()]
    assert len(job_dirs) == 2
    betas = sorted(float(re.search(r"beta: ([0-9.]+)", (j / ".hydra" / "config.yaml").read_text()).group(1))
                   for j in job_dirs)
    assert betas == [0.05, 0.1]
    for j in job_dirs:
        assert any("loss" in json.loads(line) for line in (j / "metrics.jsonl").read_text().splitlines())


def test_pretrained_model_from_a_local_path(tmp_path):
    """The code path of the big-model configs (from_pretrained + the model's own tokenizer), on a local copy."""
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 2}, tokenizer)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    result = run_tidpo(["train", "model=llama3_8b", f"model.name_or_path={tmp_path / 'base'}", "model.dtype=float32",
                        *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    final = next((tmp_path / "runs").glob("*/*/final"))
    assert AutoTokenizer.from_pretrained(final).chat_template is not None
    # The model trained is the local one: its sizes, not the tiny default's (64 wide, 2 layers) nor the 8B's
    base, saved = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "base", final))
    sizes = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    assert {k: saved.get(k) for k in sizes} == {k: base.get(k) for k in sizes}
    assert (saved["hidden_size"], saved["num_hidden_layers"]) == (32, 1)


def test_missing_model_path_is_one_clear_line(tmp_path):
    result = run_tidpo(["train", "model=llama3_8b", "model.name_or_path=./no/such/model", *QUICK], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "./no/such/model" in result.stderr and "does not exist" in result.stderr


def test_missing_data_file_is_one_clear_line(tmp_path):
    result = run_tidpo(["train", "data=preference", "data.path=./missing.jsonl"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing.jsonl" in result.stderr
