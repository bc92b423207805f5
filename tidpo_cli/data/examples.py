"""The two record types that flow through the data pipeline, and the per-row error."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair as text.

    `prompt` is what the model is conditioned on (already chat-rendered for conversational data);
    `chosen` and `rejected` are continuations of it. `where` names the source row: "path:row" (1-based
    line for JSON lines, 0-based index otherwise) or "name[split]:index" for a `datasets` dataset.
    """

    prompt: str
    chosen: str
    rejected: str
    where: str
    gold: str | None = None  # a third, gold response (TPO's `reference` column), when the row has one
    # The end of the rendered prompt that is left out because the chat template renders the prompt alone
    # differently from the start of the conversation (data.template_mismatch=common_prefix); "" when none.
    prompt_cut: str = ""
    # The characters that decide the pair (the rows' `chosen_critical` / `rejected_critical` columns), as
    # [start, end) spans into `chosen` / `rejected`; None where the row marks none.
    chosen_critical: tuple[tuple[int, int], ...] | None = None
    rejected_critical: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class UnpairedExample:
    """One unpaired example as text (KTO's data: TRL's unpaired preference layout): a `completion` of `prompt`
    that is `desirable` (label true) or not (label false). `where` as in PreferenceExample."""

    prompt: str
    completion: str
    desirable: bool
    where: str


class BadRow(Exception):
    """A row that cannot be used. `str(e)` is a short reason, e.g. "missing key 'rejected'".

    Reasons are kept free of row contents so that a report can count them.
    """


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids, ready for collation.

    `chosen_ids` / `rejected_ids` hold the response ids only (EOS appended exactly once, unless the
    response was cut); the model input for a side is `prompt_ids + chosen_ids`. `truncated` is True when
    the prompt or a response was cut to fit the length limits.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str
    truncated: bool
    gold_ids: list[int] | None = None  # the gold response (TPO), EOS appended as for the others
    # Precomputed per-token weights of the responses (TIS-DPO: tis.py), one per response token, or None.
    token_weights: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # The critical tokens of each response (indices into chosen_ids / rejected_ids: those whose characters overlap
    # a critical span of the example), or None for a response the data does not mark.
    critical: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None)


@dataclass(frozen=True)
class TokenizedExample:
    """One unpaired example as token ids: `completion_ids` (EOS appended once, unless cut) follow `prompt_ids`."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    where: str
    truncated: bool
