"""`trainer.reference_cache`: the reference model's log-probs of the data's responses, computed once, read from disk.

A loss that reads nothing of the reference but the log-probs of the pairs' response tokens (the DPO family, IPO,
KTO's pair terms, TI-DPO's pair terms) gets the same numbers from any job that runs the same reference on the same
token ids with the same settings. So a sweep computes them once: before training, every sequence of the data the
cache lacks is scored in one no-grad pass and written; from then on batches carry them (`reference_logps`) and the
objective runs the reference only for what the cache cannot hold (anchors, KTO's mismatched rows).

On disk, one folder per key (a hash of `key.json`: the reference's weights and config, every setting that changes
its log-probs, and the torch and transformers releases); inside it a sequence is found by a hash of its token ids
and where its response starts:

  <cache>/<key>/key.json             what the key is made of
  <cache>/<key>/lock                 held (a POSIX lock, which NFS honours) by the job filling the folder
  <cache>/<key>/<shard>.values.npy   float32 log-probs of the response tokens, one sequence after another
  <cache>/<key>/<shard>.index.npy    each sequence's hash, offset and length: written last, so a shard exists
                                     once its index does

Every process writes shards of its own (one writer per shard), each file under a temporary name and then renamed
into place: a reader never sees half a shard, and jobs filling one folder at once cannot corrupt it. The lock only
saves work (the second job waits and reads instead of computing the same rows).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import xxhash

from .data.collate import collate
from .data.examples import TokenizedExample
from .outputs import write_files
from .distributed import Dist
from .errors import UserError
from .objective import forward

log = logging.getLogger("tidpo")

FORMAT = 1  # bump when what is stored, or how a sequence is hashed, changes
INDEX = np.dtype([("high", "<u8"), ("low", "<u8"), ("offset", "<i8"), ("length", "<i4")])  # key = high:low

Batch = dict[str, torch.Tensor]
WRITER = ("the reference cache", "tidpo train", "trainer.reference_cache")  # outputs.write_files: what, prog, flag


def cache_dir(setting: str, run_dir: Path) -> Path | None:
    """Where `trainer.reference_cache` puts the cache: None for `off`; `auto`: `reference_cache/` in the sweep's
    directory under Hydra multirun (every job of the sweep shares it), else in the run directory (a rerun, a
    resume and every epoch share it); any other value is a directory."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    return (sweep_dir() or run_dir) / "reference_cache"


def sweep_dir() -> Path | None:
    """The Hydra multirun sweep directory this job belongs to, or None outside a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's dtype, shape and bytes, in order (LoRA adapter weights left out, so a base
    model hashes the same with or without adapters injected). The hash reads each tensor's memory in place (a
    NumPy view of its bytes), so a weight on the CPU is not copied; one on a GPU is copied to the CPU, one
    tensor at a time."""
    digest = xxhash.xxh3_128()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# Config fields that say where a model came from or what a forward returns, not what it computes: left out of
# `config_fingerprint`, so the same model loaded from another path shares a folder (`save_pretrained` also fills in
# `architectures`). The dtype of the weights is in their own hash.
METADATA_FIELDS = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
                   "output_attentions", "output_hidden_states", "return_dict")


def config_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's config (`config.to_dict()`, METADATA_FIELDS left out): what the weights alone do not
    say, e.g. RoPE's base and scaling, the norm's epsilon, the activation."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in METADATA_FIELDS}
    return xxhash.xxh3_128(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """The parts of the cache key that come from the reference model itself."""
    return {"weights": weights_fingerprint(model), "config": config_fingerprint(model)}


def cache_key(cfg, fingerprint: dict[str, str], device: torch.device) -> dict:
    """Everything the reference's log-probs of given token ids depend on: the model (`model_fingerprint`), the
    settings of its forward, and the releases of torch and transformers that run it."""
    import transformers

    return {"format": FORMAT, **fingerprint, "dtype": cfg.model.dtype, "precision": cfg.trainer.precision,
            "deepspeed": bool(cfg.deepspeed.enabled), "attn_implementation": cfg.model.attn_implementation,
            "device": device.type, "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
            "packages": {"torch": torch.__version__, "transformers": transformers.__version__}}


def sequence_key(ids: Sequence[int] | np.ndarray, start: int) -> int:
    """The 128-bit hash a sequence is stored under: of its token ids and the position its response starts at."""
    digest = xxhash.xxh3_128(np.asarray(ids, dtype=np.int64).tobytes())
    digest.update(int(start).to_bytes(8, "little"))
    return digest.intdigest()


def example_sequences(example) -> list[tuple[list[int], int]]:
    """(token ids, response start) of each sequence a pair (chosen, rejected) or unpaired example puts in a batch."""
    if isinstance(example, TokenizedExample):
        return [(example.prompt_ids + example.completion_ids, len(example.prompt_ids))]
    start = len(example.prompt_ids)
    return [(example.prompt_ids + example.chosen_ids, start), (example.prompt_ids + example.rejected_ids, start)]


def batch_keys(batch: Batch) -> list[int]:
    """`sequence_key` of each row of a collated (right-padded) batch."""
    ids, lengths = batch["input_ids"].cpu().numpy(), batch["attention_mask"].sum(-1).tolist()
    return [sequence_key(ids[row, :length], start)
            for row, (length, start) in enumerate(zip(lengths, batch["prompt_lengths"].tolist()))]


class ReferenceCache:
    """One key's folder: what it holds (the shards' indexes in memory, their values memory-mapped), lookups and
    writes."""

    def __init__(self, root: Path, key: dict) -> None:
        text = json.dumps(key, sort_keys=True, indent=1)
        self.folder = Path(root) / xxhash.xxh3_128(text.encode()).hexdigest()
        if not (self.folder / "key.json").exists():  # written to a temporary name, then renamed (the folder made)
            write_files(self.folder, {"key.json": lambda path: path.write_text(text)}, *WRITER)
        if json.loads((self.folder / "key.json").read_text()) != json.loads(text):
            raise UserError(f"the reference cache folder {self.folder} holds another key.json than its name says: "
                            "it was changed by hand or copied; remove the folder (it is refilled)")
        self.entries: dict[int, tuple[int, int, int]] = {}  # sequence hash -> (shard, offset, length)
        self.values: list[np.ndarray] = []
        self.loaded: set[str] = set()
        self.reload()

    def reload(self) -> None:
        """Read the shards written since the last look (by this job or any other)."""
        for index_file in sorted(self.folder.glob("*.index.npy")):
            name = index_file.name.removesuffix(".index.npy")
            if name in self.loaded:
                continue
            try:
                index = np.load(index_file)
                values = np.load(self.folder / f"{name}.values.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                log.warning("reference cache: shard %s unreadable (%s): ignored", index_file, e)
                continue
            if index.dtype != INDEX or (len(index) and int(index["offset"][-1] + index["length"][-1]) != len(values)):
                log.warning("reference cache: shard %s does not match its values: ignored", index_file)
                continue
            shard = len(self.values)
            self.values.append(values)
            self.loaded.add(name)
            for high, low, offset, length in index.tolist():
                self.entries.setdefault(high << 64 | low, (shard, offset, length))

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def lookup(self, key: int) -> np.ndarray:
        shard, offset, length = self.entries[key]
        return self.values[shard][offset:offset + length]

    def attach(self, batch: Batch) -> Batch:
        """`batch` with `reference_logps` [rows, T] float32: each row's cached log-probs at its response positions
        (aligned with `labels`), 0 elsewhere. Every row must be in the cache (`fill` put the whole data there)."""
        out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for row, (key, start) in enumerate(zip(batch_keys(batch), batch["prompt_lengths"].tolist())):
            if key not in self.entries:
                raise RuntimeError(f"reference cache {self.folder}: a batch row is not in it (row {row})")
            values = self.lookup(key)
            out[row, start:start + len(values)] = torch.from_numpy(np.array(values))
        return {**batch, "reference_logps": out}

    def write(self, entries: list[tuple[int, np.ndarray]], writer: str) -> None:
        """Add one shard holding `entries` (sequence hash, log-probs)."""
        if not entries:
            return
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{writer}"
        values = np.concatenate([v.astype(np.float32) for _, v in entries])
        lengths = np.array([len(v) for _, v in entries], dtype=np.int64)
        index = np.zeros(len(entries), dtype=INDEX)
        index["high"] = [k >> 64 for k, _ in entries]
        index["low"] = [k & (1 << 64) - 1 for k, _ in entries]
        index["length"] = lengths
        index["offset"] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        write_files(self.folder, {f"{name}.values.npy": lambda path: np.save(path, values),
                                  f"{name}.index.npy": lambda path: np.save(path, index)},  # renamed last
                    *WRITER)

    @contextmanager
    def locked(self, dist: Dist) -> Iterator[None]:
        """Held by rank 0 of one job at a time (other jobs wait here), every rank of the job inside together."""
        handle = open(self.folder / "lock", "a+") if dist.main else nullcontext()
        with handle:
            if dist.main:
                fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                dist.barrier()
                yield
                dist.barrier()
            finally:
                if dist.main:
                    fcntl.lockf(handle, fcntl.LOCK_UN)


@torch.no_grad()
def fill(cache: ReferenceCache, reference, examples: Iterable, *, batch_size: int, pad_id: int,
         share_prompt: bool, device: torch.device, autocast, dist: Dist) -> tuple[int, int]:
    """Score every sequence of `examples` the cache lacks with `reference` and write them; (sequences found,
    sequences computed), over every rank. The forward is the objective's, so the numbers are what a live reference
    forward gives (up to float rounding: other batches, other padding). Rank r scores every world-th missing example and writes its own shard; every rank runs the same
    number of forwards (under ZeRO-3 each is a collective)."""
    examples = list(examples)
    with cache.locked(dist):
        cache.reload()  # what other jobs wrote while this one waited for the lock
        keys = [[sequence_key(*s) for s in example_sequences(e)] for e in examples]
        missing = [e for e, ks in zip(examples, keys) if any(k not in cache for k in ks)]
        found = sum(len(ks) for ks in keys if all(k in cache for k in ks))
        if dist.max(len(missing)) == 0:
            return found, 0
        mine = missing[dist.rank::dist.world]
        chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)] or [missing[:1]]
        entries: list[tuple[int, np.ndarray]] = []
        for index in range(dist.max(len(chunks))):
            batch = collate(chunks[min(index, len(chunks) - 1)], pad_id, share_prompt=share_prompt)
            with autocast():
                _, logps, _ = forward(reference, {k: v.to(device) for k, v in batch.items()})
            if mine and index < len(chunks):
                logps = logps.float().cpu().numpy()
                for row, (key, start, length) in enumerate(zip(batch_keys(batch), batch["prompt_lengths"].tolist(),
                                                              batch["attention_mask"].sum(-1).tolist())):
                    entries.append((key, logps[row, start:length]))
        cache.write(entries, writer=f"rank{dist.rank}")
    cache.reload()
    computed = int(dist.sum([len({k for k, _ in entries})])[0])
    return found, computed
