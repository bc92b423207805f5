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
