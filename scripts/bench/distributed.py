#!/usr/bin/env python3
"""CPU, 2 processes: step time of loss=dpo, loss=tidpo_no_triplet and loss=tidpo in one process and in
2 processes under DeepSpeed ZeRO-2 and ZeRO-3, and whether TI-DPO's cost against DPO survives the distribution.

    make bench-distributed
    BENCH_STEPS=3 BENCH_WARMUP=1 BENCH_MODEL=hidden_size=64,intermediate_size=256,num_hidden_layers=2 \
        python scripts/bench/distributed.py      # a quick look that proves nothing about speed

One invocation runs every cell (setting x loss) one after the other, each a `tidpo train` child of its own:
  single  one process, deepspeed=none, micro-batches of 4 pairs, trainer.grad_accum=2, BENCH_THREADS (2) torch
          threads: the whole 2-core machine, as the 2-process settings use it;
  zero2   `python -m torch.distributed.run --standalone --nproc_per_node 2 -m tidpo_cli.cli train`, gloo,
          deepspeed=zero2, micro-batches of 4, grad_accum=1, OMP_NUM_THREADS=1 in each process;
  zero3   the same with deepspeed=zero3 and stage3_param_persistence_threshold=0 (every tensor partitioned).
So every setting takes 8 pairs a step in forwards of the same shape (the same micro-batches, in the same order:
tidpo's one global batch stream) and only the distribution differs. The model: a Llama built from config (hidden
256, intermediate 688, 4 layers, 4 heads, 4 kv heads, byte-level tokenizer, random init from the seed: about 3.3 M
parameters, as each run's train.log says), tidpo's default synthetic pairs, fp32, AdamW at BENCH_LR (5e-6) with a
linear schedule and no warm-up, grad clip 1.0, no eval, no saving, no progress display; trainer.share_prompt=true
(the CPU's layout) in every run, so that no setting picks another layout than the others.

Step time: 8 pairs / perf/samples_per_s of each row of the run's metrics.jsonl (rank 0 logs the pairs of all
ranks over the step's wall time); a run's figure is the median over the steps after the warm-up (default: 8
steps, the first 2 left out, "the median of steps 3-8"); a cell's is the median over its BENCH_REPEATS runs (each
run is kept in the JSON; CPU timings on this shared machine move by up to a fifth). With repeats, every cell runs
once before any runs again. Ratios tidpo_no_triplet / dpo and tidpo / dpo per setting, and the targets below
as checks (pass / fail), under zero2 and under zero3:
  (a) each ratio at most 1.15x the same ratio in one process (distributed / single <= 1.15);
  (b) tidpo_no_triplet <= 1.35x and tidpo <= 2.0x a DPO step.
Beside them, for the losses that sample anchors, what the step spent sampling (perf/anchor_s: the ranks' mean
seconds in the anchors' generation, the median of steps 3-8) and the rest of the step (the median of each step's
time less its sampling) over the DPO step: what TI-DPO costs besides its sampled tokens. These are reported, not
checked. Writes BENCH_OUT (bench-distributed.json at the repo root: machine, versions, commands, every run) and
prints a markdown table: setting x loss, step (s), ratio vs dpo, sampling (s), rest vs dpo, then the checks.

Environment knobs: BENCH_STEPS (8), BENCH_WARMUP (2), BENCH_LOSSES (dpo,tidpo_no_triplet,tidpo), BENCH_SETTINGS
(single,zero2,zero3), BENCH_MODEL (LlamaConfig overrides, "key=value,key=value"), BENCH_REPEATS (1), BENCH_OUT,
and as in trl_vs_tidpo.py: BENCH_BATCH (8: pairs a step, split into 2 micro-batches), BENCH_THREADS (the one
process's threads, 2), BENCH_LR, BENCH_SEED, BENCH_TIDPO_ARGS (extra overrides for every run), BENCH_WORK,
BENCH_KEEP. The defaults take loss.importance.grad_pass=auto as a user gets it in each setting.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tidpo_cli from this checkout when not installed
import trl_vs_tidpo as bench  # noqa: E402  (the shared driver)

# The bench model: about 3.3 M parameters with the byte-level vocabulary.
MODEL_CONFIG: dict[str, Any] = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4)
PROCESSES = 2
# setting -> (processes, `tidpo train` overrides)
SETTINGS: dict[str, tuple[int, list[str]]] = {
    "single": (1, ["deepspeed=none"]),
    "zero2": (PROCESSES, ["deepspeed=zero2"]),
    "zero3": (PROCESSES, ["deepspeed=zero3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]),
}
LOSSES = ["dpo", "tidpo_no_triplet", "tidpo"]
BASELINE = "dpo"
# The targets: (a) a distributed ratio at most this factor of one process's; (b) the ratio's ceiling.
SAME_RATIO = 1.15
CEILINGS = {"tidpo_no_triplet": 1.35, "tidpo": 2.0}


def _names(text: str, known: list[str], var: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise SystemExit(f"{var}: unknown {unknown}; known: {known}")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Pure parts (tests/test_bench_distributed.py checks them)


def model_overrides(config: dict[str, Any]) -> list[str]:
    """LlamaConfig fields as `tidpo train` overrides (`++`: set whether or not conf/model/tiny.yaml names them)."""
    return [f"++model.config.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in config.items()]


def command(setting: str, loss: str, s: bench.Settings, run_dir: Path,
            python: str = sys.executable) -> tuple[list[str], int]:
    """(argv, threads per process) of one run: `python -m tidpo_cli.cli train`, or the same under torchrun."""
    processes, extra = SETTINGS[setting]
    if s.batch % PROCESSES:
        raise SystemExit(f"BENCH_BATCH ({s.batch}) must split into {PROCESSES} micro-batches")
    overrides = [
        f"loss={loss}", *extra, *model_overrides(s.model),
        "data.eval_size=0", f"trainer.micro_batch_size={s.batch // PROCESSES}",
        f"trainer.grad_accum={PROCESSES // processes}", f"trainer.max_steps={s.steps}", "trainer.optimizer=adamw",
        f"trainer.lr={s.lr}", "trainer.weight_decay=0.0", "trainer.schedule=linear", "trainer.warmup_steps=0",
        "trainer.max_grad_norm=1.0", "trainer.precision=fp32", "trainer.share_prompt=true",
        "trainer.eval_before=false", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.save_final=false", "trainer.resume=never", "trainer.device=cpu",
        "logger.progress=off", "logger.log_every=1", f"loss.beta={s.beta}", f"seed={s.seed}",
        f"hydra.run.dir={run_dir}", *s.tidpo_args,
    ]
    if processes == 1:
        return [python, "-m", "tidpo_cli.cli", "train", *overrides], s.threads
    launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launcher, "-m", "tidpo_cli.cli", "train", *overrides], 1


def shell(argv: list[str], threads: int) -> str:
    return f"OMP_NUM_THREADS={threads} {shlex.join(argv)}"


def step_times(rows: list[dict], pairs: int) -> list[float]:
    """Seconds per step from metrics.jsonl rows: `pairs` (of all processes) / perf/samples_per_s."""
    return [pairs / r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r]


def parameters(log: str) -> float | None:
    """Millions of parameters from train.log's "model: ..., X.XXM parameters" line."""
    found = re.search(r"model: .*?([\d.]+)M parameters", log)
    return float(found.group(1)) if found else None


def cell_step(runs: list[dict], key: str = "step_s") -> float | None:
    """A cell's step time (or another of its runs' figures, `key`): the median over its runs' medians (failed runs,
    and runs without the figure, left out)."""
    times = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    return statistics.median(times) if times else None


def sampling_times(rows: list[dict], step_s: list[float], warmup: int) -> dict[str, float | None]:
    """What a run's steps after the warm-up spent sampling anchors (perf/anchor_s, logged by the losses that
    sample): its median (`anchor_s`) and the median of each step's time without it (`rest_s`). None for both
    where the rows carry no perf/anchor_s."""
    anchor = [r["perf/anchor_s"] for r in rows if "perf/anchor_s" in r]
    if len(anchor) != len(step_s) or len(anchor) <= warmup:
        return {"anchor_s": None, "rest_s": None}
    return {"anchor_s": statistics.median(anchor[warmup:]),
            "rest_s": statistics.median(t - a for t, a in zip(step_s[warmup:], anchor[warmup:]))}


def ratios(steps: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """{setting: {loss: step}} -> {setting: {loss: step / dpo's step}} for the losses other than dpo."""
    out = {}
    for setting, per_loss in steps.items():
        base = per_loss.get(BASELINE)
        out[setting] = {loss: t / base if t and base else None for loss, t in per_loss.items() if loss != BASELINE}
    return out


def same_work(cells: dict[str, dict[str, dict]]) -> dict[str, bool | None]:
    """Per distributed run: whether each step held the tokens it held in one process (the first single run of the
    same loss): the same micro-batches, so that only the distribution differs. None without a single run."""
    out = {}
    for setting, per_loss in cells.items():
        if SETTINGS[setting][0] == 1:
            continue
        for loss, c in per_loss.items():
            single = cells.get("single", {}).get(loss, {"runs": []})["runs"]
            want = next((r["tokens_per_step_logged"] for r in single if "error" not in r), None)
            for i, r in enumerate(c["runs"]):
                got = r.get("tokens_per_step_logged")
                out[f"{setting}-{loss} run {i + 1}"] = None if want is None or got is None else got == want
    return out


def _verdict(value: float | None, low: float, high: float) -> bool | None:
    return None if value is None else low <= value <= high


def checks(ratio: dict[str, dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    """The targets (SAME_RATIO, CEILINGS) under each distributed setting: (a) its ratio at most SAME_RATIO times one process's
    ratio (what distribution adds to TI-DPO's cost; a lower one passes: distributed TI-DPO costing relatively less
    is no fault), (b) the ratio at most its ceiling. `pass` None where a figure is missing."""
    out = {}
    single = ratio.get("single", {})
    for setting in (x for x in ratio if SETTINGS[x][0] > 1):
        for loss, value in ratio[setting].items():
            base = single.get(loss)
            rel = value / base if value is not None and base else None
            out[f"{setting}: {loss}/{BASELINE} <= {SAME_RATIO} x one process's"] = {
                "value": rel, "op": "<=", "threshold": SAME_RATIO,
                "pass": _verdict(rel, 0.0, SAME_RATIO),
                "ratio": f"({setting} {loss}/{BASELINE}) / (single {loss}/{BASELINE})"}
            if loss in CEILINGS:
                out[f"{setting}: {loss} step <= {CEILINGS[loss]} x {BASELINE}"] = {
                    "value": value, "op": "<=", "threshold": CEILINGS[loss],
                    "pass": _verdict(value, 0.0, CEILINGS[loss]), "ratio": f"{setting} {loss}/{BASELINE}"}
    return out


def markdown(cells: dict[str, dict[str, dict]], ratio: dict[str, dict[str, float | None]],
             check: dict[str, dict]) -> str:
    f = bench._fmt
    repeats = max((len(c["runs"]) for per_loss in cells.values() for c in per_loss.values()), default=1)
    head = ["setting", "`loss=`", "step (s)", f"vs `{BASELINE}`", "sampling (s)", f"rest vs `{BASELINE}`"] + (
        [f"run {i + 1} (s)" for i in range(repeats)] if repeats > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for setting, per_loss in cells.items():
        base = per_loss.get(BASELINE, {}).get("step_s")
        for loss, c in per_loss.items():
            vs = 1.0 if loss == BASELINE and c["step_s"] else ratio.get(setting, {}).get(loss)
            rest = c.get("rest_s") / base if c.get("rest_s") is not None and base else None
            cols = [setting, f"`{loss}`", "failed" if c["step_s"] is None else f(c["step_s"]), f(vs),
                    f(c.get("anchor_s")), f(rest)]
            if repeats > 1:
                cols += ["failed" if "error" in r else f(r.get("step_s")) for r in c["runs"]]
            lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "| check | value | threshold | pass |", "|---|---:|---:|---|"]
    for name, t in check.items():
        verdict = "-" if t["pass"] is None else ("yes" if t["pass"] else "NO")
        lines.append(f"| {name} | {f(t['value'])} | {t['op']} {t['threshold']} | {verdict} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The driver


def run_cell(label: str, setting: str, loss: str, s: bench.Settings, work: Path) -> dict[str, Any]:
    run_dir = work / "runs" / label
    argv, threads = command(setting, loss, s, run_dir)
    log = work / f"{label}.log"
    print(f"[distributed] {label}: {SETTINGS[setting][0]} process(es), {threads} thread(s) each ...", flush=True)
    child = bench.run_child(argv, log, threads)
    result: dict[str, Any] = {"command": shell(argv, threads), "threads_per_process": threads, "log": str(log),
                              **child}
    metrics = run_dir / "metrics.jsonl"
    if child["rc"] != 0 or not metrics.exists():
        result.update(error=f"exit {child['rc']}", log_tail=bench._tail(log))
        print(f"[distributed] {label}: FAILED ({result['error']}), log {log}:\n{result['log_tail']}", flush=True)
        return result
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/samples_per_s" in r]
    step_s = step_times(rows, s.batch)
    tokens = [round(r["perf/tokens_per_s"] * t) for r, t in zip(rows, step_s)]
    train_log = run_dir / "train.log"
    result.update(bench.summarize(step_s, s.batch, tokens, s.warmup), **sampling_times(rows, step_s, s.warmup),
                  steps_run=len(step_s), step_times_s=step_s, tokens_per_step_logged=tokens,
                  anchor_s_logged=[r["perf/anchor_s"] for r in rows if "perf/anchor_s" in r],
                  losses=[r.get("loss") for r in rows],
                  parameters_m=parameters(train_log.read_text()) if train_log.exists() else None)
    print(f"[distributed] {label}: step {result['step_s']:.3f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
          f"(largest process), wall {result['wall_s']:.1f} s", flush=True)
    return result


def main() -> int:
    s = bench.Settings.from_env(steps=8, warmup=2, model=dict(MODEL_CONFIG))
    losses = _names(os.environ.get("BENCH_LOSSES", ",".join(LOSSES)), LOSSES, "BENCH_LOSSES")
    settings = _names(os.environ.get("BENCH_SETTINGS", ",".join(SETTINGS)), list(SETTINGS), "BENCH_SETTINGS")
    repeats = int(os.environ.get("BENCH_REPEATS", "1"))
    work, keep = bench.work_dir()
    out = bench.out_path("bench-distributed.json")
    started = time.perf_counter()
    print(f"[distributed] work dir {work}; settings {settings} x losses {losses}, {s.steps} steps of {s.batch} "
          f"pairs (warm-up {s.warmup}), {repeats} repeat(s)", flush=True)

    cells: dict[str, dict[str, dict]] = {x: {loss: {"runs": []} for loss in losses} for x in settings}
    for repeat in range(repeats):
        for setting in settings:
            for loss in losses:
                label = f"{setting}-{loss}" + (f"-r{repeat + 1}" if repeats > 1 else "")
                cells[setting][loss]["runs"].append(run_cell(label, setting, loss, s, work))
    for per_loss in cells.values():
        for c in per_loss.values():
            c.update({key: cell_step(c["runs"], key) for key in ("step_s", "anchor_s", "rest_s")})
    ratio = ratios({x: {loss: c["step_s"] for loss, c in per_loss.items()} for x, per_loss in cells.items()})
    check = checks(ratio)

    runs = [r for per_loss in cells.values() for c in per_loss.values() for r in c["runs"]]
    record = bench.common_settings(s, {"config": dict(s.model), "seed": s.seed, "architecture": "LlamaForCausalLM",
                                       "parameters_m": next((r["parameters_m"] for r in runs
                                                             if r.get("parameters_m")), None)})
    for name in ("max_length", "max_prompt_length"):  # the synthetic data's own (conf/data/synthetic.yaml)
        record.pop(name)
    record.update(
        data="synthetic (tidpo's default pairs, conf/data/synthetic.yaml), data.eval_size=0",
        micro_batch_size=s.batch // PROCESSES, repeats=repeats, losses=losses, wall_s=time.perf_counter() - started,
        threads={x: f"{s.threads} torch threads in one process" if SETTINGS[x][0] == 1
                 else f"OMP_NUM_THREADS=1 in each of {SETTINGS[x][0]} processes" for x in settings},
        settings={x: {"processes": SETTINGS[x][0], "overrides": SETTINGS[x][1],
                      "grad_accum": PROCESSES // SETTINGS[x][0]} for x in settings},
        step_time="pairs / perf/samples_per_s per metrics.jsonl row; median of steps "
                  f"{s.warmup + 1}-{s.steps} per run; median over the repeats per cell")
    doc = {"settings": record, "cells": cells, "ratios": ratio, "checks": check, "same_batches": same_work(cells)}
    failed = any("error" in r for r in runs)
    return bench.finish("distributed", out, doc, markdown(cells, ratio, check), work, keep, failed)


if __name__ == "__main__":
    sys.exit(main())
