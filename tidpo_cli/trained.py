"""What a run produced, found and loaded: a run directory, its `final/` model, any `checkpoints/step-N/`, or
any HF model directory; and the reference model that run trained against.

`tidpo eval`, `tidpo explain` and `tidpo export` all start here, so they accept the same paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import fill_weights, list_checkpoints, load_weights
from .distributed import read_engine_weights
from .errors import UserError

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


def load_trained(path: str | Path, device: torch.device) -> Trained:
    """The trained model at `path` (see `locate`), ready to evaluate: eval mode, frozen, adapter merged."""
    kind, source, run_dir = locate(path)
    if kind == "hf":
        model, tokenizer = load_hf(source, device)
        return Trained(model, tokenizer, source, run_dir, run_config(run_dir))
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
        load_weights(target, source / "model.safetensors")
    else:
        fill_weights(target, engine_weights, source)
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    return Trained(_frozen(model, device), tokenizer, source, run_dir, cfg)


def reference_dir(run_dir: Path | None) -> Path | None:
    """`RUN/reference/`: the starting weights a run saved when it built its model from random weights."""
    if run_dir is not None and (run_dir / "reference" / "config.json").is_file():
        return run_dir / "reference"
    return None


def reference_source(trained: Trained) -> str | None:
    """Where the reference of `trained`'s run lives: the run's saved starting weights, or the model it loaded."""
    saved = reference_dir(trained.run_dir)
    if saved is not None:
        return str(saved)
    if trained.cfg is not None:
        return OmegaConf.select(trained.cfg, "model.name_or_path", default=None)
    return None


def load_hf(model_dir: str | Path, device: torch.device, *, trust_remote_code: bool = False):
    """(model, tokenizer) from an HF directory or hub name, in its saved dtype, frozen, eval mode, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per model is noise here
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load a model and tokenizer from '{model_dir}': {first} "
                        "(it needs config.json, the weights and the tokenizer files, as RUN/final has)") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _frozen(model, device), tokenizer


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.requires_grad_(False)  # nothing here trains; the importance pass needs the embeddings' gradient only
    return model.to(device).eval()
