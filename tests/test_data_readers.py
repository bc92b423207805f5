"""read_rows over every supported source, its error messages, and random bytes."""

from __future__ import annotations

import gzip
import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo_cli.data.readers import read_rows
from tidpo_cli.errors import DataError

ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2", "chosen": "c2 é", "rejected": "r2"},
]


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def test_jsonl_rows_and_one_based_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    # A blank line in the middle and at the end is skipped, but still counted for line numbers.
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\n" + json.dumps(ROWS[1]).encode() + b"\n\n")
    assert list(read_rows(str(path))) == [(f"{path}:1", ROWS[0]), (f"{path}:3", ROWS[1])]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(ROWS)))
    assert list(read_rows(path)) == [(f"{path}:1", ROWS[0]), (f"{path}:2", ROWS[1])]


def test_json_list_and_object_with_one_list(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": ROWS}))
    assert list(read_rows(str(listed))) == [(f"{listed}:0", ROWS[0]), (f"{listed}:1", ROWS[1])]
    assert list(read_rows(str(wrapped))) == [(f"{wrapped}:0", ROWS[0]), (f"{wrapped}:1", ROWS[1])]


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "hub_style.json"
    path.write_bytes(jsonl_bytes(ROWS))
    assert [row for _, row in read_rows(str(path))] == ROWS


def test_json_without_a_single_list_is_an_error(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(DataError, match="several list-valued keys"):
        list(read_rows(str(path)))
    path.write_text(json.dumps([ROWS[0], 3]))
    with pytest.raises(DataError, match="item 1"):
        list(read_rows(str(path)))


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert list(read_rows(str(path))) == [(f"{path}:0", ROWS[0]), (f"{path}:1", ROWS[1])]


def test_directory_goes_through_datasets(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl_bytes(ROWS))
    rows = list(read_rows(str(folder), split="train"))
    assert rows == [(f"{folder}[train]:0", ROWS[0]), (f"{folder}[train]:1", ROWS[1])]


def test_malformed_line_names_file_line_and_shows_it(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl_bytes(ROWS) + b'{"chosen": "oops\n')
    rows = read_rows(str(path))
    with pytest.raises(DataError) as info:
        list(rows)
    message = str(info.value)
    assert "bad.jsonl" in message and "line 3" in message
    assert '{"chosen": "oops' in message


def test_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl_bytes(ROWS[:1]) + '{"chosen": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as info:
        list(read_rows(str(path)))
    assert "latin1.jsonl" in str(info.value) and "line 2" in str(info.value) and "UTF-8" in str(info.value)


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'["a", "b"]\n')
    with pytest.raises(DataError, match="line 1.*JSON object.*a list"):
        list(read_rows(str(path)))


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(ROWS * 50))[:60])
    with pytest.raises(DataError, match="broken.jsonl.gz"):
        list(read_rows(str(path)))


@pytest.mark.parametrize("name", ["./missing.jsonl", "data/train.jsonl", "/nowhere/at/all", "~/x.parquet"])
def test_missing_local_path(name):
    with pytest.raises(DataError) as info:
        read_rows(name)
    message = str(info.value)
    assert name in message and "does not exist" in message and "not treated as a hub" in message


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError) as info:
        read_rows(str(path))
    assert all(ext in str(info.value) for ext in (".jsonl", ".jsonl.gz", ".json", ".parquet"))


def test_hub_failure_is_one_line_with_name_split_cause_and_offline_hint(monkeypatch):
    import datasets

    def offline(path, split=None, **kw):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\n\nMore details.")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        read_rows("someone/preferences", split="test")
    message = str(info.value)
    assert "\n" not in message
    for words in ("'someone/preferences'", "'test'", "Couldn't reach", "offline", "local file"):
        assert words in message


def test_hub_name_is_passed_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake(path, split=None, **kw):
        calls.append((path, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = list(read_rows("org/prefs", split="train"))
    assert calls == [("org/prefs", "train")]
    assert rows == [("org/prefs[train]:0", ROWS[0]), ("org/prefs[train]:1", ROWS[1])]


# --- property: random bytes either read as objects or fail with DataError --------------------------

line = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b'{"a": 1}', b"[1, 2]", b"{", b'"x"', b"null", b"\xff\xfe", b"", b"  ", b'{"a": "\\ud800"}', b"NaN"]),
)


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(line, max_size=6), compress=st.booleans())
def test_random_jsonl_yields_dicts_or_raises_data_error(lines, compress):
    content = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "random.jsonl.gz" if compress else "random.jsonl")
        with open(path, "wb") as f:
            f.write(gzip.compress(content) if compress else content)
        try:
            rows = list(read_rows(path))
        except DataError as e:
            assert "random.jsonl" in str(e)
        else:
            assert all(isinstance(row, dict) and where.startswith(f"{path}:") for where, row in rows)


@settings(max_examples=30, deadline=None)
@given(content=st.binary(max_size=64))
def test_random_bytes_as_gzip_or_json_raise_only_data_error(content):
    with tempfile.TemporaryDirectory() as folder:
        for name in ("random.jsonl.gz", "random.json"):
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(content)
            try:
                rows = list(read_rows(path))
            except DataError:
                continue
            assert all(isinstance(row, dict) for _, row in rows)
