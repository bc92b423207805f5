"""From raw rows to tokenized pairs, counting what was used, skipped and truncated."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tidpo_cli.data.chat import ChatOptions
from tidpo_cli.data.examples import BadRow, TokenizedPair
from tidpo_cli.data.formats import DEFAULT_CHAT, FORMATS, detect_format, to_example
from tidpo_cli.data.tokenize import check_lengths, tokenize_example
from tidpo_cli.errors import DataError

ON_BAD_ROW = ("skip", "error")
_FIRST_SKIPPED = 5  # "where: reason" lines kept for the report
_REASONS_SHOWN = 3  # distinct reasons in the one-line summary


@dataclass
class PrepareReport:
    """What `prepare` did with the rows it read.

    `source` is the file or dataset the rows came from (taken from the first row's `where`; the given source
    when there is none), `fmt` the
    format used (resolved when "auto").
    """

    rows: int = 0
    used: int = 0
    skipped: int = 0
    truncated: int = 0
    skip_reasons: collections.Counter = field(default_factory=collections.Counter)
    first_skipped: list[str] = field(default_factory=list)
    source: str = ""
    fmt: str = ""
    shortened: int = 0   # used pairs whose rendered prompt was cut back (chat template mismatch)
    prompt_cut: str = ""  # what the first of them left out

    def summary(self) -> str:
        """One line: "read 2312 rows from X: used 2308, skipped 4 (reason: 4), truncated 17", and
        ", prompt shortened N (chat template mismatch)" when some were."""
        skipped = f"skipped {self.skipped}"
        if self.skip_reasons:
            common = self.skip_reasons.most_common()
            parts = [f"{reason}: {count}" for reason, count in common[:_REASONS_SHOWN]]
            if len(common) > _REASONS_SHOWN:
                parts.append(f"{len(common) - _REASONS_SHOWN} other reasons")
            skipped += f" ({'; '.join(parts)})"
        source = f" from {self.source}" if self.source else ""
        shortened = f", prompt shortened {self.shortened} (chat template mismatch)" if self.shortened else ""
        return f"read {self.rows} rows{source}: used {self.used}, {skipped}, truncated {self.truncated}{shortened}"

    def mismatch_warning(self) -> str | None:
        """What the rows with a shortened prompt leave out, and why (None when there are none)."""
        if not self.shortened:
            return None
        return (f"the chat template renders the prompt alone differently from the start of the conversation: "
                f"in {self.shortened} of {self.used} pairs the prompt stops where the two differ, leaving out "
                f"{self.prompt_cut!r} (first such row); the model trains on a context that differs from its "
                "generation prompt (data.template_mismatch=error refuses such rows instead)")


def _source_of(where: str) -> str:
    """The file or dataset part of a row's `where` ("data.jsonl:12" -> "data.jsonl")."""
    return where.rsplit(":", 1)[0] if ":" in where else where


def _check_options(fmt: str, on_bad_row: str, max_rows: int | None) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"unknown data.on_bad_row {on_bad_row!r}; choose one of {', '.join(ON_BAD_ROW)}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise DataError(f"max_rows must be a positive number of rows or null, got {max_rows!r}")


def prepare(
    rows: Iterable[tuple[str, dict]],
    fmt: str,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    on_bad_row: str = "skip",
    max_rows: int | None = None,
    source: str = "",
    chat: ChatOptions = DEFAULT_CHAT,
) -> tuple[list[TokenizedPair], PrepareReport]:
    """Convert and tokenize `(where, row)` pairs; return the usable pairs and a report.

    `fmt` is one of `FORMATS` or "auto" (detected from the first row whose layout is recognisable, then
    held: a later row of another layout is a bad row). A bad row is counted and skipped
    (`on_bad_row="skip"`) or ends the run with a `DataError` naming it (`"error"`). `max_rows` stops after
    that many rows have been read. Raises `DataError` when no row is usable. `source` names the file or dataset
    (with its split) in the report before any row is read, so an empty one is named too. `chat` says how
    conversational rows are rendered.
    """
    _check_options(fmt, on_bad_row, max_rows)
    check_lengths(max_length, max_prompt_length)
    report = PrepareReport(fmt="" if fmt == "auto" else fmt, source=source)
    held = None if fmt == "auto" else fmt
    pairs: list[TokenizedPair] = []
    for where, row in rows:
        report.rows += 1
        if report.rows == 1:  # the rows name themselves best (the given `source` is for an empty one)
            report.source = _source_of(where)
        try:
            if held is None:
                held = detect_format(row)
                report.fmt = held
            example = to_example(row, held, tokenizer, where, chat)
            pair = tokenize_example(example, tokenizer, max_length, max_prompt_length)
        except BadRow as e:
            reason = str(e)
            if on_bad_row == "error":
                raise DataError(
                    f"bad row at {where} (format {held or 'auto'}): {reason}; "
                    "set data.on_bad_row=skip to skip such rows"
                ) from None
            report.skipped += 1
            report.skip_reasons[reason] += 1
            if len(report.first_skipped) < _FIRST_SKIPPED:
                report.first_skipped.append(f"{where}: {reason}")
        else:
            pairs.append(pair)
            report.used += 1
            report.truncated += pair.truncated
            if getattr(example, "prompt_cut", ""):
                report.shortened += 1
                report.prompt_cut = report.prompt_cut or example.prompt_cut
        # Checked after the row, not before the next: reading one more row could fail on a bad line.
        if max_rows is not None and report.rows >= max_rows:
            break
    if not pairs:
        raise DataError(_nothing_usable(report, fmt))
    return pairs, report


def _nothing_usable(report: PrepareReport, fmt: str) -> str:
    """The message for a run where no row could be used."""
    source = report.source or "the data"
    if report.rows == 0:
        return f"no rows read from {source}: the file or split is empty (point data.path at a file with rows)"
    first = "; ".join(report.first_skipped[:3])
    return (
        f"no usable rows in {source}: all {report.rows} rows were bad (format {report.fmt or fmt}); "
        f"first: {first}; check data.format and the data's keys"
    )
