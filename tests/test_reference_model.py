"""model.reference: a reference other than the starting policy (alone, with LoRA, under ZeRO-3 with the reference
cache), checked against log-probs computed here; a tokenizer mismatch stops before training; `tidpo eval` uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers import QUICK, compose_config, run_tidpo, save_tiny_hf_model
from test_distributed import torchrun
from tidpo_cli.data.splits import load_splits
from tidpo_cli.modeling import load_tokenizer

BETA = 0.1


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """A model of the demo's shape and tokenizer, other weights than any run's start."""
    cfg = compose_config([])
    return save_tiny_hf_model(tmp_path_factory.mktemp("other") / "model",
                              OmegaConf.to_container(cfg.model.config), seed=1234)


def logps(model, pairs) -> torch.Tensor:
    """Summed response log-probs [2B] (chosen then rejected), from the logits, one sequence at a time."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            ids = pair.prompt_ids + getattr(pair, side)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            out.append(sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(len(pair.prompt_ids), len(ids))))
    return torch.stack(out)


@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_is_the_model_given(tmp_path, other, lora):
    """Held-out margins at step 0 (the policy is its start) against the formula on both models' log-probs. With
    LoRA the reference is that model too, not the adapter-off base (which would give margins of exactly 0)."""
    overrides = [*QUICK, "loss=dpo", f"loss.beta={BETA}", "trainer.max_steps=1", f"model.reference={other}",
                 f"hydra.run.dir={tmp_path / 'run'}", *(["model.lora.enabled=true"] if lora else [])]
    result = run_tidpo(["train", *overrides], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = compose_config(overrides)
    at_start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    pairs = load_splits(cfg.data, load_tokenizer(cfg.model), seed=cfg.seed).eval
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "reference")  # the run's starting weights
    ratios = logps(policy, pairs) - logps(AutoModelForCausalLM.from_pretrained(other), pairs)
    half = len(pairs)
    margins = BETA * (ratios[:half] - ratios[half:])
    assert at_start["step"] == 0 and abs(at_start["eval/rewards/margins"]) > 1e-3
    assert at_start["eval/rewards/margins"] == pytest.approx(margins.mean().item(), abs=1e-5)
    assert at_start["eval/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), abs=1e-5)
    if not lora:  # `tidpo eval RUN` scores against the run's reference: its numbers at the end are the run's
        result = run_tidpo(["eval", str(tmp_path / "run")], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
        assert report["reference"] == str(other)
        last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert report["metrics"]["rewards/margins"] == pytest.approx(last["eval/rewards/margins"], abs=1e-5)


def test_a_reference_with_another_tokenizer_stops_before_training(tmp_path, other):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    foreign = tmp_path / "foreign"
    AutoModelForCausalLM.from_pretrained(other).save_pretrained(foreign)
    tokenizer.save_pretrained(foreign)
    result = run_tidpo(["train", *QUICK, "loss=dpo", f"model.reference={foreign}",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"model.reference={foreign}: its tokenizer is not the policy's" in line and "'<extra>'" in line
    from tidpo_cli.errors import UserError
    from tidpo_cli.modeling import check_reference_tokenizer, load_reference

    missing = compose_config([f"model.reference={tmp_path / 'nowhere'}"]).model
    check_reference_tokenizer(missing, tokenizer)  # no tokenizer there: the load says what is wrong
    with pytest.raises(UserError, match=f"reference model path '{tmp_path / 'nowhere'}' does not exist: check "
                                        "model.reference"):
        load_reference(missing, tokenizer)


def test_zero3_with_another_reference_and_the_cache_matches_one_process(tmp_path, other):
    """Two processes under ZeRO-3: the given reference sharded, the cache filled by both (a shard each), the same
    per-step losses as one process with the cache off."""
    common = ["loss=dpo", *QUICK, "trainer.micro_batch_size=4", "trainer.schedule=constant", "trainer.save_final=false",
              f"model.reference={other}"]
    one = run_tidpo(["train", *common, "trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*common, "trainer.grad_accum=1", "deepspeed=zero3",
                    "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
                    f"trainer.reference_cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 5
    for a, b in zip(rows["one"], rows["two"]):
        for name in ("loss", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if name in a:
                assert b[name] == pytest.approx(a[name], abs=1e-4), (a["step"], name)
    # one shard per rank; a shard's name starts with its writing time, so the ranks' names sort in either order
    ranks = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache").glob("*/*.index.npy"))
    assert ranks == ["rank0.index.npy", "rank1.index.npy"]
    log = (tmp_path / "two" / "train.log").read_text()
    assert "0 sequences read, 224 computed" in log and "DeepSpeed ZeRO-3" in log
