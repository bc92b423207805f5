"""Batches of pairs in a seeded order that a step counter can reproduce."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DataError
from .collate import collate
from .examples import TokenizedPair


class BatchStream:
    """An endless stream of collated micro-batches, epoch after epoch.

    Each epoch is a permutation drawn from `seed + epoch` (or the file order when shuffle is off); the
    last incomplete micro-batch of an epoch is dropped so every micro-batch has the same number of pairs,
    which keeps gradient accumulation exact. `epoch` and `position` say where the stream stands.
    """

    def __init__(self, pairs: list[TokenizedPair], micro_batch_size: int, pad_id: int, *,
                 seed: int, shuffle: bool = True):
        if len(pairs) < micro_batch_size:
            raise DataError(
                f"only {len(pairs)} training pairs for trainer.micro_batch_size={micro_batch_size}: "
                f"lower the micro-batch size or use more data"
            )
        self.pairs, self.micro_batch_size, self.pad_id = pairs, micro_batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.pairs) // self.micro_batch_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.pairs)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.pairs), generator=generator).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self._order(self.epoch)
            while self.position + self.micro_batch_size <= len(order):
                chunk = order[self.position: self.position + self.micro_batch_size]
                self.position += self.micro_batch_size
                yield collate([self.pairs[i] for i in chunk], self.pad_id)
            self.epoch, self.position = self.epoch + 1, 0


def eval_batches(pairs: list[TokenizedPair], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out pairs in order, in batches of at most `batch_size`."""
    for start in range(0, len(pairs), batch_size):
        yield collate(pairs[start: start + batch_size], pad_id)
