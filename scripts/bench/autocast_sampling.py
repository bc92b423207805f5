#!/usr/bin/env python3
"""What sampling the anchors under bf16 autocast (`trainer.precision=bf16` without DeepSpeed: fp32 weights) costs
on this CPU, one process, one thread: eager (autocast's cache casts each weight once a generation), and compiled
(`loss.anchor.compile=true`) with the Linear weights' casts held by tidpo's twin (`twin.autocast_weights`) and
without it, as before the twin (the compiled step then casts every weight for every token).

    python scripts/bench/autocast_sampling.py        # writes bench-autocast-sampling.json, prints a table

Two Llamas built from config, random init from seed 0, byte-level vocabulary: the bench model of
scripts/bench/distributed.py (hidden 256, 4 layers: 3.3 M parameters) and a wider one (hidden 1024,
intermediate 2816, 4 layers, 8 heads: 51.9 M). 4 rows of 40-token contexts, BENCH_TOKENS (21) tokens each (as
scripts/bench/sampling.py: the EOS id is outside the vocabulary). Each figure is the median of BENCH_REPEATS (5)
generations after an untimed one (which pays the compile), each under an autocast of its own as in training, the
settings taken in turn BENCH_ROUNDS (2) times; `same tokens` says whether the compiled generation of seed 0 drew
the same tokens with and without the twin. BENCH_MODELS (bench,wide) picks the models, BENCH_OUT the JSON's path.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tidpo_cli from this checkout when not installed

import torch  # noqa: E402

from distributed import MODEL_CONFIG  # noqa: E402  (the bench model)
from sampling import timed  # noqa: E402
from trl_vs_tidpo import machine  # noqa: E402
from tidpo_cli import anchors  # noqa: E402
from tidpo_cli.benchmark import versions  # noqa: E402
from tidpo_cli.modeling import build_tiny_llama  # noqa: E402
from tidpo_cli.tokenizer import build_byte_tokenizer  # noqa: E402

MODELS = {"bench": MODEL_CONFIG,
          "wide": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8)}
ROWS = 4


def bf16():
    """Autocast entered anew for every generation, as the trainer does for every step's: eager autocast's cache of
    the weights' casts lives as long as the outermost autocast block, and a step's weights are new."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


# path -> (compile, the weights' casts)
PATHS = {"eager": (False, anchors.autocast_weights),
         "compiled, casts held": (True, anchors.autocast_weights),
         "compiled, cast every token": (True, lambda model, dtype: nullcontext(model))}


def tokens_of(model, tokens: int, compile: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    contexts = [torch.randint(3, model.config.vocab_size, (40,)) for _ in range(ROWS)]
    return anchors.generate(model, contexts, pad_id=0, eos_id=model.config.vocab_size, max_new_tokens=tokens,
                            temperature=1.0, top_k=0, top_p=1.0, seed=0, compile=compile)


def main() -> None:
    tokens = int(os.environ.get("BENCH_TOKENS", "21"))
    repeats = int(os.environ.get("BENCH_REPEATS", "5"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    models = {name: MODELS[name] for name in os.environ.get("BENCH_MODELS", ",".join(MODELS)).split(",")}
    torch.set_num_threads(1)
    cells: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    same: dict[str, bool] = {}
    parameters = {}
    try:
        for name, config in models.items():
            torch.manual_seed(0)
            model = build_tiny_llama(config, build_byte_tokenizer())
            parameters[name] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
            drawn = {}
            for path, (compile, weights) in PATHS.items():
                anchors.autocast_weights = weights
                began = time.perf_counter()
                with bf16():
                    drawn[path] = tokens_of(model, tokens, compile)  # pays the compile
                first[f"{name}|{path}"] = time.perf_counter() - began
            same[name] = all(torch.equal(a, b) for a, b in zip(drawn["compiled, casts held"],
                                                                drawn["compiled, cast every token"]))
            for _ in range(rounds):
                for path, (compile, weights) in PATHS.items():
                    anchors.autocast_weights = weights
                    cells.setdefault(f"{name}|{path}", []).append(
                        timed(model, ROWS, tokens, repeats, context=bf16, compile=compile))
    finally:
        anchors.autocast_weights = PATHS["eager"][1]
    seconds = {k: statistics.median(v) for k, v in cells.items()}
    result = {"settings": {"models": models, "parameters_m": parameters, "rows": ROWS, "tokens": tokens, "context": 40,
                           "repeats": repeats, "rounds": rounds, "threads": 1, "autocast": "cpu bfloat16",
                           "machine": machine(),
                           "versions": versions(("torch", "transformers"))},
              "seconds": seconds, "rounds_s": cells, "first_generation_s": first, "same_tokens": same}
    Path(os.environ.get("BENCH_OUT", "bench-autocast-sampling.json")).write_text(json.dumps(result, indent=2) + "\n")
    print("| model | sampling | generation (s) | per token (ms) | first generation (s) |\n|---|---|---:|---:|---:|")
    for key, s in seconds.items():
        name, path = key.split("|")
        print(f"| {name} ({parameters[name]} M) | {path} | {s:.3f} | {1000 * s / tokens:.2f} | {first[key]:.1f} |")
    print("compiled, the same tokens with and without the twin: "
          + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in same.items()))


if __name__ == "__main__":
    main()
