"""The `tidpo` command: subcommand dispatch. `tidpo train` is a Hydra application over conf/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

USAGE = """usage: tidpo COMMAND [ARGS]

commands:
  train    fine-tune a model (Hydra: tidpo train [GROUP=OPTION] [KEY=VALUE] [-m] [--cfg job] [--help])

With no arguments `tidpo train` runs the offline demo: a tiny Llama learns the synthetic task with TI-DPO.
`tidpo train --help` lists the config groups and every key.
"""


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

    try:
        cfg = validate(cfg)  # bad values stop here, before any model loads
        from .trainer import train  # torch and transformers load only for a real run

        metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        # Exit here: an exception would make Hydra print its own "Error executing job" line first.
        fail(str(e))
    # A number for Hydra sweepers that optimise: held-out loss when there is a held-out split.
    return metrics.get("eval/loss")


def run_train(args: list[str]) -> None:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Let errors reach us instead of Hydra's own report, so a user's mistake is one line with exit code 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    entry = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_train_job)
    sys.argv = ["tidpo train", *args]
    try:
        entry()
    except UserError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        if not _is_composition_error(e):
            raise
        fail(_one_line(e))


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"tidpo {__version__}")
        return
    command, args = argv[0], argv[1:]
    if command == "train":
        run_train(args)
    else:
        fail(f"unknown command '{command}': expected one of: train (see tidpo --help)")


if __name__ == "__main__":
    main()
