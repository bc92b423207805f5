"""`tidpo export SOURCE OUT`: a trained model as a plain HF model directory (safetensors, config, tokenizer).

SOURCE is anything `trained.locate` accepts: a run directory, RUN/final, a checkpoint, an HF directory.
A LoRA run's adapter is merged into its base, so `AutoModelForCausalLM.from_pretrained(OUT)` needs no PEFT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from .checkpoint import save_hf_model
from .errors import CommandLineParser, UserError
from .modeling import DTYPES
from .outputs import made_dir, probe_writable
from .trained import load_trained


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="tidpo export",
                     description="Write a trained model as an HF model directory (LoRA merged): safetensors "
                                 "weights, config.json, generation config, tokenizer.")
    parser.add_argument("source", metavar="SOURCE", help="run directory, RUN/checkpoints/step-N, or HF model directory")
    parser.add_argument("out", metavar="OUT", help="the directory to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="cast the weights (default: as trained)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    return parser


def export_main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT '{out}' is a file: give a directory path")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"OUT '{out}' already holds files: pick a new directory, or add --overwrite to replace it")
    probe_writable(out, "OUT")  # a read-only or full disk stops here, before the model loads
    hf_logging.disable_progress_bar()  # no weight-writing bar for a one-file copy
    trained = load_trained(args.source, torch.device("cpu"))
    model = trained.model.to(DTYPES[args.dtype]) if args.dtype else trained.model
    with made_dir(out.parent, "the model", "OUT"):  # parents made for OUT go again when the write fails
        save_hf_model(model, trained.tokenizer, out, option="OUT")  # OUT.tmp, renamed when complete; removed on a full disk
    print(f"exported {trained.source} -> {out}")
    print(f'load it: AutoModelForCausalLM.from_pretrained("{out}") (and AutoTokenizer the same way)')
