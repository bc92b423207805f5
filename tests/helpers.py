"""Shared test helpers: compose configs like `tidpo train` does, and run the CLI as a user would."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tidpo_cli.cli import compose_config  # noqa: F401  (the config `tidpo train OVERRIDES` would run with)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"

# A few seconds of training: small synthetic data, a handful of steps, no progress bar. The layout is fixed
# (trainer.share_prompt=auto times the two, and a timing may pick either: two runs would round differently).
QUICK = [
    "data.synthetic.num_train=96", "data.eval_size=16", "trainer.max_steps=3", "trainer.micro_batch_size=8",
    "trainer.eval_batch_size=16", "trainer.warmup_steps=1", "logger.progress=off", "trainer.share_prompt=true",
]


def load_script(path: Path, name: str):
    """A script of the repository (scripts/...) as the module `name`, registered in sys.modules (dataclasses look
    their module up there); loaded once per test session."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_tidpo(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tidpo ARGS` in a fresh process, as a user types it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tidpo_cli.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def save_tiny_hf_model(path: Path, model: dict, seed: int) -> Path:
    """A tiny Llama (`model`: LlamaConfig sizes, random init from `seed`) and the byte-level tokenizer, saved as a
    plain HF model directory: what the TRL side-by-side tests load in both tools."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidpo_cli.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        built = LlamaForCausalLM(config)
    built.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def aligned_overrides(model_dir: Path, rows_file: Path, *, max_length: int, max_prompt_length: int, batch: int,
                      grad_accum: int, steps: int, lr: float, seed: int) -> list[str]:
    """`tidpo train` settings that match a TRL trainer's run on the same model directory and rows: the rows in file
    order, nothing held out, AdamW at a constant lr, no warm-up or weight decay, clipping at 1, fp32, one row per
    response, no eval or checkpoints, every step logged."""
    return [
        f"model.name_or_path={model_dir}", "model.tokenizer=null", "model.dtype=float32",
        "model.attn_implementation=sdpa",
        "data=preference", f"data.path={rows_file}", f"data.max_length={max_length}",
        f"data.max_prompt_length={max_prompt_length}", "data.eval_size=0", "data.shuffle=false",
        "data.group_by_length=0",
        f"trainer.micro_batch_size={batch}", f"trainer.grad_accum={grad_accum}", f"trainer.max_steps={steps}",
        "trainer.optimizer=adamw", f"trainer.lr={lr}", "trainer.weight_decay=0.0", "trainer.schedule=constant",
        "trainer.warmup_steps=0", "trainer.max_grad_norm=1.0", "trainer.precision=fp32",
        "trainer.gradient_checkpointing=false", "trainer.share_prompt=false", "trainer.eval_before=false",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.save_final=false", "trainer.resume=never",
        "trainer.device=cpu", "logger.progress=off", "logger.log_every=1", f"seed={seed}",
    ]


# Resume: runs compared with an uninterrupted one (the `uninterrupted` fixture of conftest.py).
# 40 small steps with a checkpoint every 5; no eval in between, so a run is a few seconds.
RUN = [*QUICK, "trainer.max_steps=40", "trainer.save_every=5", "trainer.keep_last=null", "data.eval_size=16"]
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm", "lr", "triplet/loss", "importance/max")


def start(args, run_dir, env=None):
    return subprocess.Popen([sys.executable, "-m", "tidpo_cli.cli", "train", *args, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    raise AssertionError("timed out")


def train_rows(run_dir):
    return [r for r in logged_steps(run_dir) if "loss" in r]


def assert_same_run(resumed_dir, reference_dir):
    """Every step logged once with the uninterrupted run's numbers, and the same final weights."""
    import pytest
    import torch
    from safetensors.torch import load_file

    a, b = train_rows(resumed_dir), train_rows(reference_dir)
    assert [r["step"] for r in a] == list(range(1, 41))  # every step exactly once
    for ra, rb in zip(a, b):
        for name in COMPARED:
            if name in rb:
                assert ra[name] == pytest.approx(rb[name], abs=1e-6), (ra["step"], name)
    wa = load_file(str(resumed_dir / "final" / "model.safetensors"))
    wb = load_file(str(reference_dir / "final" / "model.safetensors"))
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)
