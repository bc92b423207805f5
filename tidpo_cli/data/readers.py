"""Reading preference rows from local files, local dataset folders and hub datasets.

Every reader yields `(where, row)`: `where` names the row for error messages ("path:line" for JSON
lines, "path:index" for the other files, "name[split]:index" for `datasets` datasets) and `row` is a dict.
All failures a user can cause end in one `DataError` naming the file (and line) and the fix.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any

from tidpo_cli.errors import DataError

SUPPORTED_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_EXTENSIONS)
# Suffixes that mark a string as a file path rather than a hub name ("org/name" never carries one).
_FILE_SUFFIXES = (*SUPPORTED_EXTENSIONS, ".gz", ".csv", ".tsv", ".txt", ".arrow", ".zip", ".tar", ".bz2",
                  ".xz", ".zst")
_PREVIEW_CHARS = 60

Rows = Iterator[tuple[str, dict]]


def read_rows(path: str | os.PathLike, split: str | None = None) -> Rows:
    """An iterator of `(where, row)` over a local file, a local dataset folder or a hub dataset.

    Local files go by extension (.jsonl, .jsonl.gz, .json, .parquet); `split` does not apply to them and
    is ignored. A directory, or a name that is not an existing path, goes through
    `datasets.load_dataset(path, split=split)`. Problems with the path itself (missing file, unknown
    extension, hub load failure) raise `DataError` here, before the first row; problems inside a file
    (malformed line, undecodable bytes, a row that is not an object) raise `DataError` while iterating.
    """
    name = os.fspath(path)
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return _read_with_datasets(name, local, split)
    if os.path.exists(local):
        return _read_local_file(name, local)
    if _looks_like_path(name):
        raise DataError(
            f"data file {name!r} does not exist (resolved to {os.path.abspath(local)}); it looks like a local "
            "path, so it is not treated as a hub dataset name"
        )
    return _read_with_datasets(name, name, split)


def _looks_like_path(name: str) -> bool:
    """True for strings a user meant as a file path; hub names are "name" or "org/name" without a suffix."""
    lowered = name.lower()
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") >= 2
        or lowered.endswith(_FILE_SUFFIXES)
    )


def _read_local_file(name: str, local: str) -> Rows:
    """Dispatch an existing file on its extension (case-insensitive)."""
    lowered = local.lower()
    if lowered.endswith(".jsonl.gz"):
        return _read_jsonl(name, local, compressed=True)
    if lowered.endswith(".jsonl"):
        return _read_jsonl(name, local, compressed=False)
    if lowered.endswith(".json"):
        return _read_json(name, local)
    if lowered.endswith(".parquet"):
        return _read_parquet(name, local)
    raise DataError(
        f"cannot read {name!r}: unsupported file type; supported files are {_SUPPORTED_TEXT} "
        "(or a directory / hub dataset name, loaded through the datasets library)"
    )


def _preview(text: str) -> str:
    """The start of a line, quoted, for error messages."""
    if len(text) > _PREVIEW_CHARS:
        return repr(text[:_PREVIEW_CHARS]) + "..."
    return repr(text)


def json_kind(value: Any) -> str:
    """JSON vocabulary for a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _read_jsonl(name: str, local: str, *, compressed: bool) -> Rows:
    """Open eagerly (so an unreadable file fails at once), then yield rows lazily."""
    try:
        handle = gzip.open(local, "rb") if compressed else open(local, "rb")
    except OSError as e:
        raise DataError(f"cannot open {name!r}: {e.strerror or e}") from None
    return _iter_jsonl(name, handle)


def _iter_jsonl(name: str, handle) -> Rows:
    """Yield `("name:line", row)` with 1-based line numbers; blank lines are skipped but counted."""
    with handle:
        lineno = 0
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as e:
                # gzip reports a corrupt or truncated stream only while reading.
                raise DataError(
                    f"cannot read {name!r} after line {lineno}: {e} (is it a complete gzip file?)"
                ) from None
            lineno += 1
            if raw.strip():  # a trailing newline or an empty line is not a row
                yield f"{name}:{lineno}", _parse_json_line(name, lineno, raw)


def _parse_json_line(name: str, lineno: int, raw: bytes) -> dict:
    """One JSON object from one line of bytes, or `DataError` naming the file and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name!r} line {lineno}: bytes that are not UTF-8 at column {e.start + 1}; "
            "JSON lines files must be UTF-8 text"
        ) from None
    if lineno == 1:
        text = text.removeprefix("\ufeff")  # editors on Windows write a byte-order mark
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"malformed JSON on line {lineno} of {name!r}: {e.msg} at column {e.colno}; "
            f"the line starts {_preview(text.strip())}"
        ) from None
    except RecursionError:
        raise DataError(f"{name!r} line {lineno}: JSON nested too deeply to read") from None
    if not isinstance(row, dict):
        raise DataError(
            f"{name!r} line {lineno}: expected one JSON object per line, got {json_kind(row)}; "
            f"the line starts {_preview(text.strip())}"
        )
    return row


def _read_json(name: str, local: str) -> Rows:
    """A whole-file JSON document: a list of objects, or an object with one list-valued key.

    A `.json` file that is really JSON lines (common on the hub) is read as JSON lines.
    """
    try:
        with open(local, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot open {name!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name!r} line {line}: bytes that are not UTF-8; JSON files must be UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Several top-level values: the file is JSON lines under a .json name.
            return _iter_jsonl(name, open(local, "rb"))
        raise DataError(
            f"malformed JSON on line {e.lineno} of {name!r}: {e.msg} at column {e.colno}"
        ) from None
    except RecursionError:
        raise DataError(f"{name!r}: JSON nested too deeply to read") from None
    items = _json_rows(name, doc)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{name!r} item {index}: expected a JSON object, got {json_kind(item)}")
    return ((f"{name}:{index}", item) for index, item in enumerate(items))


def _json_rows(name: str, doc: Any) -> list:
    """The list of rows inside a JSON document."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        list_keys = [key for key, value in doc.items() if isinstance(value, list)]
        if len(list_keys) == 1:
            return doc[list_keys[0]]
        if len(list_keys) > 1:
            raise DataError(
                f"{name!r} is a JSON object with several list-valued keys {list_keys}; expected a list of "
                "rows, or an object with exactly one list-valued key such as {\"data\": [...]}"
            )
    found = "an object with no list-valued key" if isinstance(doc, dict) else json_kind(doc)
    raise DataError(
        f"{name!r} holds {found}; expected a list of objects, or an object with one list-valued key "
        "such as {\"data\": [...]}"
    )


def _read_parquet(name: str, local: str) -> Rows:
    """Rows of a parquet file, read a record batch at a time so large files stay out of memory."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(local)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"cannot read {name!r} as parquet: {_one_line(e)}") from None

    def rows() -> Rows:
        index = 0
        for batch in parquet.iter_batches():
            for row in batch.to_pylist():
                yield f"{name}:{index}", row
                index += 1

    return rows()


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (hub errors are often several paragraphs)."""
    text = " ".join(str(error).split())
    text = text or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_with_datasets(name: str, source: str, split: str | None) -> Rows:
    """Rows of a local dataset folder or a hub dataset, via `datasets.load_dataset(source, split=split)`."""
    import datasets  # imported here: it is slow to import and only some runs need it

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - the library raises many types; all mean "cannot load"
        if os.path.isdir(source):
            hint = "a local folder is read by the datasets library from its data files (e.g. train.jsonl gives split 'train')"
        else:
            hint = f"no local file or folder has that name, and offline machines need a local file ({_SUPPORTED_TEXT})"
        raise DataError(
            f"cannot load dataset {name!r} (split {split!r}): {type(e).__name__}: {_one_line(e)}; {hint}"
        ) from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(loaded.keys())
        if len(splits) != 1:
            raise DataError(f"dataset {name!r} has splits {splits}; choose one (e.g. data.split=train)")
        split = splits[0]
        loaded = loaded[split]
    return ((f"{name}[{split}]:{index}", dict(row)) for index, row in enumerate(loaded))
