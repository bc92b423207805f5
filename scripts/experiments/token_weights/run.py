"""Where TI-DPO's token weights go, and whether other saliency targets and attributions change it
(docs/results/token_weights.md), end to end: warm-up, sweeps, scoring, report.

    python scripts/experiments/token_weights/run.py [--out runs/token_weights] [--report docs/results]

1. The label-noise study's SFT warm-up (`+experiment=noise_warmup`, in --warmup-dir: `make experiment-weights` uses
   the noise study's own runs/noise_robustness/warmup, trained there if it is not yet).
2. One Hydra multirun (`+experiment=noise_robustness loss=tidpo_no_triplet`, joblib launcher, 2 jobs of 1 thread
   each) over loss.importance.target x loss.importance.attribution x loss.importance.exclude_last x
   data.flip_labels x seed, and a second one of `loss=dpo` (every weight 1) over data.flip_labels x seed; every run
   starts from the warm-up's final/ (also the reference). No triplet term: in the noise study it dominates the
   outcome and would hide what the weights do.
3. Each finished run is scored on its clean held-out pairs: from its metrics.jsonl the weights' share on the
   critical tokens and on the last token before training (the eval at step 0) and after it (the final eval),
   the implicit reward's preference accuracy (the final eval) and the change of the chosen replies'
   log-likelihood; the raw importance (before the prior is mixed in) on the critical tokens and on the token just
   before each, with the warm-up and with the final model; and the greedy replies' critical-token accuracy (the
   noise study's code, imported). For each seed's held-out responses, the same shares of two weightings that need
   no model: uniform weights (DPO's) and the Gaussian prior alone.
4. token_weights.json, token_weights_table.md and token_weights.png, in --out and in --report.

Everything is resumable: the warm-up and each run continue from their newest checkpoint, a finished run is
skipped by `tidpo train` itself, and the scores are kept (`critical.json`, `shares.json`, `raw_shares_end.json` in a
run, the warm-up's `raw_shares/`). Run the same command again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
TARGETS = ["last_max_logit", "sequence_logp", "margin"]
ATTRIBUTIONS = ["grad_l1", "grad_x_input"]
EXCLUDE_LAST = ["false", "true"]
NOISE = [0.0, 0.4]
SEEDS = [0, 1, 2]
BASELINE = "dpo"
PAPER = ("last_max_logit", "grad_l1", False)  # the paper's Eq. 5-6: every preset's default
SHARES = ("critical_share", "last_share")
REFERENCE_SHARES = (*SHARES, "before_share")
# one table per entry: its title, the metric before training (None: no such column) and the one after it; a column
# per flipped fraction
TABLES = {
    "critical_share": ("Share of the weight on the critical tokens (held-out responses; eval/importance/"
                       "critical_share)", "critical_share_start", "critical_share_end"),
    "last_share": ("Share of the weight on the last response token (held-out responses; eval/importance/last_share)",
                   "last_share_start", "last_share_end"),
    "raw_critical": ("Share of the raw gradient importance (before the prior is mixed in) on the critical tokens",
                     "raw_critical_start", "raw_critical_end"),
    "raw_before": ("Share of the raw gradient importance on the token just before each critical token (inside the "
                   "response)", "raw_before_start", "raw_before_end"),
    "accuracy": ("Held-out preference accuracy of the implicit reward (the final eval)", None, "accuracy"),
    "critical": ("Greedy replies with every critical token right (the noise study's measure)", None, "critical"),
    "chosen_logp_change": ("Change of the held-out chosen responses' log-likelihood (nats per response, end - start)",
                           None, "chosen_logp_change"),
}
# the share of the weightings that need no model shown under each table of shares
REFERENCE_ROWS = {"critical_share": "critical_share", "last_share": "last_share", "raw_critical": "critical_share",
                  "raw_before": "before_share"}
METRICS = sorted({metric for _, start, end in TABLES.values() for metric in (start, end) if metric})


def noise_study():
    """The label-noise study's script as a module: its `tidpo` runner and greedy scoring are reused as they are."""
    path = REPO / "scripts" / "experiments" / "noise_robustness" / "run.py"
    spec = importlib.util.spec_from_file_location("noise_robustness_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOISE_STUDY = noise_study()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/token_weights"), help="where the runs go")
    p.add_argument("--report", type=Path, default=None, help="also write the tables, plot and JSON here")
    p.add_argument("--warmup-dir", type=Path, default=None,
                   help="the SFT warm-up's run directory, trained there unless finished (default: OUT/warmup)")
    p.add_argument("--targets", default=",".join(TARGETS), help="loss.importance.target values")
    p.add_argument("--attributions", default=",".join(ATTRIBUTIONS), help="loss.importance.attribution values")
    p.add_argument("--exclude-last", default=",".join(EXCLUDE_LAST), help="loss.importance.exclude_last values")
    p.add_argument("--baseline", default=BASELINE, help="the uniform-weight loss run beside them ('' for none)")
    p.add_argument("--noise", default=",".join(map(str, NOISE)), help="data.flip_labels values")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with one thread)")
    p.add_argument("--steps", type=int, default=None, help="preference steps per run (default: the config's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="SFT steps (default: the config's)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out pairs (default: the config's)")
    return p.parse_args(argv)


# a run's directory names its point, so a rerun finds it (and `point` reads it back)
WEIGHTS_SUBDIR = ("target=${loss.importance.target},attribution=${loss.importance.attribution},"
                  "exclude_last=${loss.importance.exclude_last},data.flip_labels=${data.flip_labels},seed=${seed}")
BASELINE_SUBDIR = "loss=${hydra:runtime.choices.loss},data.flip_labels=${data.flip_labels},seed=${seed}"


def multirun(overrides: list[str], sweep_dir: Path, subdir: str, args: argparse.Namespace, warm: Path) -> None:
    NOISE_STUDY.tidpo(["-m", "+experiment=noise_robustness", f"model.name_or_path={warm.resolve()}", *overrides,
                       f"data.flip_labels={args.noise}", f"seed={args.seeds}",
                       *NOISE_STUDY.size_overrides(args.steps, args.eval_size),
                       "hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}", f"hydra.sweep.dir={sweep_dir}",
                       f"hydra.sweep.subdir='{subdir}'"], NOISE_STUDY.child_env(threads=1))


def sweeps(out: Path, warm: Path, args: argparse.Namespace) -> None:
    multirun(["loss=tidpo_no_triplet", f"loss.importance.target={args.targets}",
              f"loss.importance.attribution={args.attributions}", f"loss.importance.exclude_last={args.exclude_last}"],
             out / "sweep", WEIGHTS_SUBDIR, args, warm)
    if args.baseline:
        multirun([f"loss={args.baseline}"], out / "baseline", BASELINE_SUBDIR, args, warm)


def method_name(target: str, attribution: str, exclude_last: bool) -> str:
    return f"{target} · {attribution}" + (" · exclude_last" if exclude_last else "")


def point(run_dir: Path) -> dict:
    """The run's place in the study, from its directory name."""
    values = dict(part.split("=", 1) for part in run_dir.name.split(","))
    record = {"noise": float(values["data.flip_labels"]), "seed": int(values["seed"])}
    if "loss" in values:
        return {**record, "method": f"{values['loss']} (uniform weights)", "target": None, "attribution": None,
                "exclude_last": None}
    exclude_last = values["exclude_last"].lower() == "true"
    return {**record, "method": method_name(values["target"], values["attribution"], exclude_last),
            "target": values["target"], "attribution": values["attribution"], "exclude_last": exclude_last}


def eval_rows(run_dir: Path) -> tuple[dict, dict]:
    """The run's first (step 0) and last held-out eval rows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "eval/rewards/accuracies" in r]
    return rows[0], rows[-1]


def reference_shares(run_dir: Path) -> dict[str, dict[str, float]]:
    """`weighting_shares` of the run's held-out responses, with the run's sigma_div."""
    pairs, tokenizer, cfg = NOISE_STUDY.held_out(run_dir / "final", run_dir)
    return weighting_shares(pairs, tokenizer.pad_token_id, cfg.loss.importance.sigma_div)


def weighting_shares(pairs, pad_id: int, sigma_div: float) -> dict[str, dict[str, float]]:
    """The critical and last-token shares of two weightings that need no model, as the training metrics compute
    them (objective.add_weight_metrics, means over the responses): uniform weights (DPO's: every weight 1) and the
    Gaussian prior alone (what TI-DPO's weights fall back to where the saliency is zero)."""
    import torch

    from tidpo_cli.data.collate import collate
    from tidpo_cli.importance import last_token, mix_weights, weight_shares
    from tidpo_cli.losses import response_mask

    batch = collate(pairs, pad_id)
    response = response_mask(batch["labels"])
    marked = batch["critical_rows"]
    critical = batch["critical_mask"]
    before = torch.nn.functional.pad(critical[:, 1:], (0, 1)) & response & ~critical  # the token before each
    weightings = {"uniform weights": response.float(),
                  "Gaussian prior alone": mix_weights(torch.zeros_like(response, dtype=torch.float), response,
                                                      lam=0.0, sigma_div=sigma_div).weights}
    return {name: {"critical_share": float(weight_shares(w, response, critical)[marked].mean()),
                   "before_share": float(weight_shares(w, response, before)[marked].mean()),
                   "last_share": float(weight_shares(w, response, last_token(response)).mean())}
            for name, w in weightings.items()}


def raw_shares(model_dir: Path, run_dir: Path) -> dict[str, float]:
    """The raw gradient importance of `model_dir` (the saliency normalised to sum 1 over each response, before the
    prior is mixed in) on the run's held-out responses with the run's target and attribution, one response at a
    time (explain.response_table): its share on the critical tokens and on the token just before each critical
    token that is not one itself (inside the response), means over the marked responses. The input embedding of
    token t feeds the predictions of the tokens after t, never that of t itself."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tidpo_cli.explain import response_table

    hf_logging.disable_progress_bar()
    pairs, tokenizer, cfg = NOISE_STUDY.held_out(model_dir, run_dir)
    imp = cfg.loss.importance
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    on, before = [], []
    for pair in pairs:
        for ids, critical, sign in ((pair.chosen_ids, pair.critical[0], 1.0), (pair.rejected_ids, pair.critical[1], -1.0)):
            if not critical:
                continue
            raw = response_table(model, tokenizer, pair.prompt_ids, ids, critical, sign, lam=imp.lam,
                                 sigma_div=imp.sigma_div, target=imp.target, attribution=imp.attribution,
                                 exclude_last=imp.exclude_last)["raw"]
            on.append(sum(raw[i] for i in critical))
            before.append(sum(raw[i - 1] for i in critical if i > 0 and i - 1 not in critical))
    return {"raw_critical": statistics.fmean(on), "raw_before": statistics.fmean(before)}


def cached(path: Path, compute) -> dict:
    if not path.exists():
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def score_run(run_dir: Path, warm: Path, uniform: dict[str, float]) -> dict:
    """The run's record; `uniform`: uniform weights' shares of its seed's held-out responses."""
    record = {"run": f"{run_dir.parent.name}/{run_dir.name}", **point(run_dir)}
    record.update(cached(run_dir / "critical.json",
                         lambda: NOISE_STUDY.critical_accuracy(run_dir / "final", run_dir)))
    first, last = eval_rows(run_dir)
    record["accuracy"] = last["eval/rewards/accuracies"]
    record["chosen_logp_change"] = last["eval/logps/chosen"] - first["eval/logps/chosen"]
    if record["target"] is None:  # uniform weights: their shares are the data's; no raw importance
        for share in SHARES:
            record[f"{share}_start"] = record[f"{share}_end"] = uniform[share]
        for raw in ("raw_critical", "raw_before"):
            record[f"{raw}_start"] = record[f"{raw}_end"] = None
        return record
    for share in SHARES:
        record[f"{share}_start"] = first[f"eval/importance/{share}"]
        record[f"{share}_end"] = last[f"eval/importance/{share}"]
    for when, (model_dir, path) in raw_tasks(run_dir, warm).items():
        raw = cached(path, lambda: raw_shares(model_dir, run_dir))
        record.update({f"{name}_{when}": value for name, value in raw.items()})
    return record


def raw_tasks(run_dir: Path, warm: Path) -> dict[str, tuple[Path, Path]]:
    """{"start" | "end": (the model whose raw importance is measured, where its `raw_shares` are kept)}. Before
    training the model is the warm-up, and the raw importance depends on the run's target, attribution, seed and
    data.eval_size (its held-out pairs) only, so runs that share them share one file (in the warm-up's directory)."""
    from omegaconf import OmegaConf

    at = point(run_dir)
    eval_size = OmegaConf.load(run_dir / ".hydra" / "config.yaml").data.eval_size
    start = warm.parent / "raw_shares" / f"{at['target']},{at['attribution']},seed={at['seed']},eval_size={eval_size}.json"
    return {"start": (warm, start), "end": (run_dir / "final", run_dir / "raw_shares_end.json")}


def _raw_shares_to(model_dir: Path, run_dir: Path, path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cached(path, lambda: raw_shares(model_dir, run_dir))


def precompute_raw_shares(runs: list[Path], warm: Path, jobs: int) -> None:
    """Every missing `raw_shares` file, `jobs` processes at once (each one thread)."""
    from concurrent.futures import ProcessPoolExecutor

    todo = {path: (model_dir, run_dir) for run_dir in runs if point(run_dir)["target"] is not None
            for model_dir, path in raw_tasks(run_dir, warm).values() if not path.exists()}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for done in [pool.submit(_raw_shares_to, model_dir, run_dir, path) for path, (model_dir, run_dir) in todo.items()]:
            done.result()


def score(out: Path, warm: Path, jobs: int) -> tuple[list[dict], list[dict], dict]:
    """(one record per finished run, one per seed of the weightings that need no model, the warm-up's greedy
    scores: those of the noise study, on its seed's held-out pairs)."""
    runs = sorted(p for sweep in ("sweep", "baseline") for p in (out / sweep).glob("*=*") if (p / "final").is_dir())
    precompute_raw_shares(runs, warm, jobs)
    seeds = {run_dir: point(run_dir)["seed"] for run_dir in runs}
    by_seed: dict[int, dict] = {}  # the seed's shares, from its first run (every run of a seed holds out the same)
    for run_dir, seed in seeds.items():
        if seed not in by_seed:
            by_seed[seed] = cached(run_dir / "shares.json", lambda: reference_shares(run_dir))
    records = [score_run(run_dir, warm, by_seed[seed]["uniform weights"]) for run_dir, seed in seeds.items()]
    references = [{"method": name, "seed": seed, **values} for seed, shares in by_seed.items()
                  for name, values in shares.items()]
    warmup = cached(warm.parent / "critical.json", lambda: NOISE_STUDY.critical_accuracy(warm, warm.parent))
    return records, references, warmup


def stats(values: list[float | None]) -> dict | None:
    """Mean, sample std and count; None where no value is known (a uniform-weight run has no raw importance)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(records: list[dict]) -> dict:
    """Mean and sample std over seeds per (method, flipped fraction), for every metric; methods in the order the
    study names them (the paper's default first, the uniform baseline last)."""
    cells: dict[str, dict[str, dict]] = {}
    for record in sorted(records, key=order):
        cell = cells.setdefault(record["method"], {}).setdefault(str(record["noise"]), {m: [] for m in METRICS})
        for name in METRICS:
            cell[name].append(record[name])
    return {method: {noise: {name: stats(values) for name, values in cell.items()} for noise, cell in by_noise.items()}
            for method, by_noise in cells.items()}


def order(record: dict) -> tuple:
    if record["target"] is None:
        return (2, record["method"])
    key = (record["target"], record["attribution"], record["exclude_last"])
    return (0 if key == PAPER else 1, TARGETS.index(key[0]) if key[0] in TARGETS else 99,
            ATTRIBUTIONS.index(key[1]) if key[1] in ATTRIBUTIONS else 99, key[2], record["method"])


def reference_summary(references: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for record in references:
        cell = out.setdefault(record["method"], {s: [] for s in REFERENCE_SHARES})
        for share in REFERENCE_SHARES:
            cell[share].append(record[share])
    return {name: {share: stats(values) for share, values in cell.items()} for name, cell in out.items()}


def columns(name: str, noise: list[float]) -> list[tuple[str, str, float]]:
    """Table `name`'s columns, each (header, metric, flipped fraction): the weights before training (the same model
    and held-out pairs at every fraction: taken from the first) where the table has them, then one per fraction."""
    _, start, end = TABLES[name]
    after = "after, " if start else ""
    return ([("before training", start, noise[0])] if start else []) + \
        [(f"{after}{n:.0%} flipped", end, n) for n in noise]


def noise_levels(summary: dict) -> list[float]:
    return sorted({float(n) for cells in summary.values() for n in cells})


def fmt(value: dict | None) -> str:
    return "" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}"


def markdown(summary: dict, references: dict, warmup: dict | None) -> str:
    lines = []
    for name, (title, _, _) in TABLES.items():
        table = columns(name, noise_levels(summary))
        lines += [f"**{title}** (mean ± std over seeds)", "",
                  "| weights | " + " | ".join(header for header, _, _ in table) + " |",
                  "|---|" + "---:|" * len(table)]
        for method, cells in summary.items():
            row = [fmt(cells.get(str(noise), {}).get(metric)) for _, metric, noise in table]
            if not any(row):
                continue
            lines.append(f"| `{method}` | " + " | ".join(row) + " |")
        if name in REFERENCE_ROWS:
            for reference, values in references.items():
                shown = fmt(values[REFERENCE_ROWS[name]])
                lines.append(f"| {reference} (no model) | " + " | ".join([shown] * len(table)) + " |")
        if name == "critical" and warmup is not None:
            lines.append(f"| SFT warm-up alone | {warmup['critical']:.3f} (every column) |" + " |" * (len(table) - 1))
        lines.append("")
    return "\n".join(lines)


def identical_targets(records: list[dict]) -> dict | None:
    """margin against sequence_logp, run for run (same attribution, exclude_last, flipped fraction and seed): how
    many pairs were found, and the largest difference of any metric between them. With absolute attributions the
    two give the same weights (the README's `loss.importance` entry), so every run should be the same."""
    by_point = {(r["target"], r["attribution"], r["exclude_last"], r["noise"], r["seed"]): r for r in records}
    pairs = [(r, by_point.get(("sequence_logp", *key[1:]))) for key, r in by_point.items() if key[0] == "margin"]
    pairs = [(a, b) for a, b in pairs if b is not None]
    if not pairs:
        return None
    return {"pairs": len(pairs), "max_abs_difference": max(abs(a[m] - b[m]) for a, b in pairs for m in METRICS)}


def plot(summary: dict, references: dict, warmup: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    panels = [("critical_share", "the weights' share on the critical tokens"),
              ("raw_before", "raw importance's share on the token before each"),
              ("accuracy", "preference accuracy (held out)"), ("critical", "greedy replies: critical tokens right")]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 0.45 * len(methods) + 3), sharey=True)
    for ax, (name, title) in zip(axes, panels):
        table = columns(name, noise_levels(summary))
        height = 0.8 / len(table)
        for i, (header, metric, noise) in enumerate(table):
            cells = [summary[m].get(str(noise), {}).get(metric) for m in methods]
            ys = [j + (i - (len(table) - 1) / 2) * height for j in range(len(methods))]
            ax.barh(ys, [c["mean"] if c else 0 for c in cells], height=height,
                    xerr=[c["std"] if c else 0 for c in cells], capsize=2, label=header)
        if name in REFERENCE_ROWS:
            for (reference, values), style in zip(references.items(), ("--", ":")):
                ax.axvline(values[REFERENCE_ROWS[name]]["mean"], color="black", linestyle=style,
                           label=f"{reference} (no model)")
        if name == "critical" and warmup is not None:
            ax.axvline(warmup["critical"], color="black", linestyle="--", label="SFT warm-up")
        if name == "accuracy":
            ax.set_xlim(0.5, 1.0)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=2)
    axes[0].set_yticks(range(len(methods)), methods, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict], references: list[dict], warmup: dict, where: Path, settings: dict) -> None:
    where.mkdir(parents=True, exist_ok=True)
    summary, shares = summarize(records), reference_summary(references)
    payload = {"settings": settings, "summary": summary, "references": shares, "warmup": warmup,
               "identical_targets": identical_targets(records), "runs": records, "reference_runs": references}
    (where / "token_weights.json").write_text(json.dumps(payload, indent=1) + "\n")
    (where / "token_weights_table.md").write_text(markdown(summary, shares, warmup))
    plot(summary, shares, warmup, where / "token_weights.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    sys.path.insert(0, str(REPO))
    warm = NOISE_STUDY.warm_up(args.warmup_dir or args.out / "warmup", args)
    sweeps(args.out, warm, args)
    records, references, warmup = score(args.out, warm, args.jobs)
    shown = NOISE_STUDY.shown
    settings = {**{k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "command": " ".join(["python scripts/experiments/token_weights/run.py",
                                     *(shown(Path(a)) if a.startswith("/") else a for a in (argv or sys.argv[1:]))]),
                "machine": f"{NOISE_STUDY.cpu_model()}, {os.cpu_count()} cores",
                "packages": NOISE_STUDY.package_versions(),
                "wall_s_this_invocation": round(time.time() - started, 1)}
    for where in filter(None, [args.out, args.report]):
        write_report(records, references, warmup, where, settings)
    print(markdown(summarize(records), reference_summary(references), warmup))


if __name__ == "__main__":
    main()
