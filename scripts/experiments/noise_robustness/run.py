"""The label-noise and ablation study (docs/results/noise_robustness.md), end to end: warm-up,
sweep, scoring, report.

    python scripts/experiments/noise_robustness/run.py [--out runs/noise_robustness] [--report docs/results]

1. SFT warm-up (`+experiment=noise_warmup`): the tiny Llama learns to copy the synthetic task's lists.
2. One Hydra multirun (`+experiment=noise_robustness`, joblib launcher, 2 jobs of 1 thread each) over
   loss x data.flip_labels x seed, every run starting from the warm-up's final/ (also the reference).
3. Each finished run is scored on its clean held-out pairs: the implicit reward's preference accuracy (from the
   run's own final eval) and greedy generation: the fraction of prompts whose greedy reply has the chosen
   response's token at every position where chosen and rejected differ (the critical tokens).
4. results.json, a markdown table (mean +- std over seeds) and a plot, in --out and in --report.

Everything is resumable: the warm-up and each run continue from their newest checkpoint, a finished run is
skipped by `tidpo train` itself, and a scored run keeps its `critical.json`. Run the same command again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
METHODS = ["dpo", "tidpo", "tidpo_no_triplet", "tidpo_uniform", "tidpo_no_prior"]
NOISE = [0.0, 0.1, 0.2, 0.4]
SEEDS = [0, 1, 2]
METRICS = {  # per run -> the title of its table
    "accuracy": "Held-out preference accuracy of the implicit reward",
    "critical": "Greedy replies with every critical token right",
    "chosen_logp_change": "Change of the held-out chosen responses' log-likelihood (nats per response, end - start)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/noise_robustness"), help="where the runs go")
    p.add_argument("--report", type=Path, default=None, help="also write the table, plot and JSON here")
    p.add_argument("--methods", default=",".join(METHODS), help="loss options, comma-separated")
    p.add_argument("--noise", default=",".join(map(str, NOISE)), help="data.flip_labels values")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with one thread)")
    p.add_argument("--steps", type=int, default=None, help="preference steps per run (default: the config's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="SFT steps (default: the config's)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out pairs (default: the config's)")
    return p.parse_args(argv)


def tidpo(args: list[str], env: dict[str, str]) -> None:
    """`tidpo train ARGS` as a child process (the shipped CLI); its output streams through."""
    command = [sys.executable, "-m", "tidpo_cli.cli", "train", *args]
    print("+ tidpo train " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env=env)


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def size_overrides(steps: int | None, eval_size: int | None) -> list[str]:
    """trainer.max_steps and data.eval_size where the command line gives them (else the configs' own)."""
    return ([f"trainer.max_steps={steps}"] if steps else []) + ([f"data.eval_size={eval_size}"] if eval_size else [])


def warm_up(run_dir: Path, args: argparse.Namespace) -> Path:
    """The SFT warm-up in `run_dir` (trained unless finished there); its final/."""
    # one thread: two spin against each other when anything else runs
    tidpo(["+experiment=noise_warmup", *size_overrides(args.warmup_steps, args.eval_size), f"hydra.run.dir={run_dir}"],
          child_env(threads=1))
    return run_dir / "final"


def sweep(out: Path, warm: Path, args: argparse.Namespace) -> None:
    tidpo(["-m", "+experiment=noise_robustness", f"model.name_or_path={warm.resolve()}",
           f"loss={args.methods}", f"data.flip_labels={args.noise}", f"seed={args.seeds}",
           *size_overrides(args.steps, args.eval_size),
           "hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}", f"hydra.sweep.dir={out / 'sweep'}",
           # a run's directory names its point, so a rerun finds it: loss=dpo,data.flip_labels=0.1,seed=2
           "hydra.sweep.subdir='loss=${hydra:runtime.choices.loss},data.flip_labels=${data.flip_labels},seed=${seed}'"],
          child_env(threads=1))


def held_out(model_dir: Path, run_dir: Path):
    """(the run's held-out pairs, tokenized as in training by `model_dir`'s tokenizer; that tokenizer; the run's
    config)."""
    from omegaconf import OmegaConf

    from tidpo_cli.data.splits import load_splits
    from tidpo_cli.modeling import load_tokenizer

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    tokenizer = load_tokenizer(OmegaConf.create({"name_or_path": str(model_dir), "tokenizer": None,
                                                 "trust_remote_code": False}))
    return load_splits(cfg.data, tokenizer, seed=cfg.seed, held_out_only=True).eval, tokenizer, cfg


def critical_accuracy(model_dir: Path, run_dir: Path) -> dict[str, float]:
    """Greedy replies to the run's held-out prompts, scored on the critical tokens and as exact copies."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tidpo_cli.anchors import left_pad

    hf_logging.disable_progress_bar()
    pairs, tokenizer, _ = held_out(model_dir, run_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    critical = exact = 0
    for start in range(0, len(pairs), 64):
        chunk = pairs[start:start + 64]
        ids, mask = left_pad([torch.tensor(p.prompt_ids) for p in chunk], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max(len(p.chosen_ids) for p in chunk),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for pair, reply in zip(chunk, out[:, ids.shape[1]:].tolist()):
            critical += critical_tokens_right(reply, pair.chosen_ids, pair.rejected_ids)
            exact += reply[:len(pair.chosen_ids)] == pair.chosen_ids
    return {"critical": critical / len(pairs), "exact": exact / len(pairs), "pairs": len(pairs)}


def critical_tokens_right(reply: list[int], chosen: list[int], rejected: list[int]) -> bool:
    """Whether `reply` has chosen's token at every position where chosen and rejected differ."""
    positions = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r]
    return all(i < len(reply) and reply[i] == chosen[i] for i in positions)


def evals(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The first (before training) and last held-out eval rows the run logged."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "eval/rewards/accuracies" in r]
    return rows[0], rows[-1]


def score(out: Path, warm: Path) -> list[dict]:
    """One record per finished run (and the warm-up): its point and its metrics; `critical.json` caches."""
    records = []
    runs = sorted(p for p in (out / "sweep").glob("loss=*") if (p / "final").is_dir())
    for run_dir in [warm.parent, *runs]:
        cached = run_dir / "critical.json"
        if not cached.exists():
            cached.write_text(json.dumps(critical_accuracy(run_dir / "final", run_dir)))
        record = {"run": run_dir.name, **json.loads(cached.read_text())}
        if run_dir != warm.parent:
            point = dict(part.split("=", 1) for part in run_dir.name.split(","))
            first, last = evals(run_dir)
            record.update(method=point["loss"], noise=float(point["data.flip_labels"]), seed=int(point["seed"]),
                          accuracy=last["eval/rewards/accuracies"],
                          # how far the chosen responses' log-likelihood moved (held-out, summed over a response)
                          chosen_logp_change=last["eval/logps/chosen"] - first["eval/logps/chosen"])
        else:
            record.update(method="sft_warmup")
        records.append(record)
    return records


def summarize(records: list[dict]) -> dict:
    """Mean and sample std over seeds per (method, noise), for both metrics."""
    cells: dict[str, dict[str, dict]] = {}
    for record in records:
        if record["method"] == "sft_warmup":
            continue
        cell = cells.setdefault(record["method"], {}).setdefault(str(record["noise"]), {m: [] for m in METRICS})
        for name in METRICS:
            cell[name].append(record[name])
    for method in cells.values():
        for cell in method.values():
            for name in METRICS:
                values = cell.pop(name)
                cell[name] = {"mean": statistics.fmean(values),
                              "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return cells


def markdown(summary: dict, warmup: dict | None) -> str:
    noise = sorted({float(n) for cells in summary.values() for n in cells})
    lines = []
    for name, title in METRICS.items():
        lines += [f"**{title}** (mean ± std over seeds)", "",
                  "| method | " + " | ".join(f"{n:.0%} flipped" for n in noise) + " |",
                  "|---|" + "---:|" * len(noise)]
        for method, cells in summary.items():
            row = [f"{cells[str(n)][name]['mean']:.3f} ± {cells[str(n)][name]['std']:.3f}" if str(n) in cells
                   else "" for n in noise]
            lines.append(f"| `{method}` | " + " | ".join(row) + " |")
        if name == "critical" and warmup is not None:
            lines.append(f"| SFT warm-up alone | {warmup['critical']:.3f} (every column) |" + " |" * (len(noise) - 1))
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, warmup: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    titles = {"accuracy": "preference accuracy (implicit reward)", "critical": "greedy replies: critical tokens right",
              "chosen_logp_change": "change of chosen log-likelihood (nats)"}
    for ax, name in zip(axes, METRICS):
        for method, cells in summary.items():
            noise = sorted(cells, key=float)
            ax.errorbar([100 * float(n) for n in noise], [cells[n][name]["mean"] for n in noise],
                        yerr=[cells[n][name]["std"] for n in noise], marker="o", capsize=3, label=method)
        if name == "critical" and warmup is not None:
            ax.axhline(warmup["critical"], color="grey", linestyle="--", label="SFT warm-up")
        ax.set_xlabel("flipped training labels (%)")
        ax.set_title(titles[name])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict], where: Path, settings: dict) -> None:
    where.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    warmup = next((r for r in records if r["method"] == "sft_warmup"), None)
    payload = {"settings": settings, "summary": summary, "warmup": warmup, "runs": records}
    (where / "noise_robustness.json").write_text(json.dumps(payload, indent=1) + "\n")
    (where / "noise_robustness_table.md").write_text(markdown(summary, warmup))
    plot(summary, warmup, where / "noise_robustness.png")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str]:
    """The installed versions a rerun's figures depend on (greedy generation among them): the report records them."""
    from tidpo_cli.benchmark import versions

    return versions(("torch", "transformers", "tokenizers", "deepspeed"))


def shown(path: Path | None) -> str | None:
    """A path as the report shows it: relative to the repository when inside it."""
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    sys.path.insert(0, str(REPO))
    warm = warm_up(args.out / "warmup", args)
    sweep(args.out, warm, args)
    records = score(args.out, warm)
    settings = {**{k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "command": " ".join(["python scripts/experiments/noise_robustness/run.py",
                                     *(shown(Path(a)) if a.startswith("/") else a for a in (argv or sys.argv[1:]))]),
                "machine": f"{cpu_model()}, {os.cpu_count()} cores", "packages": package_versions(),
                "wall_s_this_invocation": round(time.time() - started, 1)}
    for where in filter(None, [args.out, args.report]):
        write_report(records, where, settings)
    print(markdown(summarize(records), next((r for r in records if r["method"] == "sft_warmup"), None)))


if __name__ == "__main__":
    main()
