#!/usr/bin/env python3
"""What hashing the reference's weights costs each rank when `trainer.reference_cache` is on (its key,
`reference_cache.weights_fingerprint`): on a Llama built from config (random init from seed 0, byte-level
tokenizer), on this machine's CPU, the function as it is (XXH3-128 reading each tensor's bytes in place) against
the same hash over a copy of each tensor's bytes (`.numpy().tobytes()`, what it did before), with the peak
resident memory each adds.

    python scripts/bench/fingerprint.py        # writes bench-fingerprint.json, prints a table

BENCH_MODEL ("key=value,..." LlamaConfig overrides; default hidden 2048, 16 layers: 823 M parameters with the
byte-level vocabulary), BENCH_DTYPE (bfloat16), BENCH_ROUNDS (3: the two ways in turn, each figure the median),
BENCH_OUT. Both digests are checked to be equal.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tidpo_cli from this checkout when not installed

import psutil  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402

from tidpo_cli.benchmark import versions  # noqa: E402
from tidpo_cli.modeling import build_tiny_llama  # noqa: E402
from tidpo_cli.reference_cache import weights_fingerprint  # noqa: E402
from tidpo_cli.tokenizer import build_byte_tokenizer  # noqa: E402
from trl_vs_tidpo import parse_model_overrides  # noqa: E402  (the bench drivers' BENCH_MODEL)

MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16)


class Copying:
    """An XXH3-128 that copies what it is given into a `bytes` object first: with it, `weights_fingerprint` makes
    the copy of each tensor's bytes it made before it read their memory in place (`.numpy().tobytes()`)."""

    def __init__(self) -> None:
        self.digest = XXH3_128()

    def update(self, data) -> None:
        self.digest.update(bytes(data))

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


XXH3_128 = xxhash.xxh3_128


def copied(model: torch.nn.Module) -> str:
    with patch.object(xxhash, "xxh3_128", Copying):
        return weights_fingerprint(model)


def main() -> None:
    config = {**MODEL, **parse_model_overrides(os.environ.get("BENCH_MODEL", ""))}
    dtype = getattr(torch, os.environ.get("BENCH_DTYPE", "bfloat16"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    torch.manual_seed(0)
    model = build_tiny_llama(config, build_byte_tokenizer(), dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    process = psutil.Process()
    ways = {"in place": weights_fingerprint, "copied": copied}
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    digests = {}
    for _ in range(rounds):
        for name, way in ways.items():
            began = time.perf_counter()
            digests[name] = way(model)
            seconds[name].append(time.perf_counter() - began)
    assert len(set(digests.values())) == 1, digests
    result = {"settings": {"model": config, "dtype": str(dtype), "weights_gb": size / 1e9, "rounds": rounds,
                           "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
                           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "versions": versions(("torch", "xxhash"))},
              "seconds": {k: statistics.median(v) for k, v in seconds.items()}, "rounds_s": seconds,
              "peak_rss_gb": process.memory_info().rss / 1e9, "digest": digests["in place"]}
    Path(os.environ.get("BENCH_OUT", "bench-fingerprint.json")).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['settings']['parameters_m']:.0f} M parameters, {size / 1e9:.2f} GB in {dtype}")
    print("| hash | seconds | GB/s |\n|---|---:|---:|")
    for name, s in result["seconds"].items():
        print(f"| {name} | {s:.2f} | {size / 1e9 / s:.1f} |")


if __name__ == "__main__":
    main()
