"""What a run produced, found and loaded: a run directory, its `final/` model, any `checkpoints/step-N/`, or
any HF model directory; and the reference model that run trained against (outputs.py: where they write).

`tidpo eval`, `tidpo explain`, `tidpo export` and `tidpo benchmark` all start here, so they accept the same paths
and stop alike, with one line, on a model that cannot be loaded (missing, truncated, changed on disk, or of
another shape than its config says) and on an output they may not or cannot write.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from .checkpoint import fill_weights, list_checkpoints, load_weights
from .distributed import read_engine_weights
from .errors import UserError
from .manifest import check_files, has_manifest

RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng-rank0.json", "rng-rank0.safetensors")  # plain engine's
ACCEPTED = "a run directory, RUN/final, RUN/checkpoints/step-N, or an HF model directory"


@dataclass
class Trained:
    model: torch.nn.Module      # eval mode, no parameter requires grad, LoRA (if any) merged
    tokenizer: Any
    source: Path                # the directory the weights came from
    run_dir: Path | None        # the run that produced them, when known
    cfg: DictConfig | None      # that run's composed config, when known


def locate(path: str | Path) -> tuple[str, Path, Path | None]:
    """(kind, directory, run dir or None) for a path a user typed. kind: "hf" (config.json and weights) or
    "checkpoint" (state.json). A run directory means its final/ model, else its newest checkpoint."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"'{path}' does not exist: pass {ACCEPTED}")
    if not given.is_dir():
        raise UserError(f"'{path}' is a file, not a directory: pass {ACCEPTED}")
    if (given / "state.json").is_file():
        run_dir = given.parent.parent if given.parent.name == "checkpoints" else None
        return "checkpoint", given, run_dir
    if (given / "config.json").is_file():
        run_dir = given.parent if (given.parent / ".hydra").is_dir() else None
        return "hf", given, run_dir
    if (given / "final" / "config.json").is_file():
        return "hf", given / "final", given
    checkpoints = list_checkpoints(given)
    if checkpoints:
        return "checkpoint", checkpoints[-1], given
    if (given / "adapter_config.json").is_file():
        raise UserError(f"'{path}' is a LoRA adapter alone: pass the run's final/ (adapter merged) or one of "
                        "its checkpoints")
    if (given / ".hydra").is_dir():
        raise UserError(f"run directory '{path}' has no final/ model and no checkpoint yet (the run did not get "
                        "that far): pass a run that saved one")
    raise UserError(f"'{path}' is not {ACCEPTED} (no config.json, state.json, final/ or checkpoints/ in it)")


def run_config(run_dir: Path | None, checkpoint: Path | None = None) -> DictConfig | None:
    """The config the run trained with: the checkpoint's own copy, else the run's `.hydra/config.yaml`."""
    for path in ([checkpoint / "config.yaml"] if checkpoint else []) + (
            [run_dir / ".hydra" / "config.yaml"] if run_dir else []):
        if path.is_file():
            try:
                return OmegaConf.load(path)
            except Exception as e:  # YAML or OmegaConf errors of a hand-edited file
                raise UserError(f"cannot read the run's config {path}: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return None


def load_trained(path: str | Path, device: torch.device, *, checked: bool = False) -> Trained:
    """The trained model at `path` (see `locate`), ready to evaluate: eval mode, frozen, adapter merged. A
    checkpoint's files are checked against its manifest first, unless `checked` says that was done."""
    kind, source, run_dir = locate(path)
    if kind == "hf":
        model, tokenizer = load_hf(source, device)
        return Trained(model, tokenizer, source, run_dir, run_config(run_dir))
    if not checked:
        check_checkpoint(source, run_dir)  # before a model is built for it
    cfg = run_config(run_dir, source)
    if cfg is None:
        raise UserError(f"checkpoint '{source}' has no config.yaml: it was not written by tidpo train")
    from .modeling import add_lora, load_policy, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model_cfg = cfg.model
    base = reference_dir(run_dir)
    if base is not None and cfg.model.lora.enabled:
        # LoRA over a model built from random weights: the frozen base is the one the run saved.
        model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(base), "tokenizer": cfg.model.tokenizer})
    model = load_policy(model_cfg, tokenizer)
    peft_model = add_lora(model, cfg.model.lora) if cfg.model.lora.enabled else None
    target = peft_model.get_base_model() if peft_model is not None else model
    engine_weights = read_engine_weights(source)  # a DeepSpeed checkpoint: shards merged on the CPU
    if engine_weights is None:
        _load_checkpoint_weights(target, source, run_dir)
    else:
        fill_weights(target, engine_weights, source)
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    return Trained(_frozen(model, device), tokenizer, source, run_dir, cfg)


def check_checkpoint(source: Path, run_dir: Path | None) -> None:
    """A checkpoint's files against the sizes and checksums its manifest lists (one written by an older tidpo has
    none: its weights are checked as they load): a truncated or changed file is a UserError naming it. What only a
    resumed run reads (the plain engine's optimizer, scheduler and RNG states) is left unread: a model is loaded
    from its weights alone. A DeepSpeed checkpoint's fp32 weights live in its optimizer shards, which are read."""
    problem = check_files(source, skip=RESUME_ONLY) if has_manifest(source) else None
    if problem is not None:
        raise UserError(f"checkpoint {source} cannot be read: {problem}; {_instead(source, run_dir)}")


def _load_checkpoint_weights(model: torch.nn.Module, source: Path, run_dir: Path | None) -> None:
    """`source/model.safetensors` into `model`. A checkpoint with a manifest was checked already; an older one
    can still be truncated or damaged (the file's header says so) or hold weights of another shape."""
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {source} has no model.safetensors (and no DeepSpeed shards): "
                        f"{_instead(source, run_dir)}")
    try:
        load_weights(model, weights)
    except SafetensorError as e:
        raise UserError(f"checkpoint {source} cannot be read: {weights.name} is truncated or damaged "
                        f"({_first_line(e)}); {_instead(source, run_dir)}") from None
    except RuntimeError as e:
        if not str(e).startswith("Error(s) in loading state_dict"):  # torch's and safetensors' words for it
            raise
        raise UserError(f"{weights} does not fit the model its config.yaml describes ({_first_line(e, 1)}): was "
                        "it copied from another run, or its config.yaml edited?") from None


def _instead(source: Path, run_dir: Path | None) -> str:
    """What to load instead of a damaged checkpoint: the next older checkpoint of its run (else the next newer
    one), or the run's final/ model."""
    found = list_checkpoints(run_dir) if run_dir is not None else []
    resolved = [p.resolve() for p in found]
    where = resolved.index(source.resolve()) if source.resolve() in resolved else None
    older = found[:where] if where is not None else []
    newer = found[where + 1:] if where is not None else []
    choices = [f"the older checkpoint {older[-1]}"] if older else [f"the checkpoint {newer[0]}"] if newer else []
    if run_dir is not None and (run_dir / "final" / "config.json").is_file():
        choices.append(f"the run's final model {run_dir / 'final'}")
    return ("pass " + " or ".join(choices) + " instead") if choices else \
        "pass another checkpoint, or train again from an intact one"


def _first_line(e: BaseException, index: int = 0, limit: int = 240) -> str:
    """Line `index` of an exception's message (else its first), cut to `limit` characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    line = (lines[index] if len(lines) > index else lines[0]) if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def reference_dir(run_dir: Path | None) -> Path | None:
    """`RUN/reference/`: the starting weights a run saved when it built its model from random weights."""
    if run_dir is not None and (run_dir / "reference" / "config.json").is_file():
        return run_dir / "reference"
    return None


def reference_source(trained: Trained) -> str | None:
    """Where the reference of `trained`'s run lives: its `model.reference`, else the run's saved starting weights,
    else the model it loaded."""
    given = OmegaConf.select(trained.cfg, "model.reference", default=None) if trained.cfg is not None else None
    if given is not None:
        return given
    saved = reference_dir(trained.run_dir)
    if saved is not None:
        return str(saved)
    if trained.cfg is not None:
        return OmegaConf.select(trained.cfg, "model.name_or_path", default=None)
    return None


def load_hf(model_dir: str | Path, device: torch.device, *, trust_remote_code: bool = False):
    """(model, tokenizer) from an HF directory or hub name, in its saved dtype, frozen, eval mode, on `device`.
    A weights file that is truncated or damaged, or weights that do not fill the model its config.json describes
    (missing or of another shape: the model would compute with random values), are a UserError naming them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per model is noise here
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with _held_load_report() as report:
            model, info = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype="auto", trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True)  # a mismatch is reported below, in one line
            _check_loaded(model_dir, info)
            report.release()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model and tokenizer from '{model_dir}': {_first_line(e)} "
                        "(it needs config.json, the weights and the tokenizer files, as RUN/final has)") from None
    except SafetensorError as e:
        raise UserError(f"cannot load the model in '{model_dir}': {damaged_weights(model_dir) or 'a weights file'} "
                        f"is truncated or damaged ({_first_line(e)}): {_rewrite_hint(model_dir)}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _frozen(model, device), tokenizer


def _check_loaded(model_dir: str | Path, info: dict) -> None:
    """Weights the model needs and the files lack, or hold in another shape: the model would use random ones."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    if not (mismatched or missing):
        return
    if mismatched:
        name, there, here = mismatched[0]
        example = f"{name} is {list(there)} in the weights, {list(here)} in config.json"
    else:
        example = f"{missing[0]} is not in the weights"
    counts = ", ".join(f"{len(keys)} weights {what}" for keys, what in ((missing, "missing"),
                                                                        (mismatched, "of another shape")) if keys)
    raise UserError(f"the weights in '{model_dir}' do not fit its config.json ({counts}, e.g. {example}): were "
                    "config.json and the weights copied from different models? Copy the directory again as a whole")


class _HeldRecords(logging.Filter):
    """Holds transformers' loading report back until the load is known to be good: a refused model ends in one
    line, not in a table of every missing key above it."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.records = logger, []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)
        self.records = []


@contextmanager
def _held_load_report() -> Iterator[_HeldRecords]:
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldRecords(logger)
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


def damaged_weights(model_dir: str | Path) -> Path | None:
    """The first safetensors file of an HF model directory whose header cannot be read or whose size falls short
    of what the header lists (a truncated copy); None when all open (or `model_dir` is a hub name)."""
    directory = Path(model_dir).expanduser()
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return None


def check_hf_weights(model_dir: Path) -> None:
    """A quick look, reading headers only, for a model another program loads (lm-eval): its weights are there and
    none is truncated or damaged."""
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise UserError(f"'{model_dir}' has config.json but no weights (model.safetensors): copy the model "
                        "directory again as a whole")
    damaged = damaged_weights(model_dir)
    if damaged is not None:
        raise UserError(f"cannot load the model in '{model_dir}': {damaged} is truncated or damaged: "
                        f"{_rewrite_hint(model_dir)}")


def _rewrite_hint(model_dir: str | Path) -> str:
    """How to get a damaged model directory back: a run's final/ from the run's newest checkpoint, else a copy."""
    directory = Path(model_dir).expanduser()
    checkpoints = list_checkpoints(directory.parent) if directory.name == "final" else []
    if checkpoints:
        return (f"write it anew from the run's newest checkpoint (tidpo export {checkpoints[-1]} {directory} "
                f"--overwrite), or pass that checkpoint instead")
    return "copy the model directory again from where it came from"


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.requires_grad_(False)  # nothing here trains; the importance pass needs the embeddings' gradient only
    return model.to(device).eval()
