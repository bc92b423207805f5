"""Anchor responses for the triplet term (METHOD §3): sampled online from the current policy, no grad."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from omegaconf import DictConfig
from transformers import (CompileConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .distributed import generation_model, zero3_engine
from .losses import IGNORE_INDEX
from .packing import pack_pairs
from .twin import autocast_dtype, autocast_weights

Batch = dict[str, torch.Tensor]


def uses_anchors(loss_cfg: DictConfig) -> bool:
    """Whether this loss samples anchors: a pairwise loss with TI-DPO's triplet term (gamma > 0)."""
    return loss_cfg.name != "sft" and bool(loss_cfg.gamma)


def anchor_contexts(batch: Batch, source: str, prefix_fraction: float) -> list[torch.Tensor]:
    """What each anchor is generated from, one 1-D id tensor per pair: the prompt (`source: prompt`), or
    the prompt and the first `prefix_fraction` of the chosen response (`source: chosen_prefix`).

    `batch` is a collated preference batch: chosen rows first, `prompt_lengths` per row.
    """
    pairs = batch["input_ids"].shape[0] // 2
    contexts = []
    for i in range(pairs):
        start = int(batch["prompt_lengths"][i])
        end = start
        if source == "chosen_prefix":
            response = int((batch["labels"][i] != IGNORE_INDEX).sum())
            end = start + int(prefix_fraction * response)
        elif source != "prompt":
            raise ValueError(f"anchor.source must be prompt or chosen_prefix, got {source!r}")
        contexts.append(batch["input_ids"][i, :end])
    return contexts


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, P] and attention mask [B, P], the layout batched generation needs."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=sequences[0].device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


# `loss.anchor.compile`. HF compiles only the decode step (its `_prefill` runs eager), and that step's shapes are the
# rows and the static KV cache's length (the mask it gets is [rows, 1, 1, cache length]), so those two are bucketed,
# not the prompt's width. Rows: powers of two, since decoding is latency-bound (a few more rows cost next to nothing)
# while every new shape is a compile (40 s for a 2-layer toy on 2 CPU cores). Cache length: multiples of 64, since the
# decode step attends over the whole static cache for every token, so its excess is paid per token; HF never
# shrinks that cache (`_previous_max_cache_length`), so only a bucket above the largest so far compiles anew.
# `max_new_tokens` is no shape (only how many steps run), so it may vary.
CACHE_BUCKET = 64


def compiled_sampling(setting, device: torch.device) -> bool:
    """`loss.anchor.compile`: auto is on on CUDA devices only, where eager sampling leaves the device idle; a CPU
    is busy with the work itself and pays tens of seconds for each compile."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def row_bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a counter-based hash, the same on every
    device, whatever the shape it is applied to."""
    z = z * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & ((1 << 33) - 1))


class RowSeededDraw(LogitsProcessor):
    """Draws every row's next token from its own random numbers, and leaves HF's draw a single choice.

    HF samples a step's tokens with one `torch.multinomial` over the batch, which takes its random numbers from
    the global stream in order: a row's anchor would depend on the rows beside it, their number and order, so the
    same pair would get another anchor when its micro-batch is sampled alone or with others (another split over
    processes, a refresh window, the dummy rows of a compiled shape). Here each row draws by the Gumbel-max trick,
    argmax(scores + Gumbel noise), which samples exactly from softmax(scores); the noise of a (row, token,
    vocabulary entry) is a hash of the row's own seed, how many tokens it has generated, and the entry. A row's
    anchor then depends on its context and seed alone. Runs last: `scores` are the warped ones (temperature,
    top-k, top-p); the chosen entry is returned as 0 and every other as -inf, so HF's own draw can only pick it.

    The noise is hashed for a block of tokens at once (at most `BLOCK` values, and no further than `max_new_tokens`),
    not token by token: the same values, in a few tensor operations a block instead of some forty a token, which
    is what the draw's cost is made of on small vocabularies and on a GPU, where each is a kernel launch."""

    BLOCK = 1 << 22  # noise values hashed at once (32 MB in float64)

    def __init__(self, row_seeds: torch.Tensor, context_width: int, max_new_tokens: int = 1):
        self.row_seeds, self.context_width, self.max_new_tokens = row_seeds, context_width, max_new_tokens
        self._noise, self._first = None, 0  # log(-log(u)) [rows, tokens, vocab] for tokens _first.. of the block

    @staticmethod
    def noise(seeds: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
        """log(-log(u)) [rows, tokens, vocab] of each row's seed at each generated-token index, u in (0, 1):
        minus the Gumbel noise."""
        entries = torch.arange(vocab, device=seeds.device)
        keys = mix64(mix64(seeds[:, None] * 1_000_003 + tokens[None, :])[:, :, None] + entries)
        uniform = (((keys >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0 ** -53
        return torch.log(-torch.log(uniform))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = input_ids.shape[1] - self.context_width
        rows, vocab = scores.shape
        if self._noise is None or not 0 <= token - self._first < self._noise.shape[1] or self._noise.shape[0] != rows:
            seeds = self.row_seeds.to(scores.device)
            seeds = torch.cat([seeds, seeds[:1].expand(rows - len(seeds))])  # dummy rows: any seed
            span = max(1, min(self.BLOCK // (rows * vocab), self.max_new_tokens - token))
            self._noise, self._first = self.noise(seeds, torch.arange(token, token + span, device=scores.device),
                                                  vocab), token
        choice = (scores.double() - self._noise[:, token - self._first]).argmax(dim=-1)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice[:, None], 0.0)


def sampling_processors(temperature: float, top_k: int, top_p: float, row_seeds: torch.Tensor,
                        context_width: int, max_new_tokens: int = 1) -> LogitsProcessorList:
    """HF's own warpers, in HF's order, then the per-row draw. Passed as `logits_processor`, with generate's own
    warpers turned off: HF runs a custom processor before its warpers, and the draw must see the warped scores."""
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList([*warpers, RowSeededDraw(row_seeds, context_width, max_new_tokens)])


class DummyRowsDone(StoppingCriteria):
    """Marks the rows from `real` on finished from their first token, so the dummy rows never prolong generation."""

    def __init__(self, real: int):
        self.real = real

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.real:] = True
        return done


def static_cache(length: int, real: int) -> dict:
    """`generate`'s options for HF's compiled decoding: a static KV cache of `length` tokens rounded up to a bucket,
    the decode step compiled on any device (HF by itself compiles only on accelerators), the dummy rows stopped."""
    config = CompileConfig()
    config._compile_all_devices = True
    return {"cache_implementation": "static", "max_cache_len": -(-length // CACHE_BUCKET) * CACHE_BUCKET,
            "compile_config": config, "stopping_criteria": StoppingCriteriaList([DummyRowsDone(real)])}


def per_layer_gathering(model) -> bool:
    """Whether `generation_model` kept ZeRO-3's per-layer gathers for this generation (it notes its choice on the
    engine): their hooks fetch weights inside every forward, which a compiled decode step cannot hold."""
    return zero3_engine(model) and not getattr(model, "_tidpo_gathered", False)


@torch.no_grad()
def generate(model, contexts: list[torch.Tensor], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int | list[int], zero3_weights: str = "auto",
             compile: bool = False) -> list[torch.Tensor]:
    """Sample one continuation per context with the KV cache; each ends at its first EOS (kept) or
    after `max_new_tokens`. Dropout is off while sampling; the model's mode is restored. Reproducible, and each
    row on its own (`RowSeededDraw`): `seed` is one per context, or one int from which row i takes seed + i; the
    global RNG is not disturbed. Under ZeRO-3 `zero3_weights` says how the partitioned weights are had
    (distributed.generation_model).

    `compile`: HF's static KV cache and compiled decode step, the rows padded with dummy rows to a bucket; the
    same samples as without, up to the compiled kernels' rounding. Eager under ZeRO-3's per-layer gathering.
    Under autocast it runs on a twin whose Linear weights hold their casts (twin.autocast_weights), the casts
    eager autocast keeps in its cache for a generation."""
    real = len(contexts)
    rows = row_bucket(real) if compile else real
    length = max(len(c) for c in contexts) + max_new_tokens
    device = contexts[0].device
    was_training = model.training
    model.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with generation_model(model, zero3_weights, rows=rows, length=length) as (sampler, synced), \
                torch.random.fork_rng(devices=devices):
            compiled = compile and not per_layer_gathering(model)
            ids, mask = left_pad(contexts + contexts[:1] * (rows - real) if compiled else contexts, pad_id)
            seeds = torch.tensor(seed if isinstance(seed, list) else [seed + i for i in range(real)])
            with autocast_weights(sampler, autocast_dtype(device.type)) if compiled else nullcontext(sampler) as s:
                # Greedy over the processors' output: the draw is RowSeededDraw's, which leaves one entry finite, so
                # HF's argmax takes it (a softmax and multinomial would too, at the cost of two more operations).
                out = s.generate(
                    input_ids=ids, attention_mask=mask, do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
                    max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
                    synced_gpus=synced,
                    logits_processor=sampling_processors(temperature, top_k, top_p, seeds, ids.shape[1],
                                                         max_new_tokens),
                    **(static_cache(length, real) if compiled else {}),
                )
    finally:
        model.train(was_training)
    continuations = []
    for row in out[:real, ids.shape[1]:]:
        ends = (row == eos_id).nonzero()
        continuations.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return continuations


def anchor_batch(batch: Batch, model, anchor_cfg: DictConfig, *, pad_id: int, eos_id: int, max_length: int,
                 seed: int) -> Batch:
    """Generate one anchor per pair and collate them like training rows (right-padded, labels on the
    anchor response: for `chosen_prefix` that is the copied prefix and the sampled rest)."""
    return sample_anchors([batch], model, anchor_cfg, pad_id=pad_id, eos_id=eos_id, max_length=max_length,
                          seeds=[seed])[0]


def sample_anchors(batches: list[Batch], model, anchor_cfg: DictConfig, *, pad_id: int, eos_id: int,
                   max_length: int, seeds: list[int]) -> list[Batch]:
    """`anchor_batch` for several collated batches at once, `seeds` one per batch: one batched generation over all
    their pairs (the micro-batches of a step, or of several with `anchor.refresh_every`), one anchor batch per
    input batch; each pair's anchor the one `anchor_batch` would give its batch alone with the same seed (the
    rows draw apart: `RowSeededDraw`), up to the rounding of another batch shape."""
    contexts = [anchor_contexts(b, anchor_cfg.source, anchor_cfg.prefix_fraction) for b in batches]
    flat = [c for per_batch in contexts for c in per_batch]
    row_seeds = [s * 1_000_003 + i for s, per_batch in zip(seeds, contexts) for i in range(len(per_batch))]
    room = max_length - max(len(c) for c in flat)  # an anchor is no longer than a training row
    sampled = iter(generate(model, flat, pad_id=pad_id, eos_id=eos_id,
                            max_new_tokens=max(1, min(anchor_cfg.max_new_tokens, room)),
                            temperature=anchor_cfg.temperature, top_k=anchor_cfg.top_k, top_p=anchor_cfg.top_p,
                            seed=row_seeds, zero3_weights=anchor_cfg.zero3_weights,
                            compile=compiled_sampling(anchor_cfg.compile, flat[0].device)))
    return [_collate_anchors([torch.cat([c, next(sampled)]) for c in per_batch],
                             [int(n) for n in b["prompt_lengths"][:len(per_batch)]], pad_id, b["input_ids"].device)
            for b, per_batch in zip(batches, contexts)]


def _collate_anchors(rows: list[torch.Tensor], prompt_lengths: list[int], pad_id: int, device) -> Batch:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
        labels[i, prompt_lengths[i]:len(row)] = row[prompt_lengths[i]:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_lengths": torch.tensor(prompt_lengths, device=device)}


ANCHOR_KEY = "anchor_"  # a micro-batch may carry anchors sampled ahead of its step (anchor.refresh_every > 1)


def attach_anchors(batches: list[Batch], model, anchor_cfg: DictConfig, *, pad_id: int, eos_id: int,
                   max_length: int, seeds: list[int]) -> None:
    """Sample the anchors of every batch in `batches` now, in one generation (`seeds`: one per batch, those its
    `batch_loss` would sample with), and store them in each batch (`anchor_*` keys), for `batch_loss` to use
    instead of sampling its own."""
    for batch, anchors in zip(batches, sample_anchors(batches, model, anchor_cfg, pad_id=pad_id, eos_id=eos_id,
                                                      max_length=max_length, seeds=seeds)):
        batch.update({ANCHOR_KEY + k: v for k, v in anchors.items()})


def attached_anchors(batch: Batch) -> Batch | None:
    """The anchors `attach_anchors` stored in `batch`, if any."""
    found = {k.removeprefix(ANCHOR_KEY): v for k, v in batch.items() if k.startswith(ANCHOR_KEY)}
    return found or None


def with_anchors(batch: Batch, anchors: Batch, pad_id: int) -> Batch:
    """The pairs' rows and the anchors' as one batch of 3B rows (chosen, rejected, anchors), padded to one
    width, so a single forward scores all three; packed (one row per pair, the prompt once) when `batch` is."""
    width = max(batch["input_ids"].shape[1], anchors["input_ids"].shape[1])

    def stacked(key: str, fill: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(part[key], (0, width - part[key].shape[1]), value=fill)
                          for part in (batch, anchors)])

    rows = {"input_ids": stacked("input_ids", pad_id), "attention_mask": stacked("attention_mask", 0),
            "labels": stacked("labels", IGNORE_INDEX),
            "prompt_lengths": torch.cat([batch["prompt_lengths"], anchors["prompt_lengths"]])}
    if "packed_ids" in batch:
        rows.update(pack_pairs(rows["input_ids"], rows["attention_mask"], rows["prompt_lengths"], pad_id, groups=3))
    return rows
