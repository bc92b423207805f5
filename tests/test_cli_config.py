"""`tidpo train` as a Hydra application: help, --cfg job, and one clear line for every config mistake."""

import re
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, compose_config, run_tidpo
from tidpo_cli.config import TrainConfig
from tidpo_cli.errors import ConfigError


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tidpo: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("override,needles", [
    ("loss.beta=-1", ["loss.beta", "> 0"]),
    ("trainer.lr=abc", ["trainer.lr", "'abc'", "a number"]),
    ("+trainer.foo=1", ["trainer.foo", "max_steps", "lr"]),
    ("trainer.foo=1", ["trainer.foo"]),
    ("trainer.optimizer=sgd", ["trainer.optimizer", "adamw", "rmsprop"]),
    ("loss=nope", ["loss/nope", "dpo", "sft"]),
    ("data.max_length=8", ["data.max_prompt_length", "data.max_length"]),
    ("trainer.micro_batch_size=0", ["trainer.micro_batch_size", "> 0"]),
    ("loss=base", ["loss=base is not an option", "pick one of: cdpo", "tidpo_code", "tpo"]),
])
def test_config_mistakes_end_in_one_line_and_exit_2(tmp_path, override, needles):
    result = run_tidpo(["train", override], cwd=tmp_path)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "runs").exists()  # the run dir Hydra made for a run that never started is gone


def test_unknown_command_exits_2(tmp_path):
    assert_one_line_error(run_tidpo(["trian"], cwd=tmp_path), "trian", "train")


def test_cfg_job_prints_the_composed_config_and_loads_nothing(tmp_path):
    result = run_tidpo(["train", "loss.beta=0.05", "model=llama3_8b", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["loss"]["beta"] == 0.05
    assert cfg["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert set(cfg) >= {"model", "data", "loss", "trainer", "logger", "seed"}
    assert not (tmp_path / "runs").exists()


def test_help_lists_groups_and_options(tmp_path):
    result = run_tidpo(["train", "--help"], cwd=tmp_path)
    assert result.returncode == 0
    for text in ["model: ", "llama3_8b", "mistral_7b", "loss: ", "dpo", "sft", "experiment: demo", "Examples"]:
        assert text in result.stdout
    groups = result.stdout[result.stdout.index("Config groups"):result.stdout.index("The composed config")]
    for group in ("model", "data", "loss"):  # their base.yaml is what the options share, not an option
        (line,) = [line for line in groups.splitlines() if line.startswith(f"{group}: ")]
        assert "base" not in line.split(": ", 1)[1].split(", "), line


@pytest.mark.parametrize("overrides", [["model=base"], ["data=base"], ["loss=dpo,base"], ["+loss=base"]])
def test_a_group_s_base_file_is_refused_naming_the_options(overrides):
    group = overrides[0].lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{group}=base is not an option to pick: .* pick one of: "):
        compose_config(overrides)


def test_top_level_help_and_version(tmp_path):
    assert run_tidpo(["--help"], cwd=tmp_path).stdout.startswith("usage: tidpo")
    assert run_tidpo(["--version"], cwd=tmp_path).stdout.startswith("tidpo ")


def test_every_option_of_every_group_composes_and_validates(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("composing a config reached for the network")

    # The big-model and experiment options name hub models and data sets: composing must not fetch them.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    groups = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml") if p.stem != "base")
              for g in ("model", "data", "loss", "trainer", "logger", "deepspeed", "experiment")}
    default = compose_config([])
    for group, options in groups.items():
        assert options, group
        for option in options:
            extra = {("data", "preference"): ["data.path=x.jsonl"],
                     ("loss", "tis_dpo"): ["loss.tis.positive_model=p", "loss.tis.negative_model=n"],
                     # these two start from the noise study's warm-up model, which has no default path
                     ("experiment", "noise_robustness"): ["model.name_or_path=warmup/final"],
                     ("experiment", "paper_table1_demo"): ["model.name_or_path=warmup/final"]}.get((group, option), [])
            if group == "experiment":  # not a group of the defaults list: added with +
                cfg = compose_config([f"+experiment={option}", *extra])
                assert (cfg == default) == (option == "demo"), option  # every other experiment sets something
            else:
                cfg = compose_config([f"{group}={option}", *extra])
                assert cfg[group] is not None
            if group == "deepspeed":
                assert cfg.deepspeed.enabled == (option != "none")
                stage = cfg.deepspeed.zero_optimization.get("stage")
                assert stage == (None if option == "none" else int(option[4])), option


def test_experiment_demo_is_the_default_run():
    assert compose_config(["+experiment=demo"]) == compose_config([])


def test_schema_and_conf_have_the_same_keys():
    """Every schema key has a value in conf/ and every conf key is in the schema (no knob hides in code)."""
    import dataclasses
    cfg = compose_config([])
    for section in ("model", "data", "loss", "trainer", "logger"):
        schema = next(f.type for f in dataclasses.fields(TrainConfig) if f.name == section)
        assert set(cfg[section].keys()) == {f.name for f in dataclasses.fields(eval(schema, vars(__import__("tidpo_cli.config", fromlist=["x"]))))}


def test_config_error_is_raised_before_any_model_loads():
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        compose_config(["loss.label_smoothing=0.5"])


def test_conf_tree_ships_inside_the_wheel(tmp_path):
    """Built as a wheel and installed elsewhere, `tidpo train --cfg job` still finds conf/."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("tidpo-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "tidpo_cli" / "conf" / "train.yaml").is_file()
    assert (target / "tidpo_cli" / "conf" / "model" / "tiny.yaml").is_file()
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                             "import tidpo_cli.cli as c; print(c.conf_dir()); c.main(['train', '--cfg', 'job'])",
                             str(target)], cwd=run_dir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout.splitlines()[0]
    assert "hidden_size: 64" in result.stdout


def test_config_changes_lists_differing_leaves():
    from tidpo_cli.config import config_changes
    old = compose_config([])
    new = compose_config(["trainer.max_steps=900", "loss.beta=0.2", "trainer.resume=never"])
    assert config_changes(old, new) == ["loss.beta: 0.1 -> 0.2", "trainer.max_steps: 800 -> 900"]
    assert config_changes(old, old) == []


def test_a_gpu_asked_for_where_there_is_none_is_one_clear_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_tidpo(["train", "trainer.device=cuda", "data.synthetic.num_train=64", "data.eval_size=8"], cwd=tmp_path)
    assert_one_line_error(result, "trainer.device=cuda", "CUDA is not available")


def test_train_help_lists_every_loss_preset():
    out = subprocess.run([sys.executable, "-m", "tidpo_cli.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    listed = out[out.index("Losses (loss=NAME"):out.index("Config groups")]
    for preset in sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml") if p.stem != "base"):
        assert re.search(rf"\b{preset}\b", listed), preset


@pytest.mark.parametrize("experiment, jobs", [("paper_table1", 16), ("paper_table1_demo", 48)])
def test_paper_table1_sweep_composes_every_job(tmp_path, experiment, jobs):
    """`tidpo train -m +experiment=paper_table1 --cfg job` prints every job's config (Hydra alone refuses -m with
    --cfg): every loss the paper's Table 1 and Table 2 name that tidpo has (x 3 seeds in the demo)."""
    result = run_tidpo(["train", "-m", f"+experiment={experiment}", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    names = re.findall(r"^loss:\n  name: (\w+)", result.stdout, flags=re.M)
    assert len(names) == jobs and f"# {jobs} jobs" in result.stderr
    expected = {"sft", "dpo", "ipo", "kto", "simpo", "tdpo", "cpo", "tpo", "tidpo", "tis_dpo"}
    assert expected <= set(names) and "cdpo" not in names  # cdpo is dpo with label smoothing
    assert result.stdout.count("label_smoothing: 0.1") == jobs // 16
    assert "job 15 would stop: loss=tis_dpo needs loss.tis.positive_model" in result.stderr or jobs != 16
    assert not list(tmp_path.iterdir())  # nothing ran, no run directory
