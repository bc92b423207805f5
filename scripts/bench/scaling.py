#!/usr/bin/env python3
"""CPU scaling table: step time of `tidpo train` loss=dpo and loss=tidpo over max_length x batch.

    make bench-scaling HH=path/to/hh-rlhf/harmless-base/test.jsonl.gz
    BENCH_LENGTHS=128,256 BENCH_BATCHES=4 BENCH_MODEL=hidden_size=64,intermediate_size=256,num_hidden_layers=2 \
        python scripts/bench/scaling.py          # a quick look that proves nothing about speed

The same driver as scripts/bench/trl_vs_tidpo.py (its functions, imported): one model directory (the bench's
~25 M-parameter Llama, byte-level tokenizer, fixed seed), then for each max_length (prompt limit = half of it)
and batch one rows file, and for each loss one `tidpo train` child (2 threads, fp32, no eval, no saving, rows in
file order); the median step time after the warm-up steps. Writes BENCH_OUT (bench-scaling.json at the repo root)
and prints a markdown table: tokens per step (the real mean over the measured steps, counted from the rows: BOS +
prompt + response + EOS of both sides), step time, milliseconds per 1,000 tokens, and the tidpo / dpo ratio.

Rows (BENCH_SCALING_ROWS):
  fill  (default) every sequence is max_length long, so the cells measure the length they name: HH-RLHF rows
        whose prompt (the dialogue so far) fills the prompt half, cut from the left; each response continued with
        the whole dialogues of the rows that follow it in the file (the same continuation for chosen and
        rejected) until it fills the other half, cut from the right. HH responses alone are short (median about
        110 bytes; at max_length 1024 only about 24 of the 2,312 pairs fill both halves), so without this the
        1024 cells would mostly measure padding-free 300-token rows;
  first the first usable rows as they are (natural lengths: long rows are cut, short ones stay short).

Checks (in the JSON, with pass / fail): step time grows no faster than tokens x length from one length to the
next (per loss and batch), and the tidpo / dpo ratio does not grow with length (per batch: its value at the
longest length <= its value at the shortest x (1 + BENCH_TOLERANCE), default 0.1).

Environment knobs: BENCH_LENGTHS (128,256,512,1024), BENCH_BATCHES (4,8,16), BENCH_LOSSES (dpo,tidpo),
BENCH_STEPS (3), BENCH_WARMUP (1), BENCH_SCALING_ROWS, BENCH_TOLERANCE, BENCH_OUT (bench-scaling.json), and as in
trl_vs_tidpo.py: BENCH_MODEL, BENCH_TIDPO_ARGS, BENCH_THREADS, BENCH_LR, BENCH_SEED, HH (the HH-RLHF file, as there:
without it the command stops in one line saying to pass HH=PATH), BENCH_WORK, BENCH_KEEP.
Every cell runs a full child process; at the default grid that is 24 runs, the 1024 x 16 tidpo ones the longest.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tidpo_cli from this checkout when not installed
import trl_vs_tidpo as bench  # noqa: E402  (the shared driver)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def fill_rows(raw: list[dict], n: int, n_tokens: Callable[[str], int], max_length: int, max_prompt_length: int,
              bos: int = 1, eos: int = 1) -> tuple[list[dict], int]:
    """`n` pairs whose sequences are max_length long (see the module doc, "fill"); and how many were skipped."""
    dialogues = [r["chosen"] for r in raw if isinstance(r.get("chosen"), str)]

    def filled(i: int, raw_row: dict) -> dict | None:
        split = bench.split_hh(raw_row)
        if split is None or n_tokens(split[0]) < max_prompt_length - bos:
            return None
        prompt, chosen, rejected = split
        room, tail, j = max_length - max_prompt_length, "", i + 1
        while n_tokens(tail) < room:
            tail += dialogues[j % len(dialogues)]
            j += 1
        return bench.fit_row(prompt, chosen + tail, rejected + tail, n_tokens, max_length, max_prompt_length, bos,
                             eos)

    return bench.first_rows(raw, n, filled)


def checks(cells: list[dict], losses: list[str], tolerance: float) -> dict[str, Any]:
    """Growth of step time against tokens x length, and the trend of the tidpo / dpo ratio over length."""
    growth, trend = [], []
    batches = sorted({c["batch"] for c in cells})
    for batch in batches:
        row = sorted((c for c in cells if c["batch"] == batch), key=lambda c: c["max_length"])
        for loss in losses:
            ok = [c for c in row if c["runs"].get(loss, {}).get("step_s")]
            for a, b in zip(ok, ok[1:]):
                ra, rb = a["runs"][loss], b["runs"][loss]
                cost = rb["step_s"] / ra["step_s"]
                tokens = rb["tokens_per_step"] / ra["tokens_per_step"]
                bound = tokens * b["max_length"] / a["max_length"]
                growth.append({"loss": loss, "batch": batch, "from": a["max_length"], "to": b["max_length"],
                               "step_ratio": cost, "tokens_ratio": tokens, "tokens_x_length_ratio": bound,
                               "pass": cost <= bound})
        with_ratio = [c for c in row if c.get("ratio") is not None]
        if len(with_ratio) >= 2:
            first, last = with_ratio[0]["ratio"], with_ratio[-1]["ratio"]
            trend.append({"batch": batch, "ratios": {c["max_length"]: c["ratio"] for c in with_ratio},
                          "threshold": first * (1 + tolerance), "pass": last <= first * (1 + tolerance)})
    return {
        "step time grows no faster than tokens x length": {
            "pass": all(g["pass"] for g in growth) if growth else None, "steps": growth},
        f"{'/'.join(losses[1:2] + losses[:1])} ratio does not grow with length (tolerance {tolerance})": {
            "pass": all(t["pass"] for t in trend) if trend else None, "per_batch": trend},
    }


def markdown(cells: list[dict], losses: list[str]) -> str:
    f = bench._fmt
    head = ["max_length", "batch", "tokens/step"]
    for loss in losses:
        head += [f"`{loss}` step (s)", f"`{loss}` ms / 1k tokens"]
    if len(losses) >= 2:
        head.append(f"`{losses[1]}` / `{losses[0]}`")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for c in cells:
        cols = [str(c["max_length"]), str(c["batch"]), f(c["tokens_per_step"], 0)]
        for loss in losses:
            r = c["runs"].get(loss, {})
            cols += ["failed" if "error" in r else f(r.get("step_s")), f(r.get("ms_per_1k_tokens"), 1)]
        if len(losses) >= 2:
            cols.append(f(c.get("ratio")))
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> int:
    s = bench.Settings.from_env(steps=3, warmup=1)
    bench.require_hh(s, "make bench-scaling")
    lengths = _ints(os.environ.get("BENCH_LENGTHS", "128,256,512,1024"))
    batches = _ints(os.environ.get("BENCH_BATCHES", "4,8,16"))
    losses = [x.strip() for x in os.environ.get("BENCH_LOSSES", "dpo,tidpo").split(",") if x.strip()]
    mode = os.environ.get("BENCH_SCALING_ROWS", "fill")
    if mode not in ("fill", "first"):
        raise SystemExit(f"BENCH_SCALING_ROWS={mode!r}: use fill or first")
    tolerance = float(os.environ.get("BENCH_TOLERANCE", "0.1"))
    s.model["max_position_embeddings"] = max(s.model.get("max_position_embeddings", 0), max(lengths))
    work, keep = bench.work_dir()
    out = bench.out_path("bench-scaling.json")
    started = time.perf_counter()
    print(f"[scaling] work dir {work}; lengths {lengths} x batches {batches}, losses {losses}, {s.steps} steps "
          f"(warm-up {s.warmup}), rows: {mode}", flush=True)
    model_dir = work / "model"
    model_info = bench.build_model_dir(model_dir, s.model, s.seed)
    n_tokens, bos = bench.token_counter(bench.byte_tokenizer())
    raw = list(bench.read_jsonl(s.data))

    cells = []
    for length in lengths:
        for batch in batches:
            cs = replace(s, max_length=length, max_prompt_length=length // 2, batch=batch)
            n = cs.steps * batch
            if mode == "fill":
                rows, skipped = fill_rows(raw, n, n_tokens, length, length // 2, bos)
            else:
                rows, skipped = bench.select_rows(raw, n, n_tokens, length, length // 2, bos)
            data = bench.prepare_rows(cs, work / f"rows-L{length}-B{batch}.jsonl", n, rows=rows, skipped=skipped)
            measured = data["step_tokens"][cs.warmup:]
            cell = {"max_length": length, "max_prompt_length": length // 2, "batch": batch,
                    "tokens_per_step": sum(measured) / len(measured),
                    "mean_tokens_per_sequence": data["mean_tokens_per_pair"] / 2, "runs": {}}
            for loss in losses:
                label = f"L{length}-B{batch}-{loss}"
                r = bench.run_contender(label, f"loss={loss}", cs, work, model_dir, data)
                if "error" not in r:
                    r["ms_per_1k_tokens"] = r["step_s"] * 1e6 / r["tokens_per_step"]
                cell["runs"][loss] = r
            if len(losses) >= 2:
                a, b = (cell["runs"][x].get("step_s") for x in losses[:2])
                cell["ratio"] = b / a if a and b else None
            cells.append(cell)

    settings = {**bench.common_settings(s, model_info), "lengths": lengths, "batches": batches,
                "losses": losses, "rows": mode, "wall_s": time.perf_counter() - started}
    settings.update(max_length=lengths, max_prompt_length=[x // 2 for x in lengths], batch=batches)
    doc = {"settings": settings, "cells": cells, "checks": checks(cells, losses, tolerance)}
    verdicts = [f"[scaling] {name}: {'-' if c['pass'] is None else ('pass' if c['pass'] else 'FAIL')}"
                for name, c in doc["checks"].items()]
    failed = any("error" in r for c in cells for r in c["runs"].values())
    return bench.finish("scaling", out, doc, "\n".join([markdown(cells, losses), "", *verdicts]), work, keep, failed)


if __name__ == "__main__":
    sys.exit(main())
