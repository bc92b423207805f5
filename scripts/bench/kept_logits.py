#!/usr/bin/env python3
"""What computing logits only where the loss reads them saves (objective.forward: HF's boolean `logits_to_keep`,
layouts.Rows.kept) on a real vocabulary: SmolLM2-135M-Instruct (49,152 tokens; `make model-smollm2` first) on
HH-RLHF pairs as `+experiment=smollm2_hh` reads them (max_length 256, prompt 192), `loss=dpo`, full fine-tuning,
fp32, on this machine's CPU. One micro-batch step (the policy's forward and backward, the reference's forward:
objective.batch_loss, then backward) for each layout (one row per response; the prompt shared) with the logits kept
(as tidpo runs) and whole (objective.keeps_masked_logits patched to False: the code before). Each cell runs in a
process of its own, so its peak resident memory (`ru_maxrss`) is its own.

    python scripts/bench/kept_logits.py       # writes bench-kept-logits.json, prints a table

HH (default ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz), BENCH_PAIRS (4 pairs a micro-batch),
BENCH_STEPS (4 timed micro-batches after one untimed; the figure their median; the same micro-batches in every
cell), BENCH_THREADS (2), BENCH_OUT.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tidpo_cli from this checkout when not installed

CELLS = [("rows", "whole"), ("rows", "kept"), ("packed", "whole"), ("packed", "kept")]


def cell(layout: str, logits: str) -> dict:
    import torch

    from tidpo_cli import objective
    from tidpo_cli.cli import compose_config
    from tidpo_cli.data.collate import collate
    from tidpo_cli.data.splits import load_splits
    from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
    from tidpo_cli.objective import TokenIds, batch_loss

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    hh = os.environ.get("HH", str(REPO.parent / "shared/data/hh-rlhf-harmless-base/test.jsonl.gz"))
    cfg = compose_config(["+experiment=smollm2_hh", f"data.path={hh}", "data.eval_size=0", "loss=dpo",
                          "model.lora.enabled=false"])
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_splits(cfg.data, tokenizer, seed=0).train
    policy = load_policy(cfg.model, tokenizer)
    reference = frozen_copy(policy)
    policy.train()
    ids = TokenIds(pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id, max_length=cfg.data.max_length)
    rng = random.Random(0)
    size, steps = int(os.environ.get("BENCH_PAIRS", "4")), int(os.environ.get("BENCH_STEPS", "4"))
    batches = [collate(rng.sample(pairs, size), ids.pad, share_prompt=layout == "packed") for _ in range(steps + 1)]
    times, losses = [], []
    with patch.object(objective, "keeps_masked_logits", lambda model: logits == "kept"):
        for batch in batches:
            policy.zero_grad(set_to_none=True)
            began = time.perf_counter()
            loss, _ = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
            loss.backward()
            times.append(time.perf_counter() - began)
            losses.append(loss.item())
    return {"step_s": statistics.median(times[1:]), "steps_s": times, "losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": [int(b["attention_mask"].sum()) for b in batches], "model": cfg.model.name_or_path}


def main() -> None:
    if len(sys.argv) == 3:  # one cell, in its own process
        print(json.dumps(cell(sys.argv[1], sys.argv[2])))
        return
    from tidpo_cli.benchmark import versions

    results = {}
    for layout, logits in CELLS:
        out = subprocess.run([sys.executable, __file__, layout, logits], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"scripts/bench/kept_logits.py: the {layout}/{logits} cell failed:\n{out.stderr[-3000:]}")
        results[f"{layout} {logits}"] = json.loads(out.stdout.strip().splitlines()[-1])
    report = {"settings": {"pairs": int(os.environ.get("BENCH_PAIRS", "4")),
                           "steps": int(os.environ.get("BENCH_STEPS", "4")),
                           "threads": int(os.environ.get("BENCH_THREADS", "2")),
                           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "versions": versions(("torch", "transformers"))},
              "cells": results}
    Path(os.environ.get("BENCH_OUT", "bench-kept-logits.json")).write_text(json.dumps(report, indent=2) + "\n")
    print("| layout | logits | step (s) | vs whole | peak RSS (MB) | first loss |\n|---|---|---:|---:|---:|---:|")
    for layout, logits in CELLS:
        c, base = results[f"{layout} {logits}"], results[f"{layout} whole"]
        print(f"| {layout} | {logits} | {c['step_s']:.2f} | {c['step_s'] / base['step_s']:.2f} | "
              f"{c['peak_rss_mb']:.0f} | {c['losses'][0]:.6f} |")


if __name__ == "__main__":
    main()
