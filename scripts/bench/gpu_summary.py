#!/usr/bin/env python3
"""scripts/bench/gpu.sh's summary: its rows' metrics.jsonl and logs into OUT/gpu_bench.json, written again after
every row, so a call stopped part-way still leaves the rows that finished.

    python scripts/bench/gpu_summary.py OUT LOGS WARMUP PEAK_TFLOPS NAME...

LOGS holds NAME.jsonl (the row's metrics.jsonl) and NAME.log for each row that ran; OUT holds gpu.txt and
checks.txt. Per row: the medians over the steps after WARMUP of tokens/s, pairs/s and step time (PAIRS pairs a
step over pairs/s), peak GPU memory, model-FLOPs utilisation counted as 8 x parameters per token (policy forward
and backward, reference forward: DPO's work) against PEAK_TFLOPS, trainer.share_prompt=auto's timings as the log
gave them, how often torch re-recorded a CUDA graph (its `cudagraphs` log, which gpu.sh turns on), and the step
time over `dpo`'s; for the rows that sample anchors, the median seconds a step spent sampling (perf/anchor_s) and
the median rest of the step over `dpo`'s step (`rest_vs_dpo`).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PAIRS = 8  # gpu.sh's trainer.micro_batch_size, one micro-batch a step


def parameters(logs: Path, names: list[str]) -> float | None:
    """The model's size from the first row log that names it (every row builds the same model)."""
    for name in names:
        log = logs / f"{name}.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            if "M parameters" in line:
                return float(line.split("model: ")[1].split(", ")[1].split("M parameters")[0]) * 1e6
    return None


def row(logs: Path, name: str, warmup: int, peak: float, params: float | None) -> dict | None:
    path = logs / f"{name}.jsonl"
    if not path.exists():
        return None
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r and "eval/loss" not in r]
    steady = rows[warmup:]
    if not steady:
        return None
    tokens = statistics.median(r["perf/tokens_per_s"] for r in steady)
    log = logs / f"{name}.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return {
        "steps_measured": len(steady),
        "tokens_per_s": tokens,
        "samples_per_s": statistics.median(r["perf/samples_per_s"] for r in steady),
        "step_s": statistics.median(PAIRS / r["perf/samples_per_s"] for r in steady),
        # the losses that sample anchors: the step's seconds in their generation, and the rest of the step
        **({"anchor_s": statistics.median(r["perf/anchor_s"] for r in steady),
            "rest_s": statistics.median(PAIRS / r["perf/samples_per_s"] - r["perf/anchor_s"] for r in steady)}
           if all("perf/anchor_s" in r for r in steady) else {}),
        "first_step_s": PAIRS / rows[0]["perf/samples_per_s"],
        "peak_mem_gb": max(r.get("perf/peak_mem_gb", 0) for r in rows),
        "mfu_dpo_flops": 8 * params * tokens / peak if params else None,
        "share_prompt_auto": next((line.split("trainer.share_prompt=auto: ", 1)[1] for line in lines
                                   if "trainer.share_prompt=auto: " in line), None),
        "cudagraph_rerecords": sum("Re-recording" in line for line in lines),
    }


def summary(out: Path, logs: Path, warmup: int, peak_tflops: float, names: list[str]) -> dict:
    params = parameters(logs, names)
    runs = {}
    for name in names:
        found = row(logs, name, warmup, peak_tflops * 1e12, params)
        if found:
            runs[name] = found
    dpo = runs.get("dpo")
    for run in runs.values():
        run["step_time_vs_dpo"] = run["step_s"] / dpo["step_s"] if dpo else None
        if "rest_s" in run:  # what the loss costs besides its sampled tokens
            run["rest_vs_dpo"] = run["rest_s"] / dpo["step_s"] if dpo else None
    read = lambda f: (out / f).read_text() if (out / f).exists() else ""  # noqa: E731
    return {"gpu": read("gpu.txt").strip(), "parameters": params, "warmup_steps_excluded": warmup,
            "checks": read("checks.txt").splitlines(), "runs": runs}


def main(argv: list[str]) -> None:
    out, logs, warmup, peak, *names = argv
    result = summary(Path(out), Path(logs), int(warmup), float(peak), names)
    (Path(out) / "gpu_bench.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
