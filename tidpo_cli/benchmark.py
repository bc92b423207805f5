"""`tidpo benchmark MODEL`: a trained model on standard benchmarks with EleutherAI's lm-evaluation-harness.

The paper's Table 1 reports MMLU, GSM8K, GPQA, HumanEval, TruthfulQA and IFEval; `--tasks paper` runs
lm-eval's task for each. Any other lm-eval task works by name, and tasks defined in local YAML files with
`--include-path DIR`. lm-eval is an optional extra (`pip install "tidpo[benchmark]"`): training never needs it.

MODEL is anything `trained.locate` accepts. An HF directory (a run's final/) is evaluated in place; a
checkpoint is first written as an HF directory (LoRA merged, as `tidpo export` does) into a temporary folder
inside the output directory, removed afterwards. lm-eval loads the model itself (`model="hf"`).
Writes `benchmark.json` (lm-eval's results and what produced them) and `benchmark.md` (a table).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import CommandLineParser, UserError

MIN_LM_EVAL = "0.4.12"  # as pyproject.toml's `benchmark` extra
INSTALL_HINT = 'tidpo benchmark needs lm-evaluation-harness: pip install "tidpo[benchmark]"'

# The paper's Table 1 benchmarks and the lm-eval task run for each (see the README for the variants).
PAPER_TASKS = {
    "MMLU": "mmlu",
    "GSM8K": "gsm8k",
    "GPQA": "gpqa_main_zeroshot",
    "HumanEval": "humaneval",
    "TruthfulQA": "truthfulqa_mc2",
    "IFEval": "ifeval",
}

# Task-name prefixes of lm-eval tasks that execute model-written code; checked before anything loads. A task
# whose config says `unsafe_code: true` under another name is caught once the tasks are loaded.
CODE_TASK_PREFIXES = ("humaneval", "mbpp")

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
OUTPUTS = ("benchmark.json", "benchmark.md")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="tidpo benchmark",
        description="Run lm-evaluation-harness tasks on a trained model (the paper's Table 1: MMLU, GSM8K, GPQA, "
                    "HumanEval, TruthfulQA, IFEval). Writes benchmark.json and benchmark.md.",
        epilog="MODEL is a run directory (its final/ model), RUN/final, RUN/checkpoints/step-N, or an HF model "
               "directory. Hub datasets are downloaded by lm-eval (or read from the HF cache).",
    )
    parser.add_argument("model", metavar="MODEL", help="run directory, checkpoint, or HF model directory")
    parser.add_argument("--tasks", default="paper", metavar="TASKS",
                        help="'paper' (the six of Table 1: " + ",".join(PAPER_TASKS.values()) + ") or "
                             "comma-separated lm-eval task names (default: paper)")
    parser.add_argument("--include-path", metavar="DIR",
                        help="a directory of lm-eval task YAML files, for tasks not shipped with lm-eval")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="evaluate only the first N examples of each task (a smoke test, not a score)")
    parser.add_argument("--batch-size", default="8", metavar="N",
                        help="examples per forward, or 'auto' to let lm-eval find the largest that fits (default 8)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights dtype for the evaluation (default: auto, as saved)")
    parser.add_argument("--num-fewshot", type=int, metavar="N",
                        help="few-shot examples for every task (default: each task's own setting)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: RUN/benchmark for a run, else ./benchmark-NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace benchmark.json and benchmark.md in "
                        "--out DIR (the default folder is always rewritten)")
    parser.add_argument("--chat-template", action="store_true",
                        help="render prompts with the tokenizer's chat template, few-shot examples as turns "
                             "(instruct models; lm-eval's apply_chat_template + fewshot_as_multiturn)")
    parser.add_argument("--allow-code-eval", action="store_true",
                        help="allow tasks that execute model-written code (HumanEval, MBPP) on this machine")
    return parser


def benchmark_main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    tasks = parse_tasks(args.tasks)
    check_numbers(args)
    lm_eval = import_lm_eval()
    check_code_eval(tasks, args.allow_code_eval)

    from .modeling import pick_device
    from .outputs import claim_output, made_dir
    from .trained import check_checkpoint, check_hf_weights, locate

    kind, source, run_dir = locate(args.model)  # a bad path stops here, before lm-eval indexes its tasks
    # A damaged model is named now, not after the datasets are fetched: an HF directory's weights by their headers
    # (lm-eval loads it), a checkpoint's files against its manifest.
    if kind == "hf":
        check_hf_weights(source)
    else:
        check_checkpoint(source, run_dir)
    device = pick_device(args.device, key="--device")
    out = output_dir(args.out, source, run_dir)
    include = include_path(args.include_path)
    claim_output(out, OUTPUTS, given=args.out is not None, overwrite=args.overwrite)
    task_manager = make_task_manager(tasks, include)
    built, leaves = preload_tasks(task_manager, tasks, include)  # downloads the datasets before a big model loads
    check_code_eval(leaves, args.allow_code_eval, unsafe={name for name, unsafe in leaves.items() if unsafe})

    with made_dir(out, "the benchmark report"):  # removed again if nothing comes of it (it held no report)
        with hf_model_dir(kind, source, out) as model_dir:
            print(f"benchmark {model_dir} on {', '.join(tasks)} ({device})", file=sys.stderr)
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir), "dtype": args.dtype},
                tasks=built,
                num_fewshot=args.num_fewshot,
                batch_size=args.batch_size,
                device=str(device),
                limit=args.limit,
                log_samples=False,
                task_manager=task_manager,
                confirm_run_unsafe_code=args.allow_code_eval,
                apply_chat_template=args.chat_template,
                fewshot_as_multiturn=args.chat_template,
            )
        report = {
            "model": str(args.model), "evaluated": str(source), "run_dir": str(run_dir) if run_dir else None,
            "tasks": tasks, "limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
            "device": str(device), "dtype": args.dtype, "chat_template": args.chat_template,
            "include_path": str(include) if include else None,
            "versions": versions(), "lm_eval": results,
        }
        write_report(report, out)


def parse_tasks(spec: str) -> list[str]:
    """The lm-eval task names of `--tasks`: `paper` expands to the six of Table 1; duplicates dropped."""
    names = []
    for name in (n.strip() for n in spec.split(",")):
        for task in (PAPER_TASKS.values() if name == "paper" else [name]):
            if task and task not in names:
                names.append(task)
    if not names:
        raise UserError(f"--tasks {spec!r} names no task: pass 'paper' or lm-eval task names such as mmlu,gsm8k")
    return names


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) >= 1):
        raise UserError(f"--batch-size must be a number of at least 1 or 'auto', got {args.batch_size!r}")


def import_lm_eval():
    """lm-eval, or the one-line install hint: it is an optional extra. Older releases lack the task loading used
    here (`TaskManager.load`, 0.4.12) or do not import with transformers 5 (0.4.9)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if not hasattr(TaskManager, "load"):
        raise UserError(f"tidpo benchmark needs lm-eval {MIN_LM_EVAL} or newer, found "
                        f"{versions()['lm_eval']}: pip install -U \"tidpo[benchmark]\"")
    return lm_eval


def check_code_eval(tasks, allowed: bool, unsafe: set[str] | None = None) -> None:
    """Tasks that run model-written code need the user's explicit consent (`--allow-code-eval`); with it,
    HF `evaluate`'s code_eval metric is told so through HF_ALLOW_CODE_EVAL."""
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        return
    risky = sorted(unsafe if unsafe is not None else {t for t in tasks if t.startswith(CODE_TASK_PREFIXES)})
    if risky:
        raise UserError(f"task {', '.join(risky)} executes code the model writes: add --allow-code-eval to run it "
                        "on this machine (preferably a sandbox), or leave it out of --tasks")


def output_dir(given: str | None, source: Path, run_dir: Path | None) -> Path:
    """--out, else RUN/benchmark for anything inside a run, else ./benchmark-NAME for an HF directory."""
    if given:
        return Path(given).expanduser()
    if run_dir is not None:
        return run_dir / "benchmark"
    return Path(f"benchmark-{source.resolve().name}")


def include_path(given: str | None) -> Path | None:
    if given is None:
        return None
    path = Path(given).expanduser()
    if not path.is_dir():
        raise UserError(f"--include-path '{given}' is not a directory: pass the folder that holds the task YAML files")
    return path.resolve()


def make_task_manager(tasks: list[str], include: Path | None):
    """lm-eval's TaskManager for `tasks`. Indexing lm-eval's own thousands of tasks takes seconds, so when every
    task is defined under --include-path the index holds those alone. An unknown name is the user's mistake."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include) if include else None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown lm-eval task '{task}': {hint}`lm-eval ls tasks` lists them; a task of your own "
                            "needs --include-path DIR (the folder of its YAML file)")
    return manager


def preload_tasks(task_manager, tasks: list[str], include: Path | None) -> tuple[list[Any], dict[str, bool]]:
    """Build each task (lm-eval downloads its dataset here, or reads the HF cache), one at a time so that a
    failure names its task, and before the model loads. Returns the built tasks and groups (handed to lm-eval
    as they are, so nothing is built twice) and {leaf task: whether it executes model-written code}."""
    built: list[Any] = []
    leaves: dict[str, bool] = {}
    for task in tasks:
        try:
            loaded = task_manager.load([task])
        except Exception as e:  # noqa: BLE001  (datasets and the hub raise many types)
            error = load_error(task, e, local_yaml(task_manager, task, include))
            if error is e:
                raise  # a bug: its own traceback
            raise error from None
        if task in loaded["groups"]:
            built.append(loaded["groups"][task])
        elif task in loaded["tasks"]:
            built.append(loaded["tasks"][task])
        else:  # a tag: the tasks it names
            built.extend(loaded["tasks"].values())
        leaves.update({name: bool(getattr(obj.config, "unsafe_code", False)) for name, obj in loaded["tasks"].items()})
    return built, leaves


def local_yaml(task_manager, task: str, include: Path | None) -> Path | None:
    """The YAML file under --include-path that defines `task`, if it is one of the user's own."""
    entry = task_manager.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    if include is None or path is None:
        return None
    path = Path(path).resolve()
    return path if include in path.parents else None


def load_error(task: str, error: Exception, yaml_file: Path | None) -> Exception:
    """A UserError for a dataset that could not be fetched or read, or for a task of the user's own YAML that
    does not build; any other exception unchanged (a bug in lm-eval or here)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    module = type(error).__module__.split(".")[0]
    if isinstance(error, (ConnectionError, TimeoutError)) or module in ("huggingface_hub", "requests", "httpx") \
            or (module == "datasets" and "NotFound" in type(error).__name__):
        return UserError(f"task '{task}': its dataset could not be downloaded ({first}): check the network or "
                         "pre-fill the HF cache (gated datasets such as GPQA's need `hf auth login` and their "
                         "terms accepted on the hub)")
    if yaml_file is not None:
        return UserError(f"task '{task}' of {yaml_file} cannot be built: {type(error).__name__}: {first}; fix the "
                         "YAML (lm-eval's docs/task_guide.md describes its keys)")
    if isinstance(error, FileNotFoundError):
        return UserError(f"task '{task}': a file it needs is missing ({first}): check the paths in its YAML")
    return error


@contextmanager
def hf_model_dir(kind: str, source: Path, out: Path) -> Iterator[Path]:
    """An HF model directory lm-eval can load: `source` itself, or a checkpoint exported into a temporary
    folder inside `out` (next to the results, not in /tmp, which may be too small for a big model)."""
    if kind == "hf":
        yield source
        return
    import torch
    from transformers.utils import logging as hf_logging

    from .checkpoint import save_hf_model
    from .trained import load_trained

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix=".model-", dir=out) as tmp:
        # The same load and LoRA merge as `tidpo export`; the files were checked before the tasks loaded.
        trained = load_trained(source, torch.device("cpu"), checked=True)
        model_dir = save_hf_model(trained.model, trained.tokenizer, Path(tmp) / "model", option="--out")
        del trained
        print(f"exported checkpoint {source} for lm-eval", file=sys.stderr)
        yield model_dir


def versions(packages: tuple[str, ...] = ("lm_eval", "torch", "transformers", "datasets")) -> dict[str, str]:
    """tidpo's version and each of `packages`' ("not installed" where one is not)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"tidpo": __version__}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def score_rows(results: dict) -> list[tuple[str, str, float | str, float | str]]:
    """(task, metric, value, stderr) for each metric of each top-level result: requested tasks and groups,
    not a group's subtasks (those stay in benchmark.json). lm-eval keys metrics as "name,filter"."""
    subtasks = {child for children in results.get("group_subtasks", {}).values() for child in children}
    rows = []
    for task, metrics in results.get("results", {}).items():
        if task in subtasks:
            continue
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or name.endswith("_stderr"):
                continue
            label = name if filter_name == "none" else f"{name} ({filter_name})"
            rows.append((task, label, value, metrics.get(f"{name}_stderr,{filter_name}", "")))
    return rows


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
    return str(value)


def render_markdown(report: dict) -> str:
    results = report["lm_eval"]
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {_number(v)} | {_number(s)} |" for t, m, v, s in score_rows(results)]
    shots = results.get("n-shot", {})
    notes = [f"model: {report['evaluated']}", f"tasks: {', '.join(report['tasks'])}",
             "few-shot: " + ", ".join(f"{t} {n}" for t, n in shots.items() if t in report["tasks"]),
             f"lm_eval {report['versions']['lm_eval']}, dtype {report['dtype']}, device {report['device']}"]
    if report["limit"]:
        notes.append(f"--limit {report['limit']}: only the first {report['limit']} examples of each task; "
                     "not comparable with published scores")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _json_default(value: Any) -> Any:
    """lm-eval's results hold a few non-JSON values (numpy numbers, functions in task configs)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def write_report(report: dict, out: Path) -> None:
    from .outputs import write_files

    table = render_markdown(report)
    text = json.dumps(report, indent=1, ensure_ascii=False, default=_json_default) + "\n"
    writers = {"benchmark.json": lambda path: path.write_text(text, encoding="utf-8"),
               "benchmark.md": lambda path: path.write_text(table, encoding="utf-8")}
    paths = write_files(out, writers, "the benchmark report", "tidpo benchmark")
    print(table.rstrip())
    print("\n" + "\n".join(f"wrote {path}" for path in paths))
