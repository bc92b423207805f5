"""The `tidpo` command: subcommand dispatch. `tidpo train` is a Hydra application over conf/."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, UserError

USAGE = """usage: tidpo COMMAND [ARGS]

commands:
  train    fine-tune a model (Hydra: tidpo train [GROUP=OPTION] [KEY=VALUE] [-m] [--cfg job] [--help])
  eval     score a trained model on preference pairs: tidpo eval MODEL_OR_RUN_DIR [data=...] [KEY=VALUE]
           [--reference PATH] [--split eval|train] [--samples N]; writes eval.json and eval.md
  export   write a trained model as an HF model directory (LoRA merged): tidpo export CHECKPOINT_OR_RUN_DIR OUT
  explain  show which tokens TI-DPO weighs: tidpo explain MODEL_OR_RUN_DIR --prompt P --response R [--rejected R2]
           or --data FILE --rows 0:8; writes explain.html, explain.png, explain.json
  benchmark  lm-evaluation-harness tasks (the paper's Table 1) on a trained model; needs tidpo[benchmark]:
             tidpo benchmark MODEL_OR_RUN_DIR [--tasks paper|mmlu,gsm8k,...] [--include-path DIR] [--limit N];
             writes benchmark.json and benchmark.md

With no arguments `tidpo train` runs the offline demo: a tiny Llama learns the synthetic task with TI-DPO.
`tidpo train --help` lists the config groups and every key.
"""


# Commands besides train: (module, function taking the remaining arguments).
SUBCOMMANDS = {
    "eval": (".evaluation", "eval_main"),
    "export": (".export", "export_main"),
    "explain": (".explain", "explain_main"),
    "benchmark": (".benchmark", "benchmark_main"),
}


def conf_dir() -> Path:
    """The Hydra config tree: packaged inside the wheel as tidpo_cli/conf, or conf/ beside a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"tidpo's config tree (train.yaml) is missing: looked in {here / 'conf'} and "
                            f"{here.parent / 'conf'}; reinstall the package")


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"tidpo: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _train_job(cfg) -> float | None:
    """Hydra's task function: validate, then train in the run dir Hydra made."""
    from hydra.core.hydra_config import HydraConfig

    from .config import validate

    from .runlock import drop_hydra_record

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = validate(cfg)  # bad values stop here, before any model loads
    except UserError as e:
        drop_hydra_record(run_dir)
        _discard_if_empty(run_dir)
        fail(str(e))
    try:
        from .trainer import train  # torch and transformers load only for a real run

        metrics = train(cfg, run_dir)
    except UserError as e:
        drop_hydra_record(run_dir)  # a start refused before it held the run dir (after: gone already)
        # Exit here: an exception would make Hydra print its own "Error executing job" line first.
        fail(str(e))
    # A number for Hydra sweepers that optimise: held-out loss when there is a held-out split.
    return metrics.get("eval/loss")


def _discard_if_empty(run_dir: Path) -> None:
    """Remove the run dir Hydra just made for a config that never ran (only an empty log, and .hydra/ if any)."""
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    log_file = run_dir / "train.log"
    if names <= {".hydra", "train.log"} and (not log_file.exists() or log_file.stat().st_size == 0):
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        # Its parents (runs/DATE/) too while they are empty, but never the working directory or above it.
        cwd = Path.cwd().resolve()
        for parent in run_dir.resolve().parents:
            if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of every job `tidpo train -m ARGS` would run: the experiment's `hydra.sweeper.params` and the
    command line's comma lists (the command line wins for a key in both), expanded as Hydra's basic sweeper does."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides([a for a in args if "=" in a])
    fixed = [o.input_line for o in given if not o.is_sweep_override()]
    swept = {o.key_or_group: [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
             for o in given if o.is_sweep_override()}
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        hydra_cfg = compose(config_name="train", overrides=fixed, return_hydra_config=True).hydra
    for key, values in (hydra_cfg.sweeper.get("params") or {}).items():
        if key not in swept and not any(o.key_or_group == key for o in given):
            override = parser.parse_overrides([f"{key}={values}"])[0]
            swept[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
    return [fixed + list(combo) for combo in itertools.product(*swept.values())]


def print_sweep(args: list[str]) -> None:
    """`tidpo train -m ... --cfg job`: every job's composed config, one after another (Hydra itself refuses -m with
    --cfg). A job whose config would stop before training says why, on stderr."""
    from omegaconf import OmegaConf

    from .config import validate

    rest = [a for a in args if a not in ("-m", "--multirun", "--cfg", "-c", "job", "all")]
    jobs = sweep_jobs(rest)
    for number, overrides in enumerate(jobs):
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        print(f"# job {number}: {' '.join(o for o in overrides if o not in rest)}")
        print(OmegaConf.to_yaml(cfg))
        try:
            validate(cfg)
        except UserError as e:
            print(f"tidpo: job {number} would stop: {e}", file=sys.stderr)
    print(f"# {len(jobs)} jobs", file=sys.stderr)


def run_train(args: list[str]) -> None:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Let errors reach us instead of Hydra's own report, so a user's mistake is one line with exit code 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        refuse_base_options(args)
    except UserError as e:
        fail(str(e))
    if {"-m", "--multirun"} & set(args) and {"--cfg", "-c"} & set(args):
        try:
            return print_sweep(args)
        except (HydraException, OmegaConfBaseException) as e:
            if not _is_composition_error(e):
                raise
            fail(_one_line(e))
    entry = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_train_job)
    sys.argv = ["tidpo train", *args, *_shared_run_dir(args)]
    if {"-h", "--help"} & set(args):
        entry = _without_base_options(entry)
    try:
        entry()
    except UserError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        if not _is_composition_error(e):
            raise
        fail(_one_line(e))
    except (OSError, ValueError) as e:
        # Hydra makes the run dir, writes .hydra/ and opens train.log before our code runs: a path through a file,
        # a read-only or full disk fails there.
        disk = _disk_fault(e)
        if disk is None:
            raise
        from .disk import message

        given = [a.split("=", 1)[1] for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
        fail(message("the run directory", disk.filename or (given[-1] if given else "(hydra.run.dir)"),
                     disk.strerror))


def _groups_with_base() -> list[str]:
    """The config groups whose `base.yaml` holds what every option of the group shares (each option lists it first
    in its defaults): a file to inherit from, not an option to pick."""
    return sorted(p.parent.name for p in conf_dir().glob("*/base.yaml"))


def refuse_base_options(overrides: list[str]) -> None:
    """`loss=base` (or `model=base`, `data=base`, in a sweep's list too) as one line naming the options to pick;
    composed, it would stop later on a value it leaves unset (`loss.name has no value`)."""
    groups = _groups_with_base()
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key in groups and "base" in (v.strip() for v in value.split(",")):
            options = sorted(p.stem for p in (conf_dir() / key).glob("*.yaml") if p.stem != "base")
            raise ConfigError(f"{key}=base is not an option to pick: conf/{key}/base.yaml holds the defaults every "
                              f"{key} option shares; pick one of: {', '.join(options)}")


def _without_base_options(entry):
    """`tidpo train --help` with the groups' `base` files left out of the options it lists."""
    import contextlib
    import io
    import re

    pattern = re.compile(rf"^({'|'.join(map(re.escape, _groups_with_base()))}): base(, |$)", flags=re.M)

    def help_entry() -> None:
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                entry()
        finally:
            sys.stdout.write(pattern.sub(r"\1: ", buffer.getvalue()))

    return help_entry


def compose_config(overrides: list[str]):
    """The validated config that `tidpo train OVERRIDES` would run with, without running it (for eval and
    tests). A bad override or value is a UserError of one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import validate

    refuse_base_options(list(overrides))
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        if not _is_composition_error(e):
            raise
        raise UserError(_one_line(e)) from None
    return validate(cfg)


def _shared_run_dir(args: list[str]) -> list[str]:
    """Under torchrun or srun every process runs `tidpo train`; they must all write to one run directory,
    which a timestamp taken by each would not give. Named after the launch's id unless the user names it."""
    from .distributed import world_size_from_env

    if world_size_from_env() == 1 or any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        return []
    run_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none":
        fail("several processes need one run directory: add hydra.run.dir=runs/NAME (torchrun --standalone and "
             "SLURM jobs get runs/distributed/<id> by themselves)")
    return [f"hydra.run.dir=runs/distributed/{run_id}"]


def _disk_fault(e: BaseException) -> OSError | None:
    """The disk fault (an OSError of `disk.DISK_ERRNOS`) behind `e`, following the chain of causes."""
    from .disk import DISK_ERRNOS

    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _is_composition_error(e: Exception) -> bool:
    """Errors of the command line or config tree (bad override, unknown option), not of our code."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    return isinstance(e, (ConfigCompositionException, MissingConfigException, OverrideParseException))


def _one_line(e: Exception) -> str:
    from hydra.errors import MissingConfigException

    text = str(e).strip()
    if isinstance(e, MissingConfigException) and "Available options" in text:
        head, _, options = text.partition("Available options")
        choices = ", ".join(o.strip() for o in options.split("\n")[1:] if o.strip())
        return f"{head.strip().splitlines()[0]} (available: {choices})"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _without_local_rank(args: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N` (it also sets LOCAL_RANK, which is what we read)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def _cpu_accelerator_for_deepspeed() -> None:
    """DeepSpeed (imported by transformers and accelerate when saving) warns on every start without a GPU that
    it "falls back" to the CPU; on a machine with no GPU that is the plan, so say so up front."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> None:
    argv = _without_local_rank(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"tidpo {__version__}")
        return
    command, args = argv[0], argv[1:]
    _cpu_accelerator_for_deepspeed()
    from .distributed import close

    try:
        _dispatch(command, args)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints on it: trainer.StopSignals)
        print(f"tidpo: error: interrupted (Ctrl-C) during tidpo {command}; what was saved before is kept",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # on an error's exit too, which would otherwise end in the interpreter's teardown of the group
        close()


def _dispatch(command: str, args: list[str]) -> None:
    if command == "train":
        run_train(args)
    elif command in SUBCOMMANDS:
        module, function = SUBCOMMANDS[command]
        try:
            getattr(importlib.import_module(module, __package__), function)(args)
        except UserError as e:
            fail(str(e))
    else:
        fail(f"unknown command '{command}': expected one of: train, {', '.join(SUBCOMMANDS)} (see tidpo --help)")


def entry() -> None:
    """The process's entry point (`tidpo`, `python -m tidpo_cli.cli`): `main`, and then, for a command that joined a
    process group, the end of the process without the interpreter's teardown.

    Destroying a group does not end gloo's threads: DeepSpeed keeps the group objects (its engines, every ZeRO-3
    parameter's `ds_process_group`, module globals such as `deepspeed.utils.groups._WORLD_GROUP`), so after
    `destroy_process_group` a finished run still has gloo's worker and transport threads, and the objects go only
    with the interpreter's teardown. That teardown is where a finished 2-process ZeRO-3 rank on this project's CPU
    machines now and then aborted ("terminate called without an active exception", after its train.log said
    done.), the failure PyTorch's tracker describes for gloo's threads outliving the interpreter
    (pytorch/pytorch#179291). So such a process runs its exit handlers (logging's flush and close,
    temporary directories, compile workers) and flushes its streams itself, then ends with `os._exit`, its exit
    status that of the command. Everything a command writes is written and closed before that (train.log, metrics,
    checkpoints, the run lock, wandb's run)."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = exit_status(stop)
    distributed = sys.modules.get(f"{__package__}.distributed")
    if distributed is None or not distributed.left_a_group():
        raise SystemExit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def exit_status(stop: SystemExit) -> int:
    """The status Python gives a process that ends on `stop`: its code, 0 for none; a message is printed and gives 1."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    entry()
