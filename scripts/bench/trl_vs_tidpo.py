#!/usr/bin/env python3
"""CPU benchmark: TRL's DPOTrainer and `tidpo train` side by side on the same model, rows and settings.

    make bench HH=path/to/hh-rlhf/harmless-base/test.jsonl.gz   # installs the `bench` extra (TRL) if missing
    HH=path/to/test.jsonl.gz python scripts/bench/trl_vs_tidpo.py  # the same, in a venv that has TRL
    python scripts/bench/trl_vs_tidpo.py --check-data          # only check that the HH-RLHF file is there
    BENCH_STEPS=3 BENCH_WARMUP=1 BENCH_MODEL=hidden_size=64,intermediate_size=256,num_hidden_layers=2 \
        python scripts/bench/trl_vs_tidpo.py     # a quick look that proves nothing about speed

One invocation, one process tree. The driver (this process)
  1. builds ONE model directory: a Llama from config (hidden 512, intermediate 1376, 8 layers, 8 heads, 8 kv
     heads, 1024 positions, untied embeddings; about 25 M parameters) with tidpo's byte-level tokenizer, random
     init from a fixed seed, written with save_pretrained; every contender loads it, so all start from the same
     weights and use the same reference;
  2. picks the rows: the first steps x batch usable HH-RLHF pairs, split into prompt / chosen / response at the
     last "\\n\\nAssistant:", and fitted to the length limits HERE (prompt cut from the left to max_prompt_length,
     each response from the right so prompt + response fits max_length, at character boundaries, leaving room for
     the BOS and EOS both tools add). Neither tool then truncates anything, so both train on exactly the same
     token sequences even though TRL (>= 1.x) only truncates prompt + completion together from the right;
  3. runs each contender in its own child process, one after the other (peak RSS is that child's, from wait4):
       trl_dpo           TRL DPOTrainer, loss_type sigmoid, beta 0.1, reference loaded from the same directory
       tidpo_dpo         tidpo train loss=dpo
       tidpo_no_triplet  tidpo train loss=tidpo_no_triplet (importance weights, no anchors)
       tidpo             tidpo train loss=tidpo (importance weights and anchors every step)
     with batch 8, grad accum 1, AdamW at the same lr, linear schedule without warm-up, no activation checkpointing,
     fp32, no eval, no saving, the rows in file order for both (no shuffling: step k sees the same 8 pairs in every
     contender), and 2 torch threads in every child;
  4. takes per contender the median over the steps after the warm-up of the step time; samples/s = batch / step
     time; tokens/s = median over steps of that step's tokens / its time, where a step's tokens are counted from
     the rows themselves (BOS + prompt + response + EOS of both sides), so neither tool's padding counts as work;
     peak RSS; setup_s = the child's wall time outside its timed steps (start-up, imports, loading the model and
     reference, reading and tokenising the data; TRL's one-time dataset tokenisation is also reported alone as
     tokenize_s); ratios within this run and the targets (TARGETS below); writes BENCH_OUT and prints a markdown table.

Step times: TRL's from a TrainerCallback (on_step_begin to on_step_end: forward, backward, optimizer step; the
batch is fetched and collated just before on_step_begin); tidpo's from its metrics.jsonl (each row's
perf/samples_per_s is the step's pairs over the step's wall time, fetching the batch included).

Environment knobs:
  BENCH_STEPS        optimizer steps per contender (12)       BENCH_WARMUP   steps left out of the medians (2)
  BENCH_BATCH        pairs per step (8)                        BENCH_LR       learning rate of both tools (5e-6)
  BENCH_MAX_LENGTH   512                                       BENCH_MAX_PROMPT_LENGTH  256
  BENCH_THREADS      torch / OpenMP threads in every child (2)
  BENCH_OUT          the JSON (bench-results.json at the repo root)
  BENCH_ONLY         comma list of contenders to run, e.g. trl_dpo,tidpo_dpo (default: all, extras included)
  BENCH_TIDPO_ARGS   extra `tidpo train` overrides for every tidpo contender (space separated)
  BENCH_EXTRA        extra labelled rows, ';' separated "label:overrides", e.g.
                       BENCH_EXTRA="tidpo_dpo_bf16:loss=dpo trainer.precision=bf16"
                     overrides starting with the word `trl` make a TRL row with DPOConfig fields instead, e.g.
                       BENCH_EXTRA="trl_dpo_precompute:trl precompute_ref_log_probs=true"
  BENCH_MODEL        LlamaConfig overrides, "key=value,key=value" (a smaller model for a quick look)
  BENCH_SEED         model init seed (0)                       HH             the HH-RLHF file (below)
  BENCH_WORK         work directory (default: a temp dir, removed afterwards unless BENCH_KEEP=1 or a run failed)

HH: the harmless-base test split of Anthropic's HH-RLHF, `harmless-base/test.jsonl.gz` of the hub dataset
Anthropic/hh-rlhf (2,312 rows of {"chosen", "rejected"} dialogues; docs/benchmarks.md says how to fetch it). The
default, ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz beside the checkout, exists only in the development
setup; without the file the command stops in one line saying to pass HH=PATH, before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
HH_ASSISTANT = "\n\nAssistant:"

# The bench model: about 25 M parameters with the byte-level vocabulary.
MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
    max_position_embeddings=1024, tie_word_embeddings=False,
)
CONTENDERS: dict[str, str] = {  # label -> `tidpo train` loss, or "trl"
    "trl_dpo": "trl",
    "tidpo_dpo": "loss=dpo",
    "tidpo_no_triplet": "loss=tidpo_no_triplet",
    "tidpo": "loss=tidpo",
}
# The targets tidpo is held to here: (name, numerator, denominator, metric, op, threshold)
# Against TRL the whole run counts (every step, the same rows: tidpo's length grouping puts different rows in a
# given step, so step-by-step medians compare different work); among tidpo rows, which share the batches, the
# median step.
TARGETS = [
    ("tidpo_dpo samples/s >= 1.5 x trl_dpo", "tidpo_dpo", "trl_dpo", "run_samples_per_s", ">=", 1.5),
    ("tidpo_dpo peak RSS <= trl_dpo", "tidpo_dpo", "trl_dpo", "peak_rss_mb", "<=", 1.0),
    ("tidpo_no_triplet step time <= 1.35 x tidpo_dpo", "tidpo_no_triplet", "tidpo_dpo", "step_s", "<=", 1.35),
    ("tidpo step time <= 2.0 x tidpo_dpo", "tidpo", "tidpo_dpo", "step_s", "<=", 2.0),
]


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    steps: int = 12
    warmup: int = 2
    batch: int = 8
    lr: float = 5e-6
    beta: float = 0.1
    max_length: int = 512
    max_prompt_length: int = 256
    threads: int = 2
    seed: int = 0
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL_CONFIG))
    data: str = str(DEFAULT_HH)
    tidpo_args: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **defaults: Any) -> "Settings":
        env = os.environ if env is None else env
        s = cls(**defaults)
        ints = dict(BENCH_STEPS="steps", BENCH_WARMUP="warmup", BENCH_BATCH="batch", BENCH_THREADS="threads",
                    BENCH_MAX_LENGTH="max_length", BENCH_MAX_PROMPT_LENGTH="max_prompt_length", BENCH_SEED="seed")
        for var, name in ints.items():
            if env.get(var):
                setattr(s, name, int(env[var]))
        if env.get("BENCH_LR"):
            s.lr = float(env["BENCH_LR"])
        if env.get("HH"):
            s.data = env["HH"]
        s.model.update(parse_model_overrides(env.get("BENCH_MODEL", "")))
        s.tidpo_args = shlex.split(env.get("BENCH_TIDPO_ARGS", ""))
        if s.steps <= s.warmup:
            raise SystemExit(f"BENCH_STEPS ({s.steps}) must be more than BENCH_WARMUP ({s.warmup})")
        if not 0 < s.max_prompt_length < s.max_length:
            raise SystemExit("BENCH_MAX_PROMPT_LENGTH must be positive and below BENCH_MAX_LENGTH")
        return s


def parse_model_overrides(text: str) -> dict[str, Any]:
    """"hidden_size=64,num_hidden_layers=2" -> {"hidden_size": 64, ...}; values read as JSON when they parse."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.replace(" ", ",").split(","))):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if "hidden_size" in out and "num_attention_heads" in out and "num_key_value_heads" not in out:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def parse_extra(text: str) -> dict[str, str]:
    """BENCH_EXTRA "label:overrides;label:overrides" -> {label: overrides}."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        label, sep, overrides = item.partition(":")
        if not sep or not label.strip() or not overrides.strip():
            raise SystemExit(f"BENCH_EXTRA: {item!r} is not label:overrides")
        out[label.strip()] = overrides.strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rows: pure functions (tests/test_bench_script.py checks them)


def split_hh(row: dict) -> tuple[str, str, str] | None:
    """An HH-RLHF row (two whole dialogues) -> (prompt, chosen response, rejected response), or None when the two
    do not share the prompt up to the last "\\n\\nAssistant:" of `chosen` (tidpo's hh_rlhf rule)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        return None
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def keep_end(text: str, budget: int, n_tokens: Callable[[str], int]) -> str:
    """The longest suffix of `text` (whole characters) with at most `budget` tokens."""
    if n_tokens(text) <= budget:
        return text
    lo, hi = 1, len(text)  # the answer's start index lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if n_tokens(text[mid:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


def keep_start(text: str, budget: int, n_tokens: Callable[[str], int]) -> str:
    """The longest prefix of `text` (whole characters) with at most `budget` tokens."""
    if n_tokens(text) <= budget:
        return text
    lo, hi = 0, len(text) - 1  # the answer's length lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit_row(prompt: str, chosen: str, rejected: str, n_tokens: Callable[[str], int], max_length: int,
            max_prompt_length: int, bos: int = 1, eos: int = 1) -> dict | None:
    """Cut a pair to the limits the way tidpo does (prompt from the left, each response from the right), at
    character boundaries and leaving room for the `bos` token in front of the prompt and the `eos` token after each
    response, so that neither tool has anything left to cut. None when the pair is unusable (an empty response, or
    responses identical after the cut: tidpo skips those)."""
    prompt = keep_end(prompt, max_prompt_length - bos, n_tokens)
    room = max_length - bos - n_tokens(prompt) - eos
    chosen, rejected = keep_start(chosen, room, n_tokens), keep_start(rejected, room, n_tokens)
    if not prompt or not chosen or not rejected or chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def row_tokens(row: dict, n_tokens: Callable[[str], int], bos: int = 1, eos: int = 1) -> int:
    """Tokens of one pair as both tools feed it: (BOS + prompt + response + EOS) for chosen and for rejected."""
    prompt = bos + n_tokens(row["prompt"])
    return 2 * prompt + n_tokens(row["chosen"]) + n_tokens(row["rejected"]) + 2 * eos


def step_tokens(per_row: list[int], batch: int) -> list[int]:
    """Tokens per step when the rows are taken in order, `batch` at a time."""
    return [sum(per_row[i:i + batch]) for i in range(0, len(per_row) - batch + 1, batch)]


def select_rows(raw: Iterable[dict], n: int, n_tokens: Callable[[str], int], max_length: int,
                max_prompt_length: int, bos: int = 1, eos: int = 1) -> tuple[list[dict], int]:
    """The first `n` usable HH pairs, fitted; and how many raw rows were skipped on the way."""
    def fitted(_: int, raw_row: dict) -> dict | None:
        split = split_hh(raw_row)
        return fit_row(*split, n_tokens, max_length, max_prompt_length, bos, eos) if split else None

    return first_rows(raw, n, fitted)


def first_rows(raw: Iterable[dict], n: int, make_row: Callable[[int, dict], dict | None]) -> tuple[list[dict], int]:
    """The first `n` rows that `make_row(index, raw_row)` makes (None: unusable); and how many were skipped."""
    rows, skipped = [], 0
    for index, raw_row in enumerate(raw):
        row = make_row(index, raw_row)
        if row is None:
            skipped += 1
            continue
        rows.append(row)
        if len(rows) == n:
            break
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------------
# Figures: pure functions


def summarize(step_s: list[float], batch: int, tokens: list[int], warmup: int) -> dict[str, Any]:
    """Medians over the steps after `warmup`: step time, samples/s (= batch / median step time), and tokens/s (the
    median over steps of that step's tokens / its time); and the whole run's throughput, every step counted
    (`run_*`: pairs or tokens of all steps / their summed time), which compares tools that group rows into steps
    differently (`tokens` holds what each step of this tool held)."""
    if len(step_s) <= warmup:
        raise ValueError(f"{len(step_s)} step times, none left after {warmup} warm-up steps")
    if len(tokens) < len(step_s):
        raise ValueError(f"{len(tokens)} token counts for {len(step_s)} steps")
    times, toks = step_s[warmup:], tokens[warmup:len(step_s)]
    step = statistics.median(times)
    return {
        "steps_measured": len(times),
        "step_s": step,
        "samples_per_s": batch / step,
        "tokens_per_s": statistics.median(t / s for t, s in zip(toks, times)),
        "tokens_per_step": statistics.median(toks),
        "run_samples_per_s": batch * len(step_s) / sum(step_s),
        "run_tokens_per_s": sum(tokens[:len(step_s)]) / sum(step_s),
    }


def _ratio(results: dict, a: str, b: str, metric: str) -> float | None:
    x, y = results.get(a, {}).get(metric), results.get(b, {}).get(metric)
    return x / y if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None


def ratios(results: dict[str, dict]) -> dict[str, float | None]:
    """Within-run ratios: tidpo's DPO against TRL's, the TI-DPO variants against tidpo's DPO, and every extra row
    against both."""
    out = {
        "tidpo_dpo_vs_trl_dpo_run_samples_per_s": _ratio(results, "tidpo_dpo", "trl_dpo", "run_samples_per_s"),
        "tidpo_dpo_vs_trl_dpo_median_samples_per_s": _ratio(results, "tidpo_dpo", "trl_dpo", "samples_per_s"),
        "tidpo_dpo_vs_trl_dpo_peak_rss": _ratio(results, "tidpo_dpo", "trl_dpo", "peak_rss_mb"),
        "tidpo_no_triplet_vs_tidpo_dpo_step_s": _ratio(results, "tidpo_no_triplet", "tidpo_dpo", "step_s"),
        "tidpo_vs_tidpo_dpo_step_s": _ratio(results, "tidpo", "tidpo_dpo", "step_s"),
    }
    for label in results:
        if label not in CONTENDERS:
            out[f"{label}_vs_trl_dpo_run_samples_per_s"] = _ratio(results, label, "trl_dpo", "run_samples_per_s")
            out[f"{label}_vs_tidpo_dpo_step_s"] = _ratio(results, label, "tidpo_dpo", "step_s")
    return out


def targets(results: dict[str, dict]) -> dict[str, dict]:
    """Each target (TARGETS) with its value, threshold and pass (None when a contender is missing)."""
    out = {}
    for name, a, b, metric, op, threshold in TARGETS:
        value = _ratio(results, a, b, metric)
        ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": value, "op": op, "threshold": threshold, "pass": ok,
                     "ratio": f"{a}.{metric} / {b}.{metric}"}
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def markdown(results: dict[str, dict], ratio: dict[str, float | None], target: dict[str, dict]) -> str:
    lines = ["| contender | whole run: samples/s | whole run: tokens/s | median step (s) | median samples/s "
             "| peak RSS (MB) | setup (s) | wall (s) | steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| `{label}` | failed: {r['error']} |  |  |  |  |  |  |  |")
            continue
        lines.append(f"| `{label}` | {_fmt(r['run_samples_per_s'])} | {_fmt(r['run_tokens_per_s'], 1)} "
                     f"| {_fmt(r['step_s'])} | {_fmt(r['samples_per_s'])} "
                     f"| {_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['setup_s'], 1)} | {_fmt(r['wall_s'], 1)} "
                     f"| {r['steps_run']} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in ratio.items()]
    lines += ["", "| target | value | threshold | pass |", "|---|---:|---:|---|"]
    for name, t in target.items():
        verdict = "-" if t["pass"] is None else ("yes" if t["pass"] else "NO")
        lines.append(f"| {name} | {_fmt(t['value'])} | {t['op']} {t['threshold']} | {verdict} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The model directory and the rows file (driver side)


def byte_tokenizer():
    from omegaconf import OmegaConf

    from tidpo_cli.modeling import load_tokenizer

    return load_tokenizer(OmegaConf.create({"tokenizer": "byte", "name_or_path": None, "trust_remote_code": False}))


def token_counter(tokenizer) -> tuple[Callable[[str], int], int]:
    """(text -> tokens without special tokens, 1 when the tokenizer puts BOS in front of text else 0)."""
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)
    ids = tokenizer("a").input_ids
    bos = int(tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id)
    return n_tokens, bos


def build_model_dir(path: Path, config: dict[str, Any], seed: int) -> dict[str, Any]:
    """The one model every contender loads: tidpo's tiny-Llama builder, random init from `seed`, save_pretrained."""
    import torch
    from transformers.utils import logging as hf_logging

    from tidpo_cli.modeling import build_tiny_llama

    hf_logging.disable_progress_bar()
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = build_tiny_llama(dict(config), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "config": dict(config), "seed": seed, "architecture": type(model).__name__}
    del model
    return info


def read_jsonl(path: str | Path) -> Iterable[dict]:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_rows(s: Settings, path: Path, n: int, rows: list[dict] | None = None,
                 skipped: int = 0) -> dict[str, Any]:
    """Select (unless given) and write the rows; return what the results need to know about them."""
    tokenizer = byte_tokenizer()
    n_tokens, bos = token_counter(tokenizer)
    if rows is None:
        rows, skipped = select_rows(read_jsonl(s.data), n, n_tokens, s.max_length, s.max_prompt_length, bos)
    if len(rows) < n:
        raise SystemExit(f"{s.data}: only {len(rows)} usable pairs, {n} needed (steps x batch)")
    write_jsonl(path, rows)
    per_row = [row_tokens(r, n_tokens, bos) for r in rows]
    return {"path": str(path), "rows": len(rows), "skipped_on_the_way": skipped, "tokens_per_row": per_row,
            "step_tokens": step_tokens(per_row, s.batch), "bos": bos,
            "mean_tokens_per_pair": statistics.mean(per_row)}


# ---------------------------------------------------------------------------------------------------------------
# Children


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               BENCH_CHILD_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(cmd: list[str], log: Path, threads: int) -> dict[str, Any]:
    """Run one child to the end; its wall time, exit status and peak RSS (its own, from wait4)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(threads), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - started,
            "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux: kilobytes


def _tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def tidpo_overrides(s: Settings, model_dir: Path, data_path: Path, run_dir: Path, steps: int,
                    extra: str) -> list[str]:
    """The `tidpo train` overrides every tidpo contender shares, then the contender's own, then BENCH_TIDPO_ARGS."""
    return [
        f"model.name_or_path={model_dir}", "model.tokenizer=null", "model.dtype=float32",
        "model.attn_implementation=sdpa",
        "data=preference", f"data.path={data_path}", f"data.max_length={s.max_length}",
        f"data.max_prompt_length={s.max_prompt_length}", "data.eval_size=0", "data.shuffle=false",
        f"trainer.micro_batch_size={s.batch}", "trainer.grad_accum=1", f"trainer.max_steps={steps}",
        "trainer.optimizer=adamw", f"trainer.lr={s.lr}", "trainer.weight_decay=0.0", "trainer.schedule=linear",
        "trainer.warmup_steps=0", "trainer.max_grad_norm=1.0", "trainer.precision=fp32",
        "trainer.gradient_checkpointing=false", "trainer.eval_before=false", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.save_final=false", "trainer.resume=never", "trainer.device=cpu",
        "logger.progress=off", "logger.log_every=1", f"loss.beta={s.beta}", f"seed={s.seed}",
        f"hydra.run.dir={run_dir}",
        *shlex.split(extra), *s.tidpo_args,
    ]


def run_tidpo(label: str, s: Settings, work: Path, model_dir: Path, data: dict, extra: str) -> dict[str, Any]:
    run_dir = work / "runs" / label
    steps = len(data["step_tokens"])
    overrides = tidpo_overrides(s, model_dir, Path(data["path"]), run_dir, steps, extra)
    log = work / f"{label}.log"
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--tidpo-child", "train", *overrides],
                      log, s.threads)
    result: dict[str, Any] = {"tool": "tidpo", "overrides": overrides, "log": str(log), **child}
    metrics = run_dir / "metrics.jsonl"
    if child["rc"] != 0 or not metrics.exists():
        return {**result, "error": f"exit {child['rc']}", "log_tail": _tail(log)}
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/samples_per_s" in r]
    step_s = [s.batch / r["perf/samples_per_s"] for r in rows]  # grad_accum 1, one process: `batch` pairs a step
    logged_tokens = [round(r["perf/tokens_per_s"] * t) for r, t in zip(rows, step_s)]
    return {**result, **_figures(s, step_s, data["step_tokens"], logged_tokens, child),
            "losses": [r.get("loss") for r in rows]}


def run_trl(label: str, s: Settings, work: Path, model_dir: Path, data: dict, extra: str) -> dict[str, Any]:
    spec = {"model_dir": str(model_dir), "data": data["path"], "steps": len(data["step_tokens"]), "batch": s.batch,
            "lr": s.lr, "beta": s.beta, "max_length": s.max_length, "seed": s.seed, "threads": s.threads,
            "output_dir": str(work / "runs" / label), "result": str(work / f"{label}.result.json"),
            "config": parse_model_overrides(extra.removeprefix("trl"))}
    spec_path = work / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{label}.log"
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)], log, s.threads)
    result: dict[str, Any] = {"tool": "trl", "dpo_config": spec["config"], "log": str(log), **child}
    if child["rc"] != 0 or not Path(spec["result"]).exists():
        return {**result, "error": f"exit {child['rc']}", "log_tail": _tail(log)}
    out = json.loads(Path(spec["result"]).read_text())
    return {**result, **_figures(s, out["step_s"], data["step_tokens"], out["tokens_seen"], child),
            "tokenize_s": out["tokenize_s"], "trainer_init_s": out["trainer_init_s"], "optim": out["optim"],
            "activation_checkpointing": out["checkpointing"],
            "losses": out["losses"], "trl_version": out["trl_version"]}


def _figures(s: Settings, step_s: list[float], tokens: list[int], seen: list[int], child: dict) -> dict[str, Any]:
    """The medians, setup time, and whether the tool saw the tokens the rows say (same rows, same order, no cut)."""
    out = summarize(step_s, s.batch, seen, s.warmup)
    n = len(step_s)
    if seen[:n] == tokens[:n]:
        check = "ok"
    elif sum(seen[:n]) == sum(tokens[:n]):  # length grouping: the same rows, other batches
        check = "ok (the same tokens in all, grouped into other steps)"
    else:
        check = f"differs: rows say {tokens[:n]}, the tool saw {seen[:n]}"
    return {**out, "steps_run": n, "step_times_s": step_s, "tokens_per_step_rows": tokens[:n],
            "tokens_check": check, "setup_s": child["wall_s"] - sum(step_s)}


def run_contender(label: str, overrides: str, s: Settings, work: Path, model_dir: Path, data: dict) -> dict:
    print(f"[bench] {label}: {'TRL DPOTrainer' if overrides.startswith('trl') else 'tidpo train ' + overrides} ...",
          flush=True)
    run = run_trl if overrides.split(maxsplit=1)[0] == "trl" else run_tidpo
    r = run(label, s, work, model_dir, data, overrides)
    if "error" in r:
        print(f"[bench] {label}: FAILED ({r['error']}), log {r['log']}:\n{r.get('log_tail', '')}", flush=True)
    else:
        print(f"[bench] {label}: step {r['step_s']:.3f} s, {r['samples_per_s']:.3f} samples/s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, wall {r['wall_s']:.1f} s, tokens {r['tokens_check']}", flush=True)
    return r


# ---------------------------------------------------------------------------------------------------------------
# Settings record


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "tidpo", "datasets", "accelerate", "deepspeed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    cpu, flags = None, ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cpus": os.cpu_count(), "avx512_bf16": " avx512_bf16" in flags,
            "platform": platform.platform()}


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (head + ("-dirty" if dirty else "")) or None
    except OSError:
        return None


def common_settings(s: Settings, model_info: dict) -> dict[str, Any]:
    return {
        "model": model_info, "data": s.data, "steps": s.steps, "warmup": s.warmup, "batch": s.batch,
        "max_length": s.max_length, "max_prompt_length": s.max_prompt_length, "lr": s.lr, "beta": s.beta,
        "optimizer": "AdamW, weight decay 0, linear schedule, no warm-up, grad clip 1.0", "precision": "fp32",
        "threads": s.threads, "tidpo_args": s.tidpo_args, "versions": versions(), "machine": machine(),
        "git": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": {k: v for k, v in os.environ.items() if k.startswith("BENCH_") or k == "HH"},
    }


def work_dir() -> tuple[Path, bool]:
    if os.environ.get("BENCH_WORK"):
        path = Path(os.environ["BENCH_WORK"]).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path, True
    return Path(tempfile.mkdtemp(prefix="tidpo-bench-")), os.environ.get("BENCH_KEEP") == "1"


def out_path(default: str) -> Path:
    return Path(os.environ["BENCH_OUT"]).resolve() if os.environ.get("BENCH_OUT") else ROOT / default


def finish(tag: str, out: Path, doc: dict, report: str, work: Path, keep: bool, failed: bool) -> int:
    """Write the JSON, print the report, keep the work dir (when asked, or a run failed) or remove it; the exit
    status (1: a run failed)."""
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n" + report + f"\n\n[{tag}] wrote {out}", flush=True)
    if failed or keep:
        print(f"[{tag}] kept the work dir {work} (logs, runs)", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# The driver


def require_hh(s: Settings, command: str = "make bench") -> None:
    """Stop in one line, exit code 2, when the HH-RLHF file is not there (a fresh clone has no ../shared)."""
    if not Path(s.data).expanduser().is_file():
        print(f"{command}: no HH-RLHF file at {s.data}: pass HH=path/to/hh-rlhf/harmless-base/test.jsonl.gz "
              f"(docs/benchmarks.md says where to get it)", file=sys.stderr)
        raise SystemExit(2)


def main() -> int:
    s = Settings.from_env()
    require_hh(s)
    if sys.argv[1:] == ["--check-data"]:  # the Makefile asks first, before it installs TRL
        return 0
    contenders = dict(CONTENDERS)
    contenders.update(parse_extra(os.environ.get("BENCH_EXTRA", "")))
    if os.environ.get("BENCH_ONLY"):
        only = [c.strip() for c in os.environ["BENCH_ONLY"].split(",") if c.strip()]
        unknown = [c for c in only if c not in contenders]
        if unknown:
            raise SystemExit(f"BENCH_ONLY: unknown {unknown}; known: {list(contenders)}")
        contenders = {k: v for k, v in contenders.items() if k in only}
    work, keep = work_dir()
    out = out_path("bench-results.json")
    started = time.perf_counter()
    print(f"[bench] work dir {work}; {s.steps} steps x {s.batch} pairs, warm-up {s.warmup}, {s.threads} threads",
          flush=True)
    model_dir = work / "model"
    model_info = build_model_dir(model_dir, s.model, s.seed)
    data = prepare_rows(s, work / "rows.jsonl", s.steps * s.batch)
    print(f"[bench] model {model_info['parameters'] / 1e6:.2f} M parameters; {data['rows']} pairs, "
          f"{data['mean_tokens_per_pair']:.0f} tokens per pair on average", flush=True)

    results = {label: run_contender(label, overrides, s, work, model_dir, data)
               for label, overrides in contenders.items()}
    ratio, target = ratios(results), targets(results)
    settings = {**common_settings(s, model_info), "contenders": contenders,
                "rows": {k: v for k, v in data.items() if k != "path"}, "wall_s": time.perf_counter() - started,
                "trl": {"loss_type": "sigmoid", "beta": s.beta, "max_length": s.max_length,
                        "truncation": "none left to do: rows are fitted by the driver (TRL only cuts prompt + "
                                      "completion together from the right)",
                        "sampler": "sequential", "gradient_checkpointing": False, "bf16": False}}
    doc = {"settings": settings, **results, "ratios": ratio, "targets": target}
    failed = any("error" in r for r in results.values())
    return finish("bench", out, doc, markdown(results, ratio, target), work, keep, failed)


# ---------------------------------------------------------------------------------------------------------------
# Child entry points


def _set_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_CHILD_THREADS", "2")))


def tidpo_child(argv: list[str]) -> None:
    """`tidpo <argv>` with torch's thread count set first (the CLI itself, unchanged)."""
    _set_threads()
    from tidpo_cli.cli import main as tidpo_main

    tidpo_main(argv)


def dpo_config_kwargs(spec: dict, fields: set[str]) -> dict[str, Any]:
    """TRL DPOConfig arguments for the benchmark; `fields`: the installed DPOConfig's field names."""
    config = dict(
        output_dir=spec["output_dir"], loss_type=["sigmoid"], beta=spec["beta"], max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1, max_steps=spec["steps"],
        learning_rate=spec["lr"], weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        seed=spec["seed"],
    )
    if "activation_checkpointing" in fields:
        config["activation_checkpointing"] = False  # transformers 5's name; TRL's config defaults the old one to True
    config.update(spec["config"])
    return config


def trl_child(spec_path: str) -> None:
    """One TRL DPOTrainer run as the spec says; writes step times, tokens seen and setup times to spec["result"]."""
    t_start = time.perf_counter()
    _set_threads()
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, __version__ as trl_version

    spec = json.loads(Path(spec_path).read_text())
    timings: dict[str, float] = {"tokenize_s": 0.0}
    tokens_seen: list[int] = []

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, *args, **kwargs):  # TRL's one-time tokenisation, timed on its own
            t0 = time.perf_counter()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                timings["tokenize_s"] += time.perf_counter() - t0

        def _get_train_sampler(self, *args, **kwargs):  # the rows in file order, as tidpo runs with shuffle off
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            tokens_seen.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.begin)

    rows = list(read_jsonl(spec["data"]))
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **load)
    ref_model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **load)
    args = DPOConfig(**dpo_config_kwargs(spec, {f.name for f in dataclasses.fields(DPOConfig)}))
    timer = StepTimes()
    t0 = time.perf_counter()
    trainer = BenchDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
    trainer_init_s = time.perf_counter() - t0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["result"]).write_text(json.dumps({
        "step_s": timer.times, "tokens_seen": tokens_seen, "tokenize_s": timings["tokenize_s"],
        "trainer_init_s": trainer_init_s, "optim": getattr(args.optim, "value", str(args.optim)),
        "checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", None)
                              if hasattr(trainer.model, "is_activation_checkpointing")
                              else getattr(trainer.model, "is_gradient_checkpointing", False)),
        "losses": losses, "trl_version": trl_version,
        "child_s": time.perf_counter() - t_start,
    }))


if __name__ == "__main__":
    sys.path.insert(1, str(ROOT))  # tidpo_cli from this checkout when it is not installed
    if len(sys.argv) > 1 and sys.argv[1] == "--tidpo-child":
        tidpo_child(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        trl_child(sys.argv[2])
    else:
        sys.exit(main())
