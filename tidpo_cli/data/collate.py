"""Batches of tokenized pairs as padded tensors."""

from __future__ import annotations

import torch

from tidpo_cli.data.examples import TokenizedExample, TokenizedPair
from tidpo_cli.losses import IGNORE_INDEX
from tidpo_cli.packing import pack_pairs



def _check(pairs: list[TokenizedPair], pad_id: int) -> None:
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    if pad_id is None or isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r} (does the tokenizer have a pad token?)")


def collate(pairs: list[TokenizedPair], pad_id: int, *, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: B pairs -> 2B rows, right-padded to the longest row.

    Returns
      input_ids      [2B, T] long  prompt + response, then `pad_id`
      attention_mask [2B, T] long  1 on prompt + response, 0 on padding
      labels         [2B, T] long  input_ids on response tokens, -100 on prompt and padding (NOT shifted:
                                   the training loop shifts)
      prompt_lengths [2B]    long  prompt tokens in each row (row i and row B+i share a prompt)
    gold_*         [B, T'] the pairs' gold responses (input_ids, attention_mask, labels) when any pair has one
                                 (TPO); a pair without one has its chosen response there
    token_weights  [2B, T] float the pairs' precomputed response token weights where they have them (TIS-DPO),
                                 aligned with labels, 0 elsewhere
    critical_mask  [2B, T] bool  True at the critical tokens of the responses (TokenizedPair.critical), and
    critical_rows  [2B]    bool  which responses the data marks: both only when a pair of the batch marks any
    and with `share_prompt` the packed layout of packing.pack_pairs (`packed_*`: one row per pair).
    """
    _check(pairs, pad_id)
    if isinstance(pairs[0], TokenizedExample):
        return collate_unpaired(pairs, pad_id)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    prompt_lengths = torch.empty(rows, dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        start, end = len(prompt), len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :end] = 1
        labels[row, start:end] = input_ids[row, start:end]
        prompt_lengths[row] = start
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "prompt_lengths": prompt_lengths}
    if pairs[0].token_weights is not None:
        weights = torch.zeros((rows, width), dtype=torch.float32)
        sides = [p.token_weights[0] for p in pairs] + [p.token_weights[1] for p in pairs]
        for row, ((prompt, response), side) in enumerate(zip(sequences, sides)):
            if len(side) != len(response):
                raise ValueError(f"{len(side)} token weights for a response of {len(response)} tokens")
            weights[row, len(prompt):len(prompt) + len(response)] = torch.tensor(side, dtype=torch.float32)
        batch["token_weights"] = weights
    marks = [p.critical[0] for p in pairs] + [p.critical[1] for p in pairs]
    if any(m is not None for m in marks):
        critical, marked = torch.zeros((rows, width), dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)
        for row, ((prompt, response), positions) in enumerate(zip(sequences, marks)):
            if positions is not None:
                marked[row] = True
                critical[row, [len(prompt) + i for i in positions if i < len(response)]] = True
        batch["critical_mask"], batch["critical_rows"] = critical, marked
    if any(p.gold_ids is not None for p in pairs):
        gold = collate_unpaired([TokenizedExample(p.prompt_ids, p.gold_ids if p.gold_ids is not None else p.chosen_ids,
                                                  True, p.where, p.truncated) for p in pairs], pad_id)
        batch.update({f"gold_{k}": gold[k] for k in ("input_ids", "attention_mask", "labels")})
    if share_prompt:
        batch.update(pack_pairs(input_ids, attention_mask, prompt_lengths, pad_id))
    return batch


def collate_unpaired(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpaired examples (KTO's data), one row each in order, right-padded: input_ids, attention_mask, labels,
    prompt_lengths [N] as `collate`, and `desirable` [N] bool (the rows' labels). Always one row per example."""
    rows, width = len(examples), max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        start, end = len(e.prompt_ids), len(e.prompt_ids) + len(e.completion_ids)
        input_ids[row, :end] = torch.tensor(e.prompt_ids + e.completion_ids, dtype=torch.long)
        attention_mask[row, :end] = 1
        labels[row, start:end] = input_ids[row, start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_lengths": torch.tensor([len(e.prompt_ids) for e in examples], dtype=torch.long),
            "desirable": torch.tensor([e.desirable for e in examples], dtype=torch.bool)}
