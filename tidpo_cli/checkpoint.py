"""Writing models to disk: complete or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path


def save_hf_model(model, tokenizer, out_dir: Path) -> Path:
    """An HF model directory (safetensors weights, config, generation config, tokenizer) at `out_dir`.

    Written to a temporary sibling and renamed when complete, so `out_dir` is never half-written;
    an existing `out_dir` is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir
