"""Where metrics go: metrics.jsonl (always), and a progress display on the console."""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from .disk import DiskError, writing

log = logging.getLogger("tidpo")

EVAL_HEADLINE = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")


class MetricSums:
    """Weighted sums of metrics over micro-batches (or eval batches), averaged once at the end; and
    totals (counts of events such as fallbacks) that are reported summed, not averaged."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] += float(value)

    def add(self, sums: dict[str, float], count: float) -> None:
        """`sums` hold totals over `count` items (pairs or tokens) of one batch."""
        for name, value in sums.items():
            self.sums[name] += float(value)
            self.counts[name] += count

    def merge(self, other: "MetricSums") -> None:
        for name, value in other.sums.items():
            self.sums[name] += value
            self.counts[name] += other.counts[name]
        for name, value in other.totals.items():
            self.totals[name] += value

    def means(self, prefix: str = "") -> dict[str, float]:
        """Averages of the sums, and the totals as they are."""
        means = {prefix + k: v / self.counts[k] for k, v in self.sums.items() if self.counts[k]}
        return {**means, **{prefix + k: v for k, v in self.totals.items()}}


class JsonlSink:
    """One JSON object per logged step, appended and flushed at once so a killed run keeps its history."""

    def __init__(self, path: Path):
        self.path = path
        with writing("the metrics log", path):
            self.file = open(path, "a", encoding="utf-8")
            if self.file.tell() and _last_byte(path) != b"\n":
                self.file.write("\n")  # a row cut by a kill ends here, so the next row starts a line of its own
        self.failed = False

    def write(self, step: int, metrics: dict[str, float]) -> None:
        try:
            with writing("the metrics log", self.path):
                self.file.write(json.dumps({"step": step, **metrics}) + "\n")
                self.file.flush()
        except DiskError:
            self.failed = True  # the rows before stay valid; a cut last one is dropped when read
            raise

    def rows(self) -> list[dict]:
        """Every complete row (a row cut by a kill or a full disk is left out)."""
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                out.append(row)
        return out

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (by a run killed after its last checkpoint), so a resumed run's
        history has every step once; and any row a kill cut short."""
        self.file.close()
        kept = [json.dumps(r) + "\n" for r in self.rows() if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with writing("the metrics log", tmp):
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def logged(self, step: int) -> dict[str, float]:
        """The metrics already logged for `step`, merged (the eval before training is step 0)."""
        self.file.flush()
        merged: dict[str, float] = {}
        for row in self.rows():
            if row.pop("step") == step:
                merged.update(row)
        return merged

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            if not self.failed:  # the failed write was reported already; its buffer cannot be written either
                raise


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """A live bar on a terminal, plain lines every `print_every` steps elsewhere (SLURM logs, pipes)."""

    def __init__(self, total_steps: int, mode: str, print_every: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode, self.total, self.print_every = mode, total_steps, print_every
        self.start, self.start_step = time.perf_counter(), 0
        self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, leave=True) if mode == "bar" else None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        loss, acc, speed = metrics.get("loss"), metrics.get("rewards/accuracies"), metrics.get("perf/samples_per_s")
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}"}
            if acc is not None:
                postfix["acc"] = f"{acc:.2f}"
            postfix["samples/s"] = f"{speed:.1f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.mode == "plain" and (step % self.print_every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(1, step - self.start_step) * (self.total - step)
            parts = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
            if acc is not None:
                parts.append(f"acc {acc:.2f}")
            parts += [f"{speed:.1f} samples/s", f"eta {_fmt_duration(eta)}"]
            log.info(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WandbSink:
    """A Weights & Biases run. Its id is kept in the run dir, so a resumed run continues the same wandb run;
    metrics are plotted against our own `step`, so steps re-logged after a resume land where they belong."""

    def __init__(self, wandb_cfg, run_dir: Path, config: dict, job: dict[str, str]):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
            name=wandb_cfg.name or job["name"], group=wandb_cfg.group or job.get("group"),
            tags=list(wandb_cfg.tags), config=config, dir=str(run_dir), id=run_id, resume="allow",
            settings=wandb.Settings(console="off"),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics})

    def close(self) -> None:
        self.run.finish()


def hydra_job(run_dir: Path) -> dict[str, str]:
    """Name (and group, in a sweep) for a run: the run dir's name, or <sweep dir>-<job number>."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"name": run_dir.name}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode.name == "MULTIRUN":
        group = f"{hydra_cfg.job.name}-{Path(hydra_cfg.sweep.dir).name}"
        return {"name": f"{group}-{hydra_cfg.job.num}", "group": group}
    return {"name": f"{hydra_cfg.job.name}-{run_dir.name}"}


class Tracker:
    """Every sink a step's metrics go to. Only rank 0 has sinks and a progress display; other ranks' trackers
    stay quiet."""

    def __init__(self, run_dir: Path, logger_cfg, total_steps: int, config: dict | None = None, main: bool = True):
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl") if main else None
        self.sinks = [self.jsonl] if main else []
        if main and logger_cfg.wandb is not None and logger_cfg.wandb.mode != "disabled":
            self.sinks.append(WandbSink(logger_cfg.wandb, run_dir, config or {}, hydra_job(run_dir)))
        self.progress = Progress(total_steps, logger_cfg.progress if main else "off", logger_cfg.print_every)
        self.log_every = logger_cfg.log_every
        self.main = main

    def resume_at(self, step: int) -> None:
        """Continue after a checkpoint of `step`: rows a killed run logged after it are dropped."""
        if self.jsonl is not None:
            self.jsonl.truncate_after(step)
        self.progress.start_step = step

    def start_over(self) -> None:
        """A start from step 0 in a run dir whose earlier start saved no checkpoint: its rows are dropped, so the
        history is this start's alone."""
        if self.jsonl is not None:
            self.jsonl.truncate_after(-1)

    def logged(self, step: int) -> dict[str, float]:
        return self.jsonl.logged(step) if self.jsonl is not None else {}

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.log_every == 0 or step == self.progress.total:
            for sink in self.sinks:
                sink.write(step, metrics)
        self.progress.update(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.write(step, metrics)
        # The console gets the headline numbers; metrics.jsonl has them all.
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items() if k in EVAL_HEADLINE)
        if not self.main:
            return
        if self.progress.bar is not None:
            self.progress.bar.write(f"eval @ step {step}: {shown}")
            log.debug("eval @ step %d: %s", step, shown)
        else:
            log.info("eval @ step %d: %s", step, shown)

    def close(self) -> None:
        self.progress.close()
        for sink in self.sinks:
            sink.close()
