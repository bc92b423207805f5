"""Writing to disk, complete or not at all: training checkpoints for exact resume, and HF model export.

A checkpoint is `checkpoints/step-N/`: it is written to a temporary sibling and renamed only when every
file is on disk, so a directory named `step-N` is always complete; a kill during the write leaves a
`.tmp` directory that resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import logging
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

from .disk import DiskError, fault_of, message as disk_message
from .errors import UserError
from .manifest import Layout, check_files, has_manifest, write_manifest

log = logging.getLogger("tidpo")

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_hf_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None,
                  option: str = "hydra.run.dir") -> Path:
    """An HF model directory (safetensors weights, config, generation config, tokenizer) at `out_dir`;
    `state_dict` (e.g. gathered from ZeRO-3 partitions) instead of the model's own weights when given.

    Written to a temporary sibling and renamed when complete, so `out_dir` is never half-written;
    an existing `out_dir` is replaced only after the new one is complete. A full disk is a `DiskError` whose fix
    names `option`, the setting that picks the place.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        _replace(tmp, out_dir)
    except Exception as e:  # a full disk: the partial copy goes, whatever was at out_dir stays
        fault = fault_of(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if fault is None:
            raise
        raise DiskError(disk_message("the model", getattr(e, "filename", None) or tmp, fault, option) +
                        f"; the partial copy was removed{', ' + str(out_dir) + ' is as it was' if out_dir.exists() else ''}"
                        ) from None
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
                    dist=None, layout: Layout | None = None) -> Path:
    """Write `checkpoints/step-N/` atomically; then drop all but the newest `keep_last` checkpoints.

    Every rank writes its own part (the engine's shards under DeepSpeed, its RNG streams) and the checksums of its
    share of the files; rank 0 makes the temporary directory, writes the loop state, config and `layout`, and
    renames it when all ranks are done. A write that fails on any rank (a full disk) stops every rank alike with
    a `DiskError`: the temporary directory is removed and the checkpoints already there are untouched.
    """
    from .distributed import Dist

    dist = dist or Dist()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"

    def begin() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir()

    def parts() -> None:
        engine.save(tmp)
        _pause_for_tests(state.step)
        plain, tensors = rng_state()
        save_file(tensors, str(tmp / f"rng-rank{dist.rank}.safetensors"))
        (tmp / f"rng-rank{dist.rank}.json").write_text(json.dumps(plain))
        if dist.main:
            (tmp / "state.json").write_text(json.dumps(state.__dict__))
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            if layout is not None:
                layout.write(tmp)

    def commit() -> None:
        _fsync_tree(tmp)
        _replace(tmp, final)
        if keep_last:  # only now that the new one is complete
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)

    _together(dist, tmp, begin if dist.main else None)
    _together(dist, tmp, parts)
    _together(dist, tmp, lambda: write_manifest(tmp, dist.rank, dist.world))
    _together(dist, tmp, commit if dist.main else None)
    return final


def _together(dist, tmp: Path, work) -> None:
    """Run this rank's `work` (None: nothing to do), then learn whether it failed on any rank: a collective every
    rank reaches, so one rank's full disk stops all of them at the same place instead of leaving them waiting."""
    problem = None
    try:
        if work is not None:
            work()
    except Exception as e:
        problem = e
    fault = fault_of(problem, tmp) if problem is not None else None  # asked before the cleanup frees space
    if not dist.max(int(problem is not None)):
        return
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    if problem is None:
        raise DiskError(f"cannot write checkpoint {tmp}: another process failed to write its part (its message "
                        "says why); the partial checkpoint was removed, the earlier ones are intact")
    if fault is None:
        raise problem
    where = getattr(problem, "filename", None) or tmp
    raise DiskError(disk_message("checkpoint", where, fault) + "; the partial checkpoint was removed, the "
                    "earlier ones are intact (resume from them once there is room)") from None


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
    """`resume`: auto (the newest complete checkpoint of this run dir, if any), never, or a checkpoint path;
    nothing is checked (see `choose_checkpoint`)."""
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


def choose_checkpoint(run_dir: Path, resume: str, layout: Layout, dist=None) -> Path | None:
    """The checkpoint to resume from, checked before anything is loaded: its files against their checksums, and
    its layout (engine, processes, parameter shapes) against this run's.

    With `resume=auto` an unreadable checkpoint is reported and set aside as `step-N.unreadable`, and the next
    older one is tried: its later steps are trained again. An explicit checkpoint that cannot be read stops the
    run; so does one that does not fit (another model or cluster shape), never passed over in silence.
    """
    from .distributed import Dist

    dist = dist or Dist()
    if resume == "auto":
        candidates = list(reversed(list_checkpoints(run_dir)))  # newest first
    else:
        found = find_resume_checkpoint(run_dir, resume)  # never: None; a path: checked to be a checkpoint
        candidates = [found] if found is not None else []
    if not candidates:
        return None
    unreadable: list[tuple[Path, str]] = []
    for path in candidates:
        problem = _readable(path, dist)
        if problem is not None:
            if resume != "auto":
                raise UserError(f"trainer.resume={resume}: checkpoint {path} cannot be read: {problem}; pass "
                                "another checkpoint, trainer.resume=auto (the newest readable one of the run) or "
                                "trainer.resume=never")
            unreadable.append((path, problem))
            log.warning("checkpoint %s cannot be read: %s", path, problem)
            continue
        _check_fits(path, layout)
        if unreadable:
            _set_aside([p for p, _ in unreadable], dist)
            newest = read_state(path).step
            log.warning("resuming from the older checkpoint %s instead: steps %d-%d are trained again (the "
                        "unreadable one%s kept as *.unreadable beside it)", path, newest + 1,
                        _step_of(unreadable[0][0]), "s are" if len(unreadable) > 1 else " is")
        elif not has_manifest(path):
            log.warning("checkpoint %s has no checksums (written by an older tidpo): resuming without checking its "
                        "files", path)
        return path
    raise UserError(f"no checkpoint of {run_dir} can be read: {len(unreadable)} tried, the newest "
                    f"({unreadable[0][0].name}): {unreadable[0][1]}; start again here with trainer.resume=never, "
                    "or train in another run dir (hydra.run.dir=...)")


def _readable(path: Path, dist) -> str | None:
    """What is wrong with `path`'s files (each rank checks its share; every rank learns whether any found a
    problem), or None."""
    problem = check_files(path, dist.rank, dist.world) if has_manifest(path) else None
    if problem is None and not (path / "state.json").is_file():
        problem = "state.json is missing"
    if dist.world > 1:
        if problem is not None and not dist.main:
            log.warning("rank %d: checkpoint %s: %s", dist.rank, path, problem)
        if dist.max(int(problem is not None)) and problem is None:
            problem = "a file failed its check on another rank (its message above names it)"
    return problem


def _check_fits(path: Path, here: Layout) -> None:
    try:
        there = Layout.read(path)
    except (ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path}: {path / 'layout.json'} cannot be read ({type(e).__name__})") from None
    differences = there.differences(here) if there is not None else []
    if not differences:
        return
    fix = ("resume it with the settings it was written with, start again here with trainer.resume=never, or train "
           "in another run dir (hydra.run.dir=...)")
    if there.world != here.world:
        fix = (f"resume with {there.world} processes (torchrun --nproc_per_node, or the SLURM job's --nodes and "
               f"--ntasks-per-node, as it was written), or carry its weights into a new run: tidpo export {path} "
               "OUT, then tidpo train model.name_or_path=OUT in another run dir (the optimizer starts afresh)")
    raise UserError(f"checkpoint {path} does not fit this run: {'; '.join(differences)}; {fix}")


def _set_aside(paths: list[Path], dist) -> None:
    """Rename unreadable checkpoints to `step-N.unreadable`: kept for a look, ignored by resume and keep_last."""
    if dist.main:
        for path in paths:
            aside = path.with_name(path.name + ".unreadable")
            if aside.exists():
                shutil.rmtree(aside)
            path.rename(aside)
    dist.barrier()


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


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
