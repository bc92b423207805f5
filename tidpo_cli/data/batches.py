"""Batches of pairs in a seeded order that a step counter can reproduce."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DataError
from .collate import collate
from .examples import TokenizedExample, TokenizedPair


class BatchStream:
    """An endless stream of collated micro-batches, epoch after epoch.

    Each epoch is a permutation drawn from `seed + epoch` (or the file order when shuffle is off); the
    last incomplete micro-batch of an epoch is dropped so every micro-batch has the same number of pairs,
    which keeps gradient accumulation exact. `epoch` and `position` say where the stream stands.
    `group_by_length` > 0 sorts each window of that many micro-batches of the order by length, so a
    micro-batch holds pairs of similar length (less padding), then shuffles the window's micro-batches.
    """

    def __init__(self, pairs: list[TokenizedPair], micro_batch_size: int, pad_id: int, *,
                 seed: int, shuffle: bool = True, share_prompt: bool = False, group_by_length: int = 0):
        if len(pairs) < micro_batch_size:
            raise DataError(
                f"only {len(pairs)} training pairs for trainer.micro_batch_size={micro_batch_size}: "
                f"lower the micro-batch size or use more data"
            )
        self.pairs, self.micro_batch_size, self.pad_id = pairs, micro_batch_size, pad_id
        self.seed, self.shuffle, self.share_prompt = seed, shuffle, share_prompt
        self.group_by_length = group_by_length
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.pairs) // self.micro_batch_size

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.pairs), generator=generator).tolist() if self.shuffle \
            else list(range(len(self.pairs)))
        return grouped_by_length(order, self.pairs, self.micro_batch_size, self.group_by_length, generator) \
            if self.group_by_length else order

    def peek(self) -> list[TokenizedPair]:
        """The pairs of the next micro-batch, the stream left where it stands."""
        epoch, position = self.epoch, self.position
        if position + self.micro_batch_size > len(self.pairs):
            epoch, position = epoch + 1, 0
        return [self.pairs[i] for i in self._order(epoch)[position: position + self.micro_batch_size]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self._order(self.epoch)
            while self.position + self.micro_batch_size <= len(order):
                chunk = order[self.position: self.position + self.micro_batch_size]
                self.position += self.micro_batch_size
                yield collate([self.pairs[i] for i in chunk], self.pad_id, share_prompt=self.share_prompt)
            self.epoch, self.position = self.epoch + 1, 0


def pair_length(pair: TokenizedPair) -> int:
    """Tokens of a pair with its prompt once (the packed row's length; ranks unpacked rows the same way); of an
    unpaired example, its row's."""
    if isinstance(pair, TokenizedExample):
        return len(pair.prompt_ids) + len(pair.completion_ids)
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def grouped_by_length(order: list[int], pairs: list[TokenizedPair], micro_batch_size: int, window: int,
                      generator: torch.Generator) -> list[int]:
    """`order` with each run of `window` micro-batches sorted longest first, cut into micro-batches, and those
    micro-batches shuffled within the run. Which pairs an epoch holds does not change, only who shares a batch."""
    out: list[int] = []
    span = window * micro_batch_size
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -pair_length(pairs[i]))
        batches = [chunk[k:k + micro_batch_size] for k in range(0, len(chunk), micro_batch_size)]
        full = [b for b in batches if len(b) == micro_batch_size]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        out += [i for b in shuffled + [b for b in batches if len(b) < micro_batch_size] for i in b]
    return out


def eval_batches(pairs: list[TokenizedPair], batch_size: int, pad_id: int, *,
                 share_prompt: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out pairs in order, in batches of at most `batch_size`."""
    for start in range(0, len(pairs), batch_size):
        yield collate(pairs[start: start + batch_size], pad_id, share_prompt=share_prompt)
