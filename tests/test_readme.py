"""The README stays true: every `tidpo` command in it composes or parses, the config tables list what conf/
holds, the quick walkthrough and the error examples run as written, and the paper's experiment configs train
on local stand-ins for their hub models and data."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, compose_config, run_tidpo
from tidpo_cli import benchmark, evaluation, explain, export

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"(<!-- docs-test: run -->\n)?```bash\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The `tidpo ...` commands of a bash block (continuation lines joined, comments dropped); a launcher's
    `... -m tidpo_cli.cli ARGS` (torchrun) or `... --module tidpo_cli.cli ARGS` (deepspeed) as `tidpo ARGS`,
    and `sbatch ... scripts/slurm/train.sbatch OVERRIDES` as `tidpo train OVERRIDES`."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
            words = words[1:]
        if words[:1] == ["tidpo"]:
            out.append(words)
        elif "tidpo_cli.cli" in words and words[0] in ("torchrun", "deepspeed", "srun"):
            out.append(["tidpo", *words[words.index("tidpo_cli.cli") + 1:]])
        elif words[:1] == ["sbatch"] and "scripts/slurm/train.sbatch" in words:
            out.append(["tidpo", "train", *words[words.index("scripts/slurm/train.sbatch") + 1:]])
    return out


ALL = [c for _, block in BLOCKS for c in commands(block)]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of a `-m` sweep: KEY=A,B values expanded (brackets keep their commas)."""
    choices = []
    for o in overrides:
        key, _, value = o.partition("=")
        values = value.split(",") if "," in value and "[" not in value else [value]
        choices.append([f"{key}={v}" for v in values])
    return [list(p) for p in itertools.product(*choices)]


def test_the_readme_has_commands_of_every_kind():
    kinds = {c[1] for c in ALL}
    assert {"train", "eval", "export", "explain", "benchmark"} <= kinds, kinds


@pytest.mark.parametrize("argv", [c for c in ALL if c[1] == "train"], ids=lambda c: " ".join(c[2:])[:60])
def test_every_train_command_composes(argv):
    args = [a for a in argv[2:] if a not in ("-m", "--multirun", "--help")]
    if "--cfg" in args:
        i = args.index("--cfg")
        del args[i:i + 2]
    overrides = [a for a in args if not a.startswith("hydra.")]
    for point in sweep_points(overrides) if "-m" in argv else [overrides]:
        compose_config(point)  # raises on an unknown group, option, key or a bad value


@pytest.mark.parametrize("argv", [c for c in ALL if c[1] in ("eval", "export", "explain", "benchmark")],
                         ids=lambda c: " ".join(c[1:])[:60])
def test_every_other_command_parses(argv):
    parsers = {"eval": evaluation.build_parser, "export": export.build_parser, "explain": explain.build_parser,
               "benchmark": benchmark.build_parser}
    parser = parsers[argv[1]]()
    args = parser.parse_intermixed_args(argv[2:]) if argv[1] == "eval" else parser.parse_args(argv[2:])
    if argv[1] == "eval":
        compose_config(args.overrides)
    if argv[1] == "benchmark":
        benchmark.parse_tasks(args.tasks)


def test_config_tables_list_every_option_in_conf():
    for group in ("model", "data", "loss", "trainer", "logger", "deepspeed", "experiment"):
        row = re.search(rf"^\| `{group}` \| (.*?) \|", README, flags=re.M)
        assert row, f"no row for the {group} group"
        listed = set(re.findall(r"`([a-z0-9_]+)`", row.group(1)))
        shipped = {p.stem for p in (REPO / "conf" / group).glob("*.yaml")} - {"base"}
        assert listed == shipped, (group, listed ^ shipped)
    loss_table = set(re.findall(r"^\| `([a-z_]+)` \|", README[README.index("| `loss=` |"):], flags=re.M))
    assert {p.stem for p in (REPO / "conf" / "loss").glob("*.yaml")} - {"base"} <= loss_table


def test_error_examples_print_what_the_readme_shows(tmp_path):
    for command, expected in re.findall(r"^\$ (tidpo .*)\n(tidpo: error: .*)$", README, flags=re.M):
        result = run_tidpo(shlex.split(command)[1:], cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip() == expected


def test_quickstart_walkthrough_runs_as_written(tmp_path):
    (block,) = [b for marker, b in BLOCKS if marker]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    for argv in commands(block):
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
    run = tmp_path / "runs" / "quick"
    assert json.loads((run / "eval" / "eval.json").read_text())["metrics"]["rewards/accuracies"] > 0.55
    assert (tmp_path / "runs" / "quick-hf" / "model.safetensors").is_file()
    assert (run / "explain" / "explain.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """Stand-ins on disk for a hub model (a tiny Llama saved with its tokenizer) and for hub datasets."""
    import torch

    from tidpo_cli.modeling import build_tiny_llama
    from tidpo_cli.tokenizer import build_byte_tokenizer

    root = tmp_path_factory.mktemp("hub")
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_llama(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4), tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    hh = [{"chosen": f"\n\nHuman: say {w}\n\nAssistant: {w}", "rejected": f"\n\nHuman: say {w}\n\nAssistant: no"}
          for w in ("red", "green", "blue", "cyan", "pink", "gold")]
    (root / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    uf = [{"prompt": f"say {w}", "chosen": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}],
           "rejected": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": "no"}]}
          for w in ("red", "green", "blue", "cyan", "pink", "gold")]
    (root / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in uf))
    return root


@pytest.mark.parametrize("experiment, data", [("llama8b_ultrafeedback", "uf.jsonl"), ("llama3b_hh", "hh.jsonl"),
                                              ("mistral7b_hh", "hh.jsonl")])
def test_paper_experiments_train_on_local_copies(local_hub, tmp_path, experiment, data):
    """The big-model configs as shipped (RMSprop, bf16 autocast, activation checkpointing, the model's own
    tokenizer and chat template), with only the hub names swapped for local paths and the length cut short."""
    result = run_tidpo(["train", f"+experiment={experiment}", f"model.name_or_path={local_hub / 'model'}",
                        f"data.path={local_hub / data}", f"data.eval_path={local_hub / data}", "trainer.max_steps=2",
                        "trainer.eval_every=1", "loss.anchor.max_new_tokens=4", "logger.progress=off",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "optimizer: rmsprop" in config and "precision: bf16" in config and "gradient_checkpointing: true" in config
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "eval/loss" not in r] == [1, 2]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert "DeepSpeed ZeRO-" in (tmp_path / "run" / "train.log").read_text()  # a group of one process
    assert not (tmp_path / "run" / "reference").exists()  # a loaded model is its own record of the reference


@pytest.mark.parametrize("argv", [c for c in ALL if c[1] == "train" and ("--cfg" in c or "--help" in c)],
                         ids=lambda c: " ".join(c[2:])[:60])
def test_commands_that_load_nothing_run_as_written(argv, tmp_path):
    result = run_tidpo(argv[1:], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("loss:" in result.stdout) if "--cfg" in argv else ("model:" in result.stdout or "Configuration groups" in result.stdout)
    assert not (tmp_path / "runs").exists()  # nothing trained, no run directory left behind
