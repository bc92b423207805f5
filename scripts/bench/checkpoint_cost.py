#!/usr/bin/env python3
"""What the checkpoint checksums cost: the time of `save_checkpoint` and the part of it spent hashing
(manifest.write_manifest: size and CRC-32 of every file), and the time of the check on resume (manifest.check_files),
on the bench model of scripts/bench/distributed.py, one process, plain engine, AdamW with its state filled by one step.

    python scripts/bench/checkpoint_cost.py                 # writes bench-checkpoint.json
    BENCH_MODEL=hidden_size=768,intermediate_size=2048,num_hidden_layers=6 python scripts/bench/checkpoint_cost.py

Each figure is the median of BENCH_REPEATS (5) saves into a fresh run dir under BENCH_WORK (default: a temporary
directory on the disk of /tmp). The files were just written, so the hash reads them from the page cache, as it does
in a real save; the check on resume reads them as they are then (here: cached too).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tidpo_cli from this checkout when not installed

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from distributed import MODEL_CONFIG as MODEL  # noqa: E402  (the bench model)
from tidpo_cli import manifest  # noqa: E402
from tidpo_cli.checkpoint import TrainState, save_checkpoint  # noqa: E402
from tidpo_cli.cli import compose_config  # noqa: E402
from tidpo_cli.distributed import PlainEngine  # noqa: E402
from tidpo_cli.schedule import build_optimizer, build_scheduler  # noqa: E402
from tidpo_cli.tokenizer import build_byte_tokenizer  # noqa: E402


def main() -> None:
    model_cfg = {**MODEL, **{k: int(v) for k, v in (kv.split("=") for kv in os.environ.get("BENCH_MODEL", "").split(",")
                                                    if kv)}}
    repeats = int(os.environ.get("BENCH_REPEATS", "5"))
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **model_cfg))
    cfg = compose_config(["loss=dpo"])
    optimizer = build_optimizer(policy, cfg.trainer)
    engine = PlainEngine(policy, optimizer, build_scheduler(optimizer, cfg.trainer, 10), 1.0)
    policy(torch.randint(0, len(tokenizer), (2, 32)), labels=torch.randint(0, len(tokenizer), (2, 32))).loss.backward()
    engine.step(True)  # AdamW's moments exist, as in any checkpoint after step 1
    layout = manifest.layout_of(policy, cfg.deepspeed, 1)

    hashing, unhashed, checks, saves = [], [], [], []
    real_write = manifest.write_manifest
    work = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_WORK")))
    try:
        for index in range(repeats):
            run_dir = work / f"run{index}"
            spent = []

            def timed(directory, rank, world):
                began = time.perf_counter()
                real_write(directory, rank, world)
                spent.append(time.perf_counter() - began)

            import tidpo_cli.checkpoint as checkpoint
            checkpoint.write_manifest = timed
            began = time.perf_counter()
            path = save_checkpoint(run_dir, TrainState(step=1, epoch=0, position=8), engine, cfg, None, layout=layout)
            saves.append(time.perf_counter() - began)
            checkpoint.write_manifest = real_write
            hashing.append(spent[0])
            unhashed.append(saves[-1] - spent[0])
            began = time.perf_counter()
            assert manifest.check_files(path) is None
            checks.append(time.perf_counter() - began)
            size = sum(p.stat().st_size for p in path.iterdir())
            shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = statistics.median
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": model_cfg, "parameters": sum(p.numel() for p in policy.parameters()),
        "checkpoint_bytes": size, "repeats": repeats,
        "save_s": median(saves), "hash_s": median(hashing), "save_without_hash_s": median(unhashed),
        "hash_share_of_save": median(hashing) / median(saves), "check_on_resume_s": median(checks),
        "hash_gb_per_s": size / median(hashing) / 1e9,
        "runs": {"save_s": saves, "hash_s": hashing, "check_s": checks},
    }
    out = Path(os.environ.get("BENCH_OUT", "bench-checkpoint.json"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['parameters'] / 1e6:.2f} M parameters, checkpoint {size / 1e6:.1f} MB: save {result['save_s']:.3f} s, "
          f"of which hashing {result['hash_s']:.3f} s ({100 * result['hash_share_of_save']:.0f} %, "
          f"{result['hash_gb_per_s']:.2f} GB/s); check on resume {result['check_on_resume_s']:.3f} s -> {out}")


if __name__ == "__main__":
    main()
