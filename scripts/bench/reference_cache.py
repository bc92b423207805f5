#!/usr/bin/env python3
"""What `trainer.reference_cache=auto` saves a sweep: the demo-sized sweep of `loss=dpo` over 3 betas x 2 seeds
(6 jobs, Hydra's basic launcher, one after another), run twice, with the cache off and with `auto` (one cache in the
sweep's directory, filled by the first job, read by the other five). Wall time of each whole sweep, each job's time
and cache counts from its train.log, and the held-out numbers of both sweeps (which must agree).

    python scripts/bench/reference_cache.py                   # writes bench-reference-cache.json
    BENCH_STEPS=400 BENCH_OUT=docs/benchmarks/x.json python scripts/bench/reference_cache.py

The sweep starts from one model, as a DPO sweep starts from its SFT model: 100 SFT steps of the demo's tiny Llama
on the demo's pairs, which are written to a JSON-lines file first (the synthetic task draws its rows from the seed;
a file keeps the rows the same for every seed, as a user's data is). Each job: the demo's settings (32 pairs a step,
AdamW at 2e-3, eval before and after) for BENCH_STEPS (200) steps. Work files go to BENCH_WORK (a temporary
directory by default).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tidpo_cli from this checkout when not installed

import torch  # noqa: E402

from tidpo_cli.data.synthetic import synthetic_rows  # noqa: E402

BETAS, SEEDS = "0.05,0.1,0.2", "1,2"
SHAPE = ["data.max_length=48", "data.max_prompt_length=32", "logger.progress=off", "trainer.save_every=0",
         "trainer.save_final=false", "trainer.share_prompt=true"]  # one layout for both sweeps (auto would time it)


def tidpo(args: list[str], cwd: Path) -> float:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tidpo_cli.cli", "train", *args], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        sys.exit(f"reference_cache bench: tidpo train {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def job_facts(job_dir: Path) -> dict:
    log = (job_dir / "train.log").read_text()
    cache = re.search(r"reference cache \S+: (\d+) sequences read, (\d+) computed", log)
    lines = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    stamps = [int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1000
              for h, m, sec, ms in re.findall(r"^\[\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d+)\]", log, re.M)] or [0.0]
    return {"point": [o.strip() for o in (job_dir / ".hydra" / "overrides.yaml").read_text().split("\n- ")[1:3]],
            "logged_s": round(stamps[-1] - stamps[0], 2),
            "sequences_read": int(cache.group(1)) if cache else None,
            "sequences_computed": int(cache.group(2)) if cache else None,
            "eval_accuracy": lines[-1].get("eval/rewards/accuracies"), "eval_loss": lines[-1].get("eval/loss")}


def agreement(off_dir: Path, auto_dir: Path) -> dict:
    """How closely each job's per-step training losses agree between the sweeps: the largest difference over the
    first 20 steps of every job, and per job the first step where the difference passes 1e-4 (float rounding
    differences grow as training goes on, fastest through the steps whose gradients are clipped)."""
    def losses(job: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    first, past = 0.0, []
    for job in sorted((p for p in off_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        diffs = [abs(a - b) for a, b in zip(losses(job), losses(auto_dir / job.name))]
        first = max(first, *diffs[:20])
        past.append(next((step for step, d in enumerate(diffs, 1) if d > 1e-4), None))
    return {"steps_1_20_max_loss_difference": first, "first_step_past_1e-4_per_job": past}


def main() -> None:
    steps = int(os.environ.get("BENCH_STEPS", "200"))
    out = Path(os.environ.get("BENCH_OUT", "bench-reference-cache.json"))
    work = Path(os.environ.get("BENCH_WORK") or tempfile.mkdtemp(prefix="tidpo-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / "pairs.jsonl"
    with open(pairs, "w") as f:
        for _, row in synthetic_rows(4096 + 256, 0, min_items=4, max_items=8, max_changed=2, name="bench"):
            f.write(json.dumps(row) + "\n")
    data = ["data=preference", "data.format=auto", f"data.path={pairs}", *SHAPE]
    warmup_s = tidpo(["loss=sft", *data, "trainer.max_steps=100", "trainer.save_final=true",
                      f"hydra.run.dir={work / 'start'}"], cwd=work)
    start = [f"model.name_or_path={work / 'start' / 'final'}", "model.tokenizer=null"]
    sweeps = {}
    for mode in ("off", "auto"):
        sweep_dir = work / f"sweep-{mode}"
        seconds = tidpo(["-m", "loss=dpo", f"loss.beta={BETAS}", f"seed={SEEDS}", *data, *start,
                         f"trainer.max_steps={steps}", f"trainer.reference_cache={mode}",
                         f"hydra.sweep.dir={sweep_dir}"], cwd=work)
        jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        sweeps[mode] = {"wall_s": round(seconds, 2), "jobs": [job_facts(j) for j in jobs]}
    off, auto = sweeps["off"], sweeps["auto"]
    agree = agreement(work / "sweep-off", work / "sweep-auto")
    report = {
        "what": "6-job demo-sized sweep of loss=dpo (3 betas x 2 seeds, basic launcher), trainer.reference_cache off "
                "vs auto, from one SFT start",
        "command": "python scripts/bench/reference_cache.py" + (f" (BENCH_STEPS={steps})" if steps != 200 else ""),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                                                      f"{os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
        "steps_per_job": steps, "pairs": {"train": 4096, "held_out": 256}, "sft_warmup_s": round(warmup_s, 2),
        "sweeps": sweeps, "auto_vs_off_wall": round(auto["wall_s"] / off["wall_s"], 3),
        "agreement": agree,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"sweep wall time: off {off['wall_s']:.1f} s, auto {auto['wall_s']:.1f} s "
          f"({report['auto_vs_off_wall']:.2f}x); per-step losses over steps 1-20 agree to "
          f"{agree['steps_1_20_max_loss_difference']:.1e}; {out}")


if __name__ == "__main__":
    main()
