#!/usr/bin/env python3
"""What sampling the anchors costs on this CPU, one process, one thread: tidpo's `anchors.generate` on the bench
model of scripts/bench/distributed.py (random init from seed 0, eager, dynamic KV cache) for 4 and for 8 rows, with
torch's `F.linear` and with the one ZeRO-3 puts in its place for the whole process (`memory_efficient_linear`);
then, with torch's, what the per-row draw (anchors.RowSeededDraw) costs: the tidpo preset's warpers (temperature
0.8, top-k 50, top-p 0.95) and the draw's noise hashed for a block of tokens at once (as it runs) or one token at a
time (its BLOCK set to one token's values), and no warper and no draw at all (HF's greedy choice: a floor, not a
sample).

    python scripts/bench/sampling.py                 # writes bench-sampling.json, prints two tables

Contexts of 40 random ids; every row generates BENCH_TOKENS (21) tokens (the EOS id given is outside the
vocabulary, so no row stops early). Each figure is the median of BENCH_REPEATS (7) generations after one untimed
one, the settings taken in turn BENCH_ROUNDS (3) times (this shared machine drifts); `per token` is that figure
over BENCH_TOKENS.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tidpo_cli from this checkout when not installed

import torch  # noqa: E402

from distributed import MODEL_CONFIG  # noqa: E402  (the bench model)
from transformers import LogitsProcessorList  # noqa: E402

from tidpo_cli import anchors  # noqa: E402
from tidpo_cli.anchors import RowSeededDraw, generate  # noqa: E402
from tidpo_cli.benchmark import versions  # noqa: E402
from tidpo_cli.modeling import build_tiny_llama  # noqa: E402
from tidpo_cli.tokenizer import build_byte_tokenizer  # noqa: E402


def linears() -> dict:
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    return {"torch": torch.nn.functional.linear, "zero3": zero3_linear_wrap}


PRESET = dict(temperature=0.8, top_k=50, top_p=0.95)  # conf/loss/tidpo.yaml's anchor warpers
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0)


def timed(model, rows: int, tokens: int, repeats: int, context=nullcontext, warpers=PLAIN, **options) -> float:
    """The median seconds of `repeats` generations of `tokens` tokens for `rows` rows, after an untimed one, each
    inside a `context()` of its own (an autocast); `options` go to `anchors.generate` (compile=True)."""
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    contexts = [torch.randint(3, vocab, (40,)) for _ in range(rows)]
    times = []
    for i in range(repeats + 1):
        began = time.perf_counter()
        with context():
            out = generate(model, contexts, pad_id=0, eos_id=vocab, max_new_tokens=tokens, seed=i, **warpers,
                           **options)
        times.append(time.perf_counter() - began)
        assert all(len(o) == tokens for o in out), "a row stopped early"
    return statistics.median(times[1:])


def main() -> None:
    tokens = int(os.environ.get("BENCH_TOKENS", "21"))
    repeats = int(os.environ.get("BENCH_REPEATS", "7"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_tiny_llama(MODEL_CONFIG, build_byte_tokenizer())
    options = linears()
    cells: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, linear in options.items():
            with patch.object(torch.nn.functional, "linear", linear):
                for rows in (4, 8):
                    cells.setdefault(f"{name} {rows}", []).append(timed(model, rows, tokens, repeats))
    draws = {}
    for _ in range(rounds):
        for rows in (4, 8):
            for name, block in (("block", RowSeededDraw.BLOCK), ("token", rows * model.config.vocab_size)):
                with patch.object(RowSeededDraw, "BLOCK", block):
                    draws.setdefault(f"{name} {rows}", []).append(timed(model, rows, tokens, repeats, warpers=PRESET))
            with patch.object(anchors, "sampling_processors", lambda *args: LogitsProcessorList()):
                draws.setdefault(f"none {rows}", []).append(timed(model, rows, tokens, repeats))
    result = {"settings": {"model": MODEL_CONFIG, "vocab": model.config.vocab_size, "tokens": tokens, "context": 40, "repeats": repeats,
                           "rounds": rounds, "threads": 1, "machine": platform.processor() or platform.machine(),
                           "versions": versions(("torch", "transformers", "deepspeed"))},
              "seconds": {k: statistics.median(v) for k, v in cells.items()}, "rounds_s": cells,
              "draw": {"warpers": PRESET, "seconds": {k: statistics.median(v) for k, v in draws.items()},
                       "rounds_s": draws}}
    Path(os.environ.get("BENCH_OUT", "bench-sampling.json")).write_text(json.dumps(result, indent=2) + "\n")
    print("| `F.linear` | rows | generation (s) | per token (ms) |\n|---|---:|---:|---:|")
    for key, seconds in result["seconds"].items():
        name, rows = key.split()
        print(f"| {name} | {rows} | {seconds:.3f} | {1000 * seconds / tokens:.1f} |")
    labels = {"block": "preset's, noise a block at a time", "token": "preset's, noise a token at a time",
              "none": "none (greedy)"}
    print("\n| warpers and draw | rows | generation (s) | per token (ms) |\n|---|---:|---:|---:|")
    for key, seconds in result["draw"]["seconds"].items():
        name, rows = key.split()
        print(f"| {labels[name]} | {rows} | {seconds:.3f} | {1000 * seconds / tokens:.1f} |")


if __name__ == "__main__":
    main()
