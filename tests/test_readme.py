"""The README stays true: every `tidpo` command in it composes or parses, the config tables list what conf/
holds, every conf/ key and every command's flag is named, the quick walkthrough (twice) and the error examples run
as written, and the paper's experiment configs train on local stand-ins for their hub models and data. And a fresh
clone can follow the docs: docs/method.md names only shipped presets and its preset table is conf/loss/, nothing
points into the development setup's ../shared folder, and the benchmarks say in one line what data to pass."""

from __future__ import annotations

import contextlib
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


METHOD = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
LOSS_PRESETS = {p.stem for p in (REPO / "conf" / "loss").glob("*.yaml")} - {"base"}
# Values passed on as written (LlamaConfig fields, DeepSpeed's own zero_optimization block): named as a whole.
PASSED_THROUGH = {"model.config", "deepspeed.zero_optimization"}


def conf_keys() -> set[str]:
    """Every leaf key that a file of conf/ (every group but hydra/) sets, as `group.key.subkey`."""
    import yaml

    keys = set()
    for group_dir in sorted(p for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra"):
        for path in sorted(group_dir.glob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            prefix = "" if "@package _global_" in text else f"{group_dir.name}."

            def walk(node: dict, at: str) -> None:
                for name, value in node.items():
                    if at in ("", f"{group_dir.name}.") and name in ("defaults", "hydra"):
                        continue
                    key = at + str(name)
                    if isinstance(value, dict) and value and key not in PASSED_THROUGH:
                        walk(value, key + ".")
                    else:
                        keys.add(key)

            walk(yaml.safe_load(text) or {}, prefix)
    return {k for k in keys if not any(other.startswith(k + ".") for other in keys)}  # null in base, a group elsewhere


def readme_names() -> set[str]:
    """The dotted names the README gives in backticks, `a.{b, c}` read as `a.b` and `a.c`; in a row of the
    configuration table (`| group | options | what it sets |`) relative to that group."""
    def expand(token: str) -> set[str]:
        token = token.split("=")[0].strip()
        braced = re.fullmatch(r"([\w.]*)\{([^{}]*)\}", token)
        return {braced.group(1) + part.strip() for part in braced.group(2).split(",")} if braced else {token}

    names = {n for token in re.findall(r"`([^`\n]+)`", README) for n in expand(token)}
    for group in ("model", "data", "loss", "trainer", "logger", "deepspeed"):
        row = re.search(rf"^\| `{group}` \| .*? \| (.*) \|$", README, flags=re.M)
        names |= {f"{group}.{n}" for token in re.findall(r"`([^`\n]+)`", row.group(1)) for n in expand(token)}
    return names


def test_every_conf_key_is_named_in_the_readme():
    keys = conf_keys()
    assert {"loss.anchor.prefix_fraction", "data.synthetic.num_train", "deepspeed.enabled", "model.dtype"} <= keys
    missing = sorted(keys - readme_names())
    assert not missing, f"conf/ keys the README does not name: {missing}"


def _flags(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings if o not in ("-h", "--help")}


# Each command's flags must be named in its README section (or in a paragraph that names the command).
SECTIONS = {"eval": "## Evaluate and export", "export": "## Evaluate and export",
            "explain": "## Which tokens does TI-DPO weigh?", "benchmark": "## Benchmarks (lm-evaluation-harness)"}


def test_every_flag_of_every_command_is_named_in_the_readme():
    from tidpo_cli.cli import main

    parsers = {"eval": evaluation.build_parser, "export": export.build_parser, "explain": explain.build_parser,
               "benchmark": benchmark.build_parser}
    paragraphs = README.split("\n\n")
    missing = []
    for command, build in parsers.items():
        start = README.index(SECTIONS[command])
        section = README[start:README.find("\n## ", start + 1)]
        texts = [section] + [p for p in paragraphs if f"tidpo {command}" in p]
        for flag in sorted(_flags(build())):
            if not any(re.search(rf"{re.escape(flag)}(?![\w-])", text) for text in texts):
                missing.append(f"tidpo {command} {flag}")
    for flag in ("--help", "--version"):  # the top level's own flags (tidpo_cli.cli.main)
        with pytest.raises(SystemExit) if flag == "--help" else contextlib.nullcontext():
            main([flag])  # a flag main() knows
        if not re.search(rf"`tidpo {flag}`", README):
            missing.append(f"tidpo {flag}")
    assert not missing, f"flags the README does not name: {missing}"


def loss_preset(name: str):
    """conf/loss/NAME.yaml merged onto its defaults list (`base`, or another preset, then `_self_`), as Hydra composes
    it (tests/test_cli_config.py composes every option through Hydra); milliseconds instead of seconds."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(REPO / "conf" / "loss" / f"{name}.yaml")
    defaults = list(node.pop("defaults", []))
    parents = [d for d in defaults if d != "_self_"]
    assert all(isinstance(d, str) for d in parents) and "_self_" not in defaults[:-1], defaults
    return OmegaConf.merge(*[loss_preset(d) for d in parents], node)


def test_the_method_doc_names_only_shipped_presets_and_keys_and_its_table_is_the_conf():
    named = set(re.findall(r"`(?:loss=)?(tidpo\w*|dpo|tdpo|ipo|cdpo|sft|kto|simpo|cpo|orpo|tpo|tis_dpo)`", METHOD))
    named |= set(re.findall(r"loss=([a-z0-9_]+)", METHOD))
    assert named and named <= LOSS_PRESETS, named - LOSS_PRESETS
    keys = conf_keys()
    for key in set(re.findall(r"`(loss\.[\w.]+)`", METHOD)):
        assert key in keys, f"docs/method.md names {key}, which conf/loss/ does not have"
    table = METHOD[METHOD.index("## 5. "):]
    header = next(line for line in table.splitlines() if line.startswith("| preset |"))
    columns = re.findall(r"`([\w.]+)`", header)
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", table, flags=re.M)
    assert {"tidpo", "tidpo_code", "tidpo_no_triplet", "tidpo_uniform", "tidpo_random", "tidpo_no_prior",
            "tidpo_softmax"} <= {name for name, _ in rows}
    for name, cells in rows:
        loss = loss_preset(name)
        values = [c.strip() for c in cells.split(" | ")][:len(columns)]
        for column, value in zip(columns, values):
            actual = loss
            for part in column.split("."):
                actual = actual[part]
            assert str(actual) == value, (name, column, actual, value)


def test_docs_a_fresh_clone_can_follow():
    """No pointer into the development setup's ../shared folder from the README, the method doc or conf/, and
    every relative link of the README and the method doc leads to a file of the project."""
    conf_text = "".join(p.read_text(encoding="utf-8") for p in (REPO / "conf").rglob("*.yaml"))
    for name, text in (("README.md", README), ("docs/method.md", METHOD), ("conf/", conf_text)):
        for needle in ("../shared", "METHOD.md", "METHOD section"):
            assert needle not in text, (name, needle)
    assert "(docs/method.md)" in README
    for doc, text in ((REPO / "README.md", README), (REPO / "docs" / "method.md", METHOD)):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (doc.parent / target).exists(), (doc.name, target)


@pytest.mark.parametrize("command", [["python", "scripts/bench/trl_vs_tidpo.py", "--check-data"],
                                     ["python", "scripts/bench/scaling.py"], ["bash", "scripts/bench/gpu.sh"]],
                         ids=lambda c: c[1])
def test_benchmarks_without_the_hh_rlhf_file_say_what_to_pass(command, tmp_path):
    """A fresh clone has no ../shared/data: `make bench`, `make bench-scaling` and gpu.sh stop at once, in one line."""
    argv = [sys.executable if command[0] == "python" else command[0], str(REPO / command[1]), *command[2:]]
    env = {**os.environ, "HH": str(tmp_path / "no-such-file.jsonl.gz"), "OUT": str(tmp_path / "out")}
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no HH-RLHF file at" in lines[0] and "pass HH=" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_the_demo_accuracy_the_readme_promises_is_what_the_demo_test_checks():
    """The README's threshold for `make demo` and tests/test_end_to_end.py's assertion are the same number."""
    test = (REPO / "tests" / "test_end_to_end.py").read_text(encoding="utf-8")
    (checked,) = re.findall(r"assert after >= ([0-9.]+)", test)
    promised = re.search(r"held-out accuracy of at least ([0-9.]+)", README)
    assert promised and promised.group(1) == checked, (promised and promised.group(1), checked)


def test_error_examples_print_what_the_readme_shows(tmp_path):
    examples = re.findall(r"^\$ (tidpo .*)\n(tidpo: error: .*)$", README, flags=re.M)
    assert len(examples) >= 2, examples  # the Configuration section shows two
    for command, expected in examples:
        result = run_tidpo(shlex.split(command)[1:], cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip() == expected


def test_quickstart_walkthrough_runs_as_written(tmp_path, monkeypatch):
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
    # The block runs again as written (its outputs exist now); in this process, to save the start-ups. A second
    # `tidpo train` of a finished run says `already finished` (tests/test_resume.py).
    from tidpo_cli.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in commands(block):
        if argv[1] != "train":
            main(argv[1:])


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
