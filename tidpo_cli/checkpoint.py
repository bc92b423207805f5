"""Writing to disk, complete or not at all: training checkpoints for exact resume, and HF model export.

A checkpoint is `checkpoints/step-N/`: it is written to a temporary sibling and renamed only when every
file is on disk, so a directory named `step-N` is always complete; a kill during the write leaves a
`.tmp` directory that resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_hf_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> Path:
    """An HF model directory (safetensors weights, config, generation config, tokenizer) at `out_dir`;
    `state_dict` (e.g. gathered from ZeRO-3 partitions) instead of the model's own weights when given.

    Written to a temporary sibling and renamed when complete, so `out_dir` is never half-written;
    an existing `out_dir` is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _replace(tmp, out_dir)
    return out_dir


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in path.iterdir():
        if item.is_dir():
            _fsync_tree(item)
            continue
        with open(item, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""
    step: int                 # optimizer steps done
    epoch: int                # data stream position: epoch ...
    position: int             # ... and pairs consumed in it
    bad_steps: int = 0        # non-finite steps in a row
    skipped_steps: int = 0    # non-finite steps in all
    anchor_window: int | None = None  # loss.anchor.refresh_every=auto: the window picked (None: not yet) ...
    anchor_timings: dict = field(default_factory=dict)  # ... and the probe's sampling times (refresh.py)
    share_prompt: bool | None = None  # the batch layout trained with (trainer.share_prompt=auto times it once);
                                      #   None: a checkpoint written before it was kept


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """The python, numpy and torch (CPU and CUDA) generator states: a JSON part and a tensor part."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(state), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = s
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, state: TrainState, engine, cfg: DictConfig, keep_last: int | None,
                    dist=None) -> Path:
    """Write `checkpoints/step-N/` atomically; then drop all but the newest `keep_last` checkpoints.

    Every rank writes its own part (the engine's shards under DeepSpeed, its RNG streams); rank 0 makes the
    temporary directory, writes the loop state and config, and renames it when all ranks are done.
    """
    from .distributed import Dist

    dist = dist or Dist()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir()
    dist.barrier()
    engine.save(tmp)
    _pause_for_tests(state.step)
    plain, tensors = rng_state()
    save_file(tensors, str(tmp / f"rng-rank{dist.rank}.safetensors"))
    (tmp / f"rng-rank{dist.rank}.json").write_text(json.dumps(plain))
    dist.barrier()
    if dist.main:
        (tmp / "state.json").write_text(json.dumps(state.__dict__))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        _fsync_tree(tmp)
        _replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def _pause_for_tests(step: int) -> None:
    # Fault injection for the test that kills a run in the middle of a checkpoint write: "STEP:SECONDS".
    pause = os.environ.get("TIDPO_TEST_PAUSE_IN_CHECKPOINT")
    if pause and int(pause.split(":")[0]) == step:
        time.sleep(float(pause.split(":")[1]))


TRAINABLE_ONLY = {"tidpo": "trainable-only"}  # safetensors metadata of a checkpoint without the frozen base


def save_weights(model, path: Path) -> None:
    """The model's weights as safetensors; with frozen parameters (LoRA) only the trainable ones: the frozen
    base comes back from where it was loaded, and an 8B base is not copied into every checkpoint."""
    if all(p.requires_grad for p in model.parameters()):
        save_model(model, str(path))
    else:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(path), metadata=TRAINABLE_ONLY)


def load_weights(model, path: Path) -> None:
    """Inverse of `save_weights`: every weight the file holds goes into `model`, and it must hold every
    trainable one."""
    with safe_open(str(path), framework="pt") as f:
        trainable_only = (f.metadata() or {}).get("tidpo") == TRAINABLE_ONLY["tidpo"]
    if not trainable_only:
        load_model(model, str(path))
        return
    fill_weights(model, load_file(str(path)), path)


def fill_weights(model, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Put `tensors` into `model`; they must name every trainable weight of it and nothing it lacks."""
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - tensors.keys()
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if missing or unexpected:
        raise UserError(f"{where} does not fit this model ({len(missing)} trainable weights missing, "
                        f"{len(unexpected)} unknown, e.g. {sorted(missing or unexpected)[0]}): was it saved "
                        "with other model settings (model.lora, model.config)?")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` directory is an interrupted write)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`resume`: auto (the newest complete checkpoint of this run dir, if any), never, or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"trainer.resume={resume}: not a checkpoint directory (no state.json there); "
                        f"give a checkpoints/step-N directory, or auto / never")
    return path


def load_checkpoint(path: Path, engine, dist=None) -> TrainState:
    """Restore the engine (model, optimizer, scheduler), this rank's RNG streams, and the loop's state."""
    from .distributed import Dist

    rank = (dist or Dist()).rank
    engine.load(path)
    if not (path / f"rng-rank{rank}.json").is_file():
        raise UserError(f"{path} has no RNG state for rank {rank}: it was written by fewer processes; resume "
                        "with the number of processes that wrote it")
    set_rng_state(json.loads((path / f"rng-rank{rank}.json").read_text()),
                  load_file(str(path / f"rng-rank{rank}.safetensors")))
    return read_state(path)


def read_state(path: Path) -> TrainState:
    """The loop state a checkpoint holds, without loading anything else."""
    return TrainState(**json.loads((path / "state.json").read_text()))
