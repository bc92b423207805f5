"""The two batch layouts behind one interface, so the objective reads the same for both.

`Rows`: one row per response (data.collate), what `loss` sees; `Packed`: one row per pair with the prompt once
(packing.py, `trainer.share_prompt`). Either answers: the ids a forward runs on, the forward's other keyword
arguments, the labels' log-probs read off its logits, each response's last position, and per-position values
of a forward in the rows' layout.
"""

from __future__ import annotations

import torch

from .importance import last_positions
from .losses import token_logps
from .packing import is_packed, last_positions_packed, model_inputs, packed_token_logps, unpack

Batch = dict[str, torch.Tensor]


class Rows:
    """One row per response: input_ids / attention_mask / labels [N, T]."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def ids(self) -> torch.Tensor:
        return self.batch["input_ids"]

    def model_kwargs(self, model) -> dict:
        return {"attention_mask": self.batch["attention_mask"]}

    def label_logps(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, T] log-probs of the labels (losses.token_logps)."""
        return token_logps(logits, self.batch["labels"])

    def last_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward row, position) of each response row's last token: [N] each."""
        mask = self.batch["attention_mask"]
        return torch.arange(mask.shape[0], device=mask.device), last_positions(mask)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position values of a forward [rows, positions, ...] in the rows' layout [N, T, ...]."""
        return values


class Packed(Rows):
    """One row per pair, the prompt once (`packed_*` keys beside the rows' own)."""

    def ids(self) -> torch.Tensor:
        return self.batch["packed_ids"]

    def model_kwargs(self, model) -> dict:
        return model_inputs(model, self.batch)

    def label_logps(self, logits: torch.Tensor) -> torch.Tensor:
        return packed_token_logps(logits, self.batch)

    def last_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return last_positions_packed(self.batch)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        return unpack(values, self.batch)  # a gathered copy


def layout_of(batch: Batch) -> Rows:
    return Packed(batch) if is_packed(batch) else Rows(batch)
