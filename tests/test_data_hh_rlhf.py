"""The hh-rlhf loader on real data: Anthropic HH-RLHF harmless-base test split, from ../shared/data."""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import pytest

from tidpo_cli.data.formats import to_example
from tidpo_cli.data.prepare import prepare
from tidpo_cli.data.readers import read_rows
from tidpo_cli.errors import DataError
from tidpo_cli.tokenizer import build_byte_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
NOT_SHARED = "chosen and rejected do not share a prompt"
# 1-based lines whose two dialogues differ before the last assistant turn (found by reading the file).
NOT_SHARED_LINES = (1255, 1689, 1953, 2037)

pytestmark = pytest.mark.skipif(
    not DATA.is_file(), reason=f"real HH-RLHF data not found at {DATA} (it lives in ../shared/data beside the repo)"
)


@functools.lru_cache(maxsize=1)
def tok():
    return build_byte_tokenizer()


@functools.lru_cache(maxsize=1)
def prepared():
    return prepare(read_rows(str(DATA)), "auto", tok(), max_length=512, max_prompt_length=384)


def test_reads_all_rows():
    rows = list(read_rows(str(DATA)))
    assert len(rows) == 2312
    assert rows[0][0] == f"{DATA}:1" and rows[-1][0] == f"{DATA}:2312"
    assert all(set(row) == {"chosen", "rejected"} for _, row in rows)


def test_prepare_uses_2308_and_skips_the_4_that_do_not_split():
    pairs, report = prepared()
    assert report.fmt == "hh_rlhf"
    assert (report.rows, report.used, report.skipped) == (2312, 2308, 4)
    assert len(pairs) == 2308
    assert report.skip_reasons == collections.Counter({NOT_SHARED: 4})
    assert report.first_skipped == [f"{DATA}:{line}: {NOT_SHARED}" for line in NOT_SHARED_LINES]
    assert report.summary().startswith(f"read 2312 rows from {DATA}: used 2308, skipped 4 ({NOT_SHARED}: 4), truncated ")
    assert 0 < report.truncated < 2308  # some dialogues are longer than 512 bytes, most are not


def test_every_pair_fits_and_ends_properly():
    pairs, _ = prepared()
    eos = tok().eos_token_id
    for pair in pairs:
        assert pair.prompt_ids[0] == tok().bos_token_id and len(pair.prompt_ids) <= 384
        for response in (pair.chosen_ids, pair.rejected_ids):
            assert 0 < len(pair.prompt_ids) + len(response) <= 512
            if not pair.truncated:
                assert response[-1] == eos and eos not in response[:-1]


def test_error_mode_names_the_file_and_first_bad_row():
    with pytest.raises(DataError) as info:
        prepare(read_rows(str(DATA)), "hh_rlhf", tok(), max_length=512, max_prompt_length=384, on_bad_row="error")
    message = str(info.value)
    assert f"{DATA.name}:1255" in message and NOT_SHARED in message and "data.on_bad_row=skip" in message


def test_spot_check_first_row():
    where, row = next(iter(read_rows(str(DATA))))
    ex = to_example(row, "hh_rlhf", tok(), where)
    assert ex.prompt.startswith("\n\nHuman: ") and ex.prompt.endswith("\n\nAssistant:")
    assert ex.chosen.startswith(" ") and ex.rejected.startswith(" ")
    assert ex.prompt + ex.chosen == row["chosen"] and ex.prompt + ex.rejected == row["rejected"]
    assert ex.chosen != ex.rejected


def test_empty_assistant_turn_rows_are_kept():
    # Line 87 prefers an assistant turn that says nothing: chosen ends with "Assistant: ".
    rows = dict(read_rows(str(DATA)))
    row = rows[f"{DATA}:87"]
    ex = to_example(row, "hh_rlhf", tok(), f"{DATA}:87")
    assert ex.chosen == " " and ex.rejected.startswith(" Sure")


def test_max_rows():
    pairs, report = prepare(read_rows(str(DATA)), "auto", tok(), max_length=512, max_prompt_length=384, max_rows=10)
    assert (report.rows, report.used, len(pairs)) == (10, 10, 10)
