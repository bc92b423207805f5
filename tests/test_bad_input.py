"""Bad input as a user meets it: one clear line naming the file, row or key and the fix, exit code 2."""

import gzip
import json

import pytest

from helpers import QUICK, run_tidpo
from tidpo_cli.tokenizer import build_byte_tokenizer

TRAIN = [a for a in QUICK if not a.startswith("data.synthetic")]
GOOD = {"prompt": "Say hi", "chosen": " hi", "rejected": " bye"}


def write_jsonl(path, rows, raw_lines=()):
    text = "".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines)
    path.write_text(text)
    return path


def assert_clear_error(result, *needles):
    assert result.returncode == 2, (result.stdout[-1500:], result.stderr[-1500:])
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("tidpo: error: ")]
    assert len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


def train_on(tmp_path, path, *extra):
    return run_tidpo(["train", "data=preference", f"data.path={path}", *TRAIN, "data.eval_size=2", *extra],
                     cwd=tmp_path)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD] * 20, raw_lines=['{"prompt": "x", "chosen": \n'])
    assert_clear_error(train_on(tmp_path, path), "pairs.jsonl", "21")


def test_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join((json.dumps(GOOD) + "\n").encode() for _ in range(20)) + b'{"prompt": "\xff\xfe"}\n')
    assert_clear_error(train_on(tmp_path, path), "pairs.jsonl", "21")


@pytest.mark.parametrize("bad_row,reason", [
    ({"prompt": "p", "chosen": " a"}, "rejected"),                         # missing column
    ({"prompt": "p", "chosen": " a", "rejcted": " b"}, "rejected"),        # misspelt column
    ({"prompt": "p", "chosen": 3, "rejected": " b"}, "chosen"),            # wrong type
    ({"prompt": "p", "chosen": "", "rejected": " b"}, "chosen"),           # empty string
])
def test_bad_rows_are_counted_or_stop_the_run_naming_the_row(tmp_path, bad_row, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD] * 20 + [bad_row])
    skipped = train_on(tmp_path, path, "trainer.max_steps=1")
    assert skipped.returncode == 0, skipped.stderr[-1500:]
    assert "skipped 1" in skipped.stdout and reason in skipped.stdout and "pairs.jsonl:21" in skipped.stdout
    assert_clear_error(train_on(tmp_path, path, "data.on_bad_row=error"), "pairs.jsonl", "21", reason,
                       "data.on_bad_row=skip")


def test_long_prompts_are_truncated_and_counted(tmp_path):
    long_prompt = dict(GOOD, prompt="word " * 200)
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD] * 20 + [long_prompt] * 3)
    result = train_on(tmp_path, path, "data.max_length=64", "data.max_prompt_length=32", "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-1500:]
    assert "truncated 3" in result.stdout


def test_unknown_format_and_unknown_extension(tmp_path):
    assert_clear_error(run_tidpo(["train", "data.format=csv"], cwd=tmp_path), "data.format", "hh_rlhf")
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n")
    assert_clear_error(train_on(tmp_path, path), "pairs.csv", ".jsonl")


def test_conversational_data_needs_a_chat_template(tmp_path):
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain_tokenizer")
    rows = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}] * 20
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run_tidpo(["train", "data.format=conversational", f"data.path={path}", *TRAIN, "data.eval_size=2",
                        f"model.tokenizer={tmp_path / 'plain_tokenizer'}"], cwd=tmp_path)
    assert_clear_error(result, "chat template")


def test_gzipped_jsonl_trains(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(GOOD) + "\n" for _ in range(20))
    result = train_on(tmp_path, path, "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-1500:]


def test_an_empty_data_file_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    result = train_on(tmp_path, path)
    assert_clear_error(result, str(path), "empty")
