"""Anchor responses for the triplet term (METHOD §3): sampled online from the current policy, no grad."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from .distributed import generation_model
from .losses import IGNORE_INDEX
from .packing import pack_pairs

Batch = dict[str, torch.Tensor]


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


@torch.no_grad()
def generate(model, contexts: list[torch.Tensor], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int, zero3_weights: str = "auto") -> list[torch.Tensor]:
    """Sample one continuation per context with the KV cache; each ends at its first EOS (kept) or
    after `max_new_tokens`. Dropout is off while sampling; the model's mode is restored. Reproducible:
    the sampling RNG is seeded from `seed` without disturbing the global RNG. Under ZeRO-3 `zero3_weights`
    says how the partitioned weights are had (distributed.generation_model)."""
    ids, mask = left_pad(contexts, pad_id)
    was_training = model.training
    model.eval()
    devices = [ids.device.index or 0] if ids.device.type == "cuda" else []
    try:
        with generation_model(model, zero3_weights, rows=len(contexts), length=ids.shape[1] + max_new_tokens) \
                as (sampler, synced), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = sampler.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=top_k,
                top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                use_cache=True, synced_gpus=synced,
            )
    finally:
        model.train(was_training)
    continuations = []
    for row in out[:, ids.shape[1]:]:
        ends = (row == eos_id).nonzero()
        continuations.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return continuations


def anchor_batch(batch: Batch, model, anchor_cfg: DictConfig, *, pad_id: int, eos_id: int, max_length: int,
                 seed: int) -> Batch:
    """Generate one anchor per pair and collate them like training rows (right-padded, labels on the
    anchor response: for `chosen_prefix` that is the copied prefix and the sampled rest)."""
    return sample_anchors([batch], model, anchor_cfg, pad_id=pad_id, eos_id=eos_id, max_length=max_length,
                          seed=seed)[0]


def sample_anchors(batches: list[Batch], model, anchor_cfg: DictConfig, *, pad_id: int, eos_id: int,
                   max_length: int, seed: int) -> list[Batch]:
    """`anchor_batch` for several collated batches at once: one batched generation over all their pairs (what
    `anchor.refresh_every` > 1 uses for the micro-batches of several steps), one anchor batch per input batch."""
    contexts = [anchor_contexts(b, anchor_cfg.source, anchor_cfg.prefix_fraction) for b in batches]
    flat = [c for per_batch in contexts for c in per_batch]
    room = max_length - max(len(c) for c in flat)  # an anchor is no longer than a training row
    sampled = iter(generate(model, flat, pad_id=pad_id, eos_id=eos_id,
                            max_new_tokens=max(1, min(anchor_cfg.max_new_tokens, room)),
                            temperature=anchor_cfg.temperature, top_k=anchor_cfg.top_k, top_p=anchor_cfg.top_p,
                            seed=seed, zero3_weights=anchor_cfg.zero3_weights))
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
                   max_length: int, seed: int) -> None:
    """Sample the anchors of every batch in `batches` now, in one generation, and store them in each batch
    (`anchor_*` keys), for `batch_loss` to use instead of sampling its own."""
    for batch, anchors in zip(batches, sample_anchors(batches, model, anchor_cfg, pad_id=pad_id, eos_id=eos_id,
                                                      max_length=max_length, seed=seed)):
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
