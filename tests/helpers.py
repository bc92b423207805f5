"""Shared test helpers: compose configs like `tidpo train` does, and run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
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
