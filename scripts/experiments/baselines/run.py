"""The paper's Table 1 comparison at demo scale (docs/results/baselines.md), end to end: warm-up,
sweep, scoring, report.

    python scripts/experiments/baselines/run.py [--out runs/baselines] [--report docs/results] [--steps N]

1. SFT warm-up (`+experiment=noise_warmup`, the label-noise study's own, through its code), or `--warmup DIR`: an
   existing warm-up's final/ (e.g. runs/noise_robustness/warmup/final).
2. One Hydra multirun (`+experiment=paper_table1_demo`, joblib launcher, 2 jobs of 1 thread each) over every loss
   of that experiment's sweep x seed, clean labels, every run starting from the warm-up's final/ (also the
   reference). With loss=tis_dpo (when its preset exists): its two contrastive models first, per seed: the
   positive one is that seed's loss=dpo run, the negative one loss=dpo with data.flip_labels=1.0 (runs/.../
   contrastive/), both from the warm-up; then the tis_dpo runs with loss.tis.positive_model / negative_model.
3. Each finished run is scored on its held-out pairs exactly as the noise study scores them (its code, imported):
   the preference accuracy of the run's own implicit reward (its final eval) and the greedy replies' critical-token
   accuracy; plus the accuracy of one scorer for every loss (the DPO implicit reward against the warm-up, which SFT
   and the reference-free losses do not log), and from metrics.jsonl the step time (32 pairs / perf/samples_per_s:
   a step's wall time from its start to the optimizer update, anchor sampling included, evals and checkpoints
   not; the median over steps after the first 5) relative to the same seed's DPO run.
4. The cost pass: every loss and seed again for --cost-steps steps, each run in a fresh process of its own
   (`tidpo train`, no multirun) and one at a time: the peak of perf/rss_mb (the sweep's joblib workers run one job
   after another in the same process, so their resident memory carries over from job to job) and the step time
   without a second run beside it.
5. baselines.json and baselines.md (a table per metric, mean +- std over seeds, each seed's value), in --out and
   in --report. A "## Reading" section already in the report is kept: it is written by hand from the numbers.

Everything is resumable: the warm-up and each run continue from their newest checkpoint, a finished run is skipped
by `tidpo train` itself, and a scored run keeps its `critical.json` and `scores.json`. Run the same command again.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT = "paper_table1_demo"
SEEDS = [0, 1, 2]
SKIP_STEPS = 5  # steps left out of the step time: allocator warm-up, the share_prompt and refresh probes
METRICS = {  # per run -> the title of its table
    "accuracy": "Held-out preference accuracy of the loss's own implicit reward (its final eval; the noise "
                "study's measure)",
    "accuracy_dpo": "Held-out preference accuracy of the DPO implicit reward against the warm-up, "
                    "beta * sum log(pi / pi_warm-up), the same scorer for every loss",
    "critical": "Greedy replies with every critical token right (the noise study's measure)",
    "exact": "Greedy replies that copy the list exactly",
    "chosen_logp_change": "Change of the held-out chosen responses' log-likelihood against the warm-up "
                          "(nats per response)",
    "step_ms": "Step time in the sweep (2 runs at a time), ms: the median over steps of 32 pairs / perf/samples_per_s",
    "step_rel": "Step time in the sweep relative to loss=dpo's (the same seed's run)",
    "cost_step_ms": "Step time in the cost pass (one run at a time), ms",
    "cost_step_rel": "Step time in the cost pass relative to loss=dpo's (the same seed's)",
    "cost_rss_mb": "Peak resident memory, MB: the max of perf/rss_mb of the cost pass's run (a fresh process each)",
}
FORMATS = {"step_ms": "{:.0f}", "cost_step_ms": "{:.0f}", "cost_rss_mb": "{:.0f}", "step_rel": "{:.2f}",
           "cost_step_rel": "{:.2f}"}


def noise_study():
    """The label-noise study's script as a module: its warm-up, `tidpo` runner and scoring are reused as they are."""
    path = REPO / "scripts" / "experiments" / "noise_robustness" / "run.py"
    spec = importlib.util.spec_from_file_location("noise_robustness_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOISE = noise_study()


def experiment_losses() -> list[str]:
    """The losses paper_table1_demo.yaml sweeps (its hydra.sweeper.params), the one list of them."""
    from hydra import compose, initialize_config_dir
    from tidpo_cli.cli import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={EXPERIMENT}"], return_hydra_config=True)
    return str(cfg.hydra.sweeper.params.loss).split(",")


def tis_dpo_available() -> bool:
    """Whether loss=tis_dpo composes and validates (its preset is another change's; it may not be there yet)."""
    from tidpo_cli.cli import compose_config
    from tidpo_cli.errors import UserError

    if not (REPO / "conf" / "loss" / "tis_dpo.yaml").is_file():
        return False
    try:
        compose_config([f"+experiment={EXPERIMENT}", "loss=tis_dpo", "model.name_or_path=x",
                        "loss.tis.positive_model=x", "loss.tis.negative_model=x"])
    except UserError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/baselines"), help="where the runs go")
    p.add_argument("--report", type=Path, default=None, help="also write baselines.md and baselines.json here")
    p.add_argument("--methods", default=None,
                   help=f"loss options, comma-separated (default: {EXPERIMENT}.yaml's sweep; tis_dpo only where its "
                        "preset composes)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with one thread)")
    p.add_argument("--steps", type=int, default=None, help="preference steps per run (default: the config's)")
    p.add_argument("--warmup", type=Path, default=None,
                   help="an existing warm-up's final/ to start from (default: train one in OUT/warmup)")
    p.add_argument("--warmup-steps", type=int, default=None, help="SFT steps (default: the config's)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out pairs (default: the config's)")
    p.add_argument("--cost-steps", type=int, default=30, help="steps of each cost-pass run (0: no cost pass)")
    return p.parse_args(argv)


def common(args: argparse.Namespace) -> list[str]:
    return NOISE.size_overrides(args.steps, args.eval_size)


def launcher(args: argparse.Namespace, sweep_dir: Path, subdir: str) -> list[str]:
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}", f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweep.subdir='{subdir}'"]


# a run's directory names its point, so a rerun finds it: loss=dpo,seed=2
SUBDIR = "loss=${hydra:runtime.choices.loss},seed=${seed}"


def sweep(out: Path, warm: Path, methods: list[str], args: argparse.Namespace) -> None:
    NOISE.tidpo(["-m", f"+experiment={EXPERIMENT}", f"model.name_or_path={warm.resolve()}",
                 f"loss={','.join(methods)}", f"seed={args.seeds}", *common(args),
                 *launcher(args, out / "sweep", SUBDIR)], NOISE.child_env(threads=1))


def tis_paths(out: Path, seed: str = "${seed}") -> tuple[str, str]:
    """TIS-DPO's contrastive models of a seed (or of every seed, as an interpolation): the sweep's dpo run, and the
    dpo run on flipped labels."""
    return (f"{(out / 'sweep').resolve()}/loss=dpo,seed={seed}/final",
            f"{(out / 'contrastive').resolve()}/negative,seed={seed}/final")


def tis_dpo_sweep(out: Path, warm: Path, args: argparse.Namespace) -> None:
    """TIS-DPO's recipe: per seed, a positive contrastive model (loss=dpo on the data: the sweep's own dpo run of
    that seed) and a negative one (loss=dpo on the data with every label flipped), both from the warm-up; then
    loss=tis_dpo from the warm-up with their weights."""
    contrastive = out / "contrastive"
    NOISE.tidpo(["-m", f"+experiment={EXPERIMENT}", f"model.name_or_path={warm.resolve()}", "loss=dpo",
                 "data.flip_labels=1.0", f"seed={args.seeds}", *common(args),
                 *launcher(args, contrastive, "negative,seed=${seed}")], NOISE.child_env(threads=1))
    positive, negative = tis_paths(out)
    NOISE.tidpo(["-m", f"+experiment={EXPERIMENT}", f"model.name_or_path={warm.resolve()}", "loss=tis_dpo",
                 f"seed={args.seeds}", f"loss.tis.positive_model='{positive}'",
                 f"loss.tis.negative_model='{negative}'", *common(args),
                 *launcher(args, out / "sweep", SUBDIR)], NOISE.child_env(threads=1))


def cost_pass(out: Path, warm: Path, methods: list[str], args: argparse.Namespace) -> None:
    """Every loss and seed for --cost-steps steps, each in a process of its own, one at a time (module docstring)."""
    for seed in args.seeds.split(","):
        for method in methods:
            run_dir = out / "cost" / f"loss={method},seed={seed}"
            if (run_dir / "final").is_dir():  # finished (final/ is written last): skip without starting a process
                continue
            tis = [f"loss.tis.positive_model='{tis_paths(out, seed)[0]}'",  # quoted: the paths hold , and =
                   f"loss.tis.negative_model='{tis_paths(out, seed)[1]}'"] if method == "tis_dpo" else []
            NOISE.tidpo([f"+experiment={EXPERIMENT}", f"model.name_or_path={warm.resolve()}", f"loss={method}",
                         f"seed={seed}", f"trainer.max_steps={args.cost_steps}", "trainer.eval_before=false", *tis,
                         *([f"data.eval_size={args.eval_size}"] if args.eval_size else []),
                         f"hydra.run.dir='{run_dir}'"], NOISE.child_env(threads=1))


def dpo_reward_scores(run_dir: Path, warm: Path) -> dict[str, float]:
    """The held-out pairs scored by one scorer for every loss: DPO's implicit reward (beta 0.1, summed log-ratios, no
    token weights) of the run's final model against the warm-up, with training's own evaluation code."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tidpo_cli.cli import compose_config
    from tidpo_cli.data.splits import load_splits
    from tidpo_cli.modeling import load_tokenizer
    from tidpo_cli.objective import TokenIds
    from tidpo_cli.trainer import evaluate

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    OmegaConf.set_struct(cfg, False)
    cfg.loss = compose_config([f"+experiment={EXPERIMENT}", "loss=dpo", f"model.name_or_path={warm}"]).loss
    tokenizer = load_tokenizer(OmegaConf.create({"name_or_path": str(warm), "tokenizer": None,
                                                 "trust_remote_code": False}))
    pairs = load_splits(cfg.data, tokenizer, seed=cfg.seed, held_out_only=True).eval
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    reference = AutoModelForCausalLM.from_pretrained(warm).eval()
    ids = TokenIds(pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id, max_length=cfg.data.max_length)
    with torch.no_grad():
        m = evaluate(policy, reference, pairs, cfg, ids, torch.device("cpu"), autocast=_no_autocast)
    beta = cfg.loss.beta
    return {"accuracy_dpo": m["eval/rewards/accuracies"], "margin_dpo": m["eval/rewards/margins"],
            "chosen_logp_change": m["eval/rewards/chosen"] / beta,
            "rejected_logp_change": m["eval/rewards/rejected"] / beta, "pairs": len(pairs)}


def _no_autocast():
    from contextlib import nullcontext

    return nullcontext()


def perf(run_dir: Path) -> dict[str, float]:
    """Step time and peak memory from the run's own metrics.jsonl (in the sweep, rss_mb carries over from the jobs the
    same joblib worker ran before: see the cost pass)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    pairs = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/samples_per_s" in r]
    by_step = {r["step"]: r for r in rows}  # a resumed run logs its replayed steps again: the last one counts
    timed = [pairs / r["perf/samples_per_s"] for s, r in sorted(by_step.items()) if s > SKIP_STEPS] or \
            [pairs / r["perf/samples_per_s"] for r in by_step.values()]
    return {"step_ms": 1000 * statistics.median(timed), "rss_mb": max(r["perf/rss_mb"] for r in rows),
            "skipped_steps": max(r.get("train/skipped_steps", 0) for r in rows),
            "final_train_loss": by_step[max(by_step)]["loss"], "steps": max(by_step)}


def cached(path: Path, compute) -> dict:
    if not path.exists():
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def score_run(run_dir: Path, warm: Path) -> None:
    """A run's greedy replies and its DPO-reward scores, each cached in the run's directory (one process of the
    scoring pool: one thread, like the runs)."""
    import torch

    torch.set_num_threads(1)
    cached(run_dir / "critical.json", lambda: NOISE.critical_accuracy(run_dir / "final", run_dir))
    cached(run_dir / "scores.json", lambda: dpo_reward_scores(run_dir, warm))


def score_warmup(warm: Path, seed: int, some_run: Path) -> None:
    """The warm-up's greedy replies to one seed's held-out pairs (those of a run of that seed)."""
    import torch

    torch.set_num_threads(1)
    cached(warm.parent / f"critical_seed{seed}.json", lambda: NOISE.critical_accuracy(warm, some_run))


def score(out: Path, warm: Path, jobs: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(one record per finished run, the warm-up scored on each seed's held-out pairs, the contrastive models)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    runs = sorted(p for p in (out / "sweep").glob("loss=*") if (p / "final").is_dir())
    seeds = sorted({int(dict(part.split("=", 1) for part in r.name.split(","))["seed"]) for r in runs})
    todo = [r for r in runs if not ((r / "critical.json").exists() and (r / "scores.json").exists())]
    todo_warm = [s for s in seeds if not (warm.parent / f"critical_seed{s}.json").exists()]
    if todo or todo_warm:
        print(f"scoring {len(todo)} runs and the warm-up on {len(todo_warm)} seeds' held-out pairs, {jobs} at a time",
              flush=True)
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the pool's processes inherit it
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(score_run, r, warm) for r in todo]
            futures += [pool.submit(score_warmup, warm, s, next(r for r in runs if f"seed={s}" in r.name.split(",")))
                        for s in todo_warm]
            for future in futures:
                future.result()
    records = []
    for run_dir in runs:
        point = dict(part.split("=", 1) for part in run_dir.name.split(","))
        record = {"run": run_dir.name, "method": point["loss"], "seed": int(point["seed"]),
                  **json.loads((run_dir / "critical.json").read_text()),
                  **json.loads((run_dir / "scores.json").read_text()),
                  **perf(run_dir)}
        record["rss_mb_sweep"] = record.pop("rss_mb")  # carried over between jobs: not a figure (the cost pass's is)
        _, last = NOISE.evals(run_dir) if point["loss"] != "sft" else (None, {})
        record["accuracy"] = last.get("eval/rewards/accuracies")  # SFT logs no reward
        records.append(record)
    for record in records:
        cost_dir = out / "cost" / record["run"]
        if (cost_dir / "final").is_dir():
            cost = perf(cost_dir)
            record.update(cost_step_ms=cost["step_ms"], cost_rss_mb=cost["rss_mb"], cost_steps=cost["steps"])
    for record in records:
        for prefix in ("", "cost_"):
            dpo = next((r for r in records if r["method"] == "dpo" and r["seed"] == record["seed"]), {})
            mine, base = record.get(f"{prefix}step_ms"), dpo.get(f"{prefix}step_ms")
            record[f"{prefix}step_rel"] = mine / base if mine is not None and base else None
    warmup = [{"seed": s, **json.loads((warm.parent / f"critical_seed{s}.json").read_text())} for s in seeds]
    contrastive = []
    for run_dir in sorted((out / "contrastive").glob("negative,*")):
        if (run_dir / "final").is_dir():
            _, last = NOISE.evals(run_dir)
            contrastive.append({"run": run_dir.name, "accuracy": last["eval/rewards/accuracies"]})
    return records, warmup, contrastive


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(records: list[dict], methods: list[str]) -> dict:
    """Mean and sample std over seeds per method and metric (a metric a method does not have is left out)."""
    summary = {}
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        if mine:
            summary[method] = {name: stats([r[name] for r in mine]) for name in METRICS
                               if all(r.get(name) is not None for r in mine)}
    return summary


def cell(value: dict | float | None, name: str) -> str:
    form = FORMATS.get(name, "{:.3f}")
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return f"{form.format(value['mean'])} ± {form.format(value['std'])}"
    return form.format(value)


def markdown(summary: dict, records: list[dict], warmup: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in records})
    lines = []
    for name, title in METRICS.items():
        lines += [f"**{title}**", "", "| loss | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---:|" + "---:|" * len(seeds)]
        for method, cells in summary.items():
            per_seed = {r["seed"]: r.get(name) for r in records if r["method"] == method}
            lines.append(f"| `{method}` | {cell(cells.get(name), name)} | "
                         + " | ".join(cell(per_seed.get(s), name) for s in seeds) + " |")
        if name in ("critical", "exact") and warmup:
            per_seed = {w["seed"]: w[name] for w in warmup}
            lines.append(f"| SFT warm-up alone | {cell(stats(list(per_seed.values())), name)} | "
                         + " | ".join(cell(per_seed.get(s), name) for s in seeds) + " |")
        lines.append("")
    return "\n".join(lines)


def checks(records: list[dict], contrastive: list[dict]) -> list[str]:
    """Facts the reader should not have to dig for: runs that skipped steps, losses that did little or diverged."""
    notes = []
    for r in records:
        if r["skipped_steps"]:
            notes.append(f"`{r['run']}` skipped {r['skipped_steps']} steps (non-finite loss or gradient)")
        if r["final_train_loss"] != r["final_train_loss"]:
            notes.append(f"`{r['run']}` ended with a NaN training loss")
        if r["chosen_logp_change"] < -10:
            notes.append(f"`{r['run']}`: the held-out chosen replies lost {-r['chosen_logp_change']:.1f} nats each "
                         f"against the warm-up (greedy replies: critical tokens {r['critical']:.3f}, exact copies "
                         f"{r['exact']:.3f})")
    for method in sorted({r["method"] for r in records}):
        mine = [r for r in records if r["method"] == method]
        low = statistics.fmean(r["accuracy_dpo"] for r in mine)
        if method != "sft" and low < 0.6:
            notes.append(f"`{method}`: DPO-reward accuracy {low:.3f} (mean over seeds): it barely moved the policy "
                         "toward the chosen responses relative to the warm-up, or away from them")
    for c in contrastive:
        notes.append(f"contrastive `{c['run']}` (loss=dpo, every label flipped): held-out accuracy {c['accuracy']:.3f}")
    return notes


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes in the working tree)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(summary: dict, records: list[dict], warmup: list[dict], contrastive: list[dict], settings: dict,
           previous: str | None) -> str:
    kept = previous[previous.index("## Reading"):].rstrip() + "\n" if previous and "## Reading" in previous else \
        "## Reading\n\n(Not written yet: read the tables above.)\n"
    flags = checks(records, contrastive)
    tis_missing = "tis_dpo" not in {r["method"] for r in records}
    return "\n".join([
        "# The paper's Table 1 losses at small scale",
        "",
        "Every offline loss of the TI-DPO paper's Table 1 that tidpo has, and TI-DPO's ablations (its Table 2), "
        "trained the same way on the demo's critical-token task from one shared SFT warm-up: the same data, steps, "
        "optimizer and seeds; each loss at its preset's values (`conf/loss/*.yaml`). Generated by "
        "`scripts/experiments/baselines/run.py`; the section *Reading* is written by hand.",
        "",
        "## What was run",
        "",
        "```bash",
        settings["command"],
        "```",
        "",
        f"- **When, where**: report written {settings['date']} at commit {settings['commit']}, {settings['machine']}, "
        f"torch {settings['torch']} (CPU), the machine shared with other work. Wall time: "
        + "; ".join(f"`{i['command'].removeprefix('python scripts/experiments/baselines/run.py').strip() or '(no options)'}` "
                    f"{i['wall_s'] / 60:.1f} min, started at commit {i.get('commit', '?')}"
                    + (f" ({i['note']})" if i.get("note") else "") for i in settings["invocations"])
        + f", {sum(i['wall_s'] for i in settings['invocations']) / 60:.1f} min in all (each invocation resumes the "
        "last: it skips what is done).",
        "- **Warm-up**: SFT on the chosen replies (`+experiment=noise_warmup`, the label-noise study's: "
        f"{settings['warmup_steps_done']} steps of 32 pairs, seed 0); `final/` is every run's start and reference.",
        f"- **Runs**: `+experiment={EXPERIMENT}`: {settings['steps_done']} steps of 32 pairs, AdamW 5e-4, cosine "
        "decay after 20 warm-up steps, clean labels (`data.flip_labels=0`), held-out pairs "
        f"{settings['pairs']}, seeds {settings['seeds']} (the data drawn, batch order, anchors), through one Hydra "
        f"multirun (joblib launcher, {settings['jobs']} runs at a time, 1 thread each). "
        + ("`tis_dpo`: not run, its preset does not exist yet (the script runs it when `loss=tis_dpo` composes)."
           if tis_missing else
           "`tis_dpo`: its contrastive models per seed are that seed's `dpo` run (positive) and `loss=dpo "
           "data.flip_labels=1.0` (negative), both from the warm-up."),
        "- **Metrics** (held-out pairs of each run's seed): the preference accuracy of the loss's own implicit "
        "reward (its final eval: reference-free losses score their own reward without the warm-up; SFT logs none), "
        "the same accuracy under one scorer for every loss (DPO's reward against the warm-up, beta 0.1), greedy "
        "replies scored on the critical tokens (the positions where chosen and rejected differ) and as exact copies "
        "(the noise study's code), the change of the chosen replies' log-likelihood.",
        "- **Cost**, from each run's `metrics.jsonl`: the step time is 32 pairs / `perf/samples_per_s` (a step's wall "
        "time from its start to the optimizer update: anchor sampling included, evals and checkpoints not), the "
        f"median over the steps after the first {SKIP_STEPS}, and its ratio to the same seed's `dpo` run; peak memory "
        "is the maximum of `perf/rss_mb` (the whole process: Python, torch, policy, reference, optimizer, batches; a "
        "CPU run has no `perf/peak_mem_gb`). Memory comes from a cost pass, because a joblib worker runs one sweep "
        "job after another in one process and its resident memory carries over: every loss and seed again for "
        f"{settings['cost_steps_done']} steps, each in a fresh `tidpo train` process, one at a time (so its step "
        "times have no second run beside them, as the sweep's have).",
        "",
        "## Results",
        "",
        "Mean ± sample standard deviation over the seeds. [baselines.json](baselines.json) holds every run.",
        "",
        markdown(summary, records, warmup),
        "**Checks** (generated)",
        "",
        *([f"- {f}" for f in flags] or ["- no run skipped a step or ended with a NaN loss; every preference loss "
                                       "reached a DPO-reward accuracy of at least 0.6"]),
        "",
        kept,
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, started_at = time.time(), commit()
    sys.path.insert(0, str(REPO))
    methods = args.methods.split(",") if args.methods else experiment_losses()
    if "tis_dpo" in methods and not tis_dpo_available():
        if args.methods:
            raise SystemExit("loss=tis_dpo does not compose here (no conf/loss/tis_dpo.yaml?): leave it out")
        print("loss=tis_dpo does not compose here (no conf/loss/tis_dpo.yaml?): left out", flush=True)
        methods.remove("tis_dpo")
    # TIS-DPO's positive contrastive model of each seed is that seed's dpo run
    main_methods = [m for m in methods if m != "tis_dpo"]
    if "tis_dpo" in methods and "dpo" not in main_methods:
        main_methods.append("dpo")
    warm = args.warmup.resolve() if args.warmup else NOISE.warm_up(args.out / "warmup", args)
    sweep(args.out, warm, main_methods, args)
    if "tis_dpo" in methods:
        tis_dpo_sweep(args.out, warm, args)
    if args.cost_steps:
        cost_pass(args.out, warm, methods, args)
    records, warmup, contrastive = score(args.out, warm.resolve(), args.jobs)
    records = [r for r in records if r["method"] in methods and str(r["seed"]) in args.seeds.split(",")]
    summary = summarize(records, methods)

    import torch

    warm_rows = [json.loads(line) for line in (warm.parent / "metrics.jsonl").read_text().splitlines()
                 if line.strip()] if (warm.parent / "metrics.jsonl").exists() else []
    argv_shown = [NOISE.shown(Path(a)) if a.startswith("/") else a for a in (argv or sys.argv[1:])]
    command = " ".join(["python scripts/experiments/baselines/run.py", *argv_shown])
    # every invocation that built this --out, with its wall time (a rerun resumes: the total is what the study took)
    log_path = args.out / "invocations.json"
    invocations = json.loads(log_path.read_text()) if log_path.exists() else []
    invocations.append({"command": command, "started": datetime.datetime.fromtimestamp(started).isoformat("T", "seconds"),
                        "commit": started_at, "wall_s": round(time.time() - started, 1)})
    log_path.write_text(json.dumps(invocations, indent=1) + "\n")
    settings = {**{k: NOISE.shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "methods": methods,
                "command": command, "invocations": invocations,
                "machine": f"{NOISE.cpu_model()}, {os.cpu_count()} cores",
                "torch": torch.__version__, "commit": commit(),
                "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "steps_done": max((r["steps"] for r in records), default=0),
                "cost_steps_done": max((r.get("cost_steps", 0) for r in records), default=0),
                "warmup_steps_done": max((r["step"] for r in warm_rows), default="?"),
                "pairs": records[0]["pairs"] if records else 0,
                "wall_s_this_invocation": round(time.time() - started, 1)}
    payload = {"settings": settings, "summary": summary, "warmup": warmup, "contrastive": contrastive,
               "runs": records}
    for where in filter(None, [args.out, args.report]):
        where.mkdir(parents=True, exist_ok=True)
        (where / "baselines.json").write_text(json.dumps(payload, indent=1) + "\n")
        doc = where / "baselines.md"
        previous = doc.read_text() if doc.exists() else None
        doc.write_text(report(summary, records, warmup, contrastive, settings, previous))
    print(markdown(summary, records, warmup))


if __name__ == "__main__":
    main()
