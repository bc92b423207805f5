"""The two batch layouts behind one interface, so the objective reads the same for both.

`Rows`: one row per response (data.collate), what `loss` sees; `Packed`: one row per pair with the prompt once
(packing.py, `trainer.share_prompt`). Either answers: the ids a forward runs on, the forward's other keyword
arguments, the positions whose logits the objective reads, the labels' log-probs read off its logits, each
response's last position, and per-position values of a forward in the rows' layout.

The logits a forward returns are either its whole [rows, positions, V], or only those of the positions `kept`
names, [K, V] in their row-major order (what HF's `logits_to_keep` gives for a boolean mask): the output layer then
skips every position the objective does not read, most of them the prompt's.
"""

from __future__ import annotations

import torch

from .importance import last_positions
from .losses import IGNORE_INDEX, indexed_token_logps, token_logps
from .packing import is_packed, last_positions_packed, model_inputs, packed_token_logps, unpack

Batch = dict[str, torch.Tensor]


class Rows:
    """One row per response: input_ids / attention_mask / labels [N, T]."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self._kept: torch.Tensor | None = None

    def ids(self) -> torch.Tensor:
        return self.batch["input_ids"]

    def model_kwargs(self, model) -> dict:
        return {"attention_mask": self.batch["attention_mask"]}

    def label_logps(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, T] log-probs of the labels (losses.token_logps), from whole logits or the kept positions' (`kept`)."""
        if logits.dim() == 2:
            return indexed_token_logps(*self.indexed(logits, kept=True), self.batch["labels"])
        return token_logps(logits, self.batch["labels"])

    def predictors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward row [N, 1], forward position [N, T - 1]): where in the forward each label t + 1 is predicted."""
        labels = self.batch["labels"]
        n, t = labels.shape
        rows = torch.arange(n, device=labels.device)[:, None]
        return rows, torch.arange(t - 1, device=labels.device)[None].expand(n, t - 1)

    def kept(self) -> torch.Tensor:
        """[rows, positions] bool over the forward: the positions whose logits the objective reads, those that
        predict a label and each response's last (which the saliency targets read). Computed once a layout."""
        if self._kept is not None:
            return self._kept
        ids = self.ids()
        keep = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        rows, positions = self.predictors()
        labelled = self.batch["labels"][:, 1:] != IGNORE_INDEX
        keep[rows.expand_as(positions)[labelled], positions[labelled]] = True
        keep[self.last_positions()] = True
        self._kept = keep
        return keep

    def slots(self) -> torch.Tensor:
        """[N, T - 1]: the index among the kept positions (`kept`, row-major) of the one that predicts each label
        t + 1; 0 where no label is (read, then masked)."""
        keep = self.kept()
        order = (keep.flatten().cumsum(0) - 1).view(keep.shape)
        rows, positions = self.predictors()
        return order[rows, positions].clamp(min=0)

    def indexed(self, values: torch.Tensor, kept: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(`values` over positions [P, ...], the index [N, T - 1] into P of the position that predicts each
        label t + 1): `values` [K, ...] at the kept positions (`kept`), or [rows, positions, ...] at every one."""
        if kept:
            return values, self.slots()
        rows, positions = self.predictors()
        return values.flatten(0, 1), rows * values.shape[1] + positions

    def at_labels(self, values: torch.Tensor) -> torch.Tensor:
        """[N, T]: a per-position value of a forward at the position that predicts each label, aligned with the
        labels as `label_logps` is (0 where no label is); `values` [K] at the kept positions, or [rows, positions]
        at every position."""
        flat, where = self.indexed(values, kept=values.dim() == 1)
        return torch.nn.functional.pad(flat[where] * (self.batch["labels"][:, 1:] != IGNORE_INDEX), (1, 0))

    def label_logit_means(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, T] float32: the mean logit (over the vocabulary) at the position that predicts each label, 0 where
        no label is; from whole logits or the kept positions'."""
        return self.at_labels(logits.detach().mean(-1, dtype=torch.float32))

    def as_kept(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at the kept positions [K, V] (`kept`, row-major), from whole ones or as they are."""
        return logits[self.kept()] if logits.dim() == 3 else logits

    def whole_positions(self, kept_values: torch.Tensor) -> torch.Tensor:
        """Per-position values of the kept positions [K, ...] (`kept`, row-major) in the forward's layout
        [rows, positions, ...], zero at the others (differentiable)."""
        keep = self.kept()
        whole = kept_values.new_zeros((*keep.shape, *kept_values.shape[1:]))
        return whole.index_put((keep,), kept_values)

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
        if logits.dim() == 2:
            return super().label_logps(logits)
        return packed_token_logps(logits, self.batch)

    def predictors(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.batch["packed_index"]
        rows = torch.arange(index.shape[0], device=index.device) % self.batch["packed_ids"].shape[0]
        return rows[:, None], index[:, :-1]

    def last_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return last_positions_packed(self.batch)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        return unpack(values, self.batch)  # a gathered copy


def layout_of(batch: Batch) -> Rows:
    return Packed(batch) if is_packed(batch) else Rows(batch)
