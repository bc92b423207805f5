"""Tokenisation with BOS/EOS and truncation, and collation, with exact hand-written ids.

Byte tokenizer: a character's id is its byte value; PAD 256, BOS 257, EOS 258, <|user|> 260, <|assistant|> 261.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import BadRow, PreferenceExample, TokenizedPair
from tidpo_cli.data.prepare import prepare
from tidpo_cli.data.tokenize import tokenize_example
from tidpo_cli.tokenizer import build_byte_tokenizer

PAD, BOS, EOS, USER, ASSISTANT = 256, 257, 258, 260, 261
NL = 10


@functools.lru_cache(maxsize=1)
def tok():
    return build_byte_tokenizer()


def tokenize(prompt, chosen, rejected, max_length=64, max_prompt_length=32, tokenizer=None):
    ex = PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, where="f.jsonl:3")
    return tokenize_example(ex, tokenizer or tok(), max_length, max_prompt_length)


def test_byte_tokenizer_ids_are_what_these_tests_assume():
    t = tok()
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (PAD, BOS, EOS)
    assert t.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [USER, ASSISTANT]


def test_bos_in_front_of_prompt_and_eos_after_each_response():
    pair = tokenize("Hi", "ok", "no")
    assert pair == TokenizedPair(
        prompt_ids=[BOS, 72, 105], chosen_ids=[111, 107, EOS], rejected_ids=[110, 111, EOS],
        where="f.jsonl:3", truncated=False,
    )


def test_no_double_bos_when_the_prompt_text_renders_it():
    assert tokenize("<|bos|>Hi", "ok", "no").prompt_ids == [BOS, 72, 105]


def test_no_double_eos_when_the_response_ends_with_it():
    pair = tokenize("Hi", "ok<|end|>", "no")
    assert pair.chosen_ids == [111, 107, EOS]
    assert pair.rejected_ids == [110, 111, EOS]


def test_prompt_is_cut_from_the_left_keeping_bos():
    # [BOS a b c d e f] -> 4 tokens: BOS and the last three bytes.
    pair = tokenize("abcdef", "x", "y", max_length=10, max_prompt_length=4)
    assert pair.prompt_ids == [BOS, 100, 101, 102]
    assert (pair.chosen_ids, pair.rejected_ids) == ([120, EOS], [121, EOS])
    assert pair.truncated


def test_responses_are_cut_from_the_right_without_eos():
    # prompt [BOS H i] leaves 7 - 3 = 4 tokens: "hello"+EOS is cut to "hell"; "abc"+EOS fits exactly.
    pair = tokenize("Hi", "hello", "abc", max_length=7, max_prompt_length=4)
    assert pair.prompt_ids == [BOS, 72, 105]
    assert pair.chosen_ids == [104, 101, 108, 108]
    assert pair.rejected_ids == [97, 98, 99, EOS]
    assert pair.truncated


def test_exact_fit_is_not_truncated():
    pair = tokenize("Hi", "abc", "ab", max_length=7, max_prompt_length=3)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([BOS, 72, 105], [97, 98, 99, EOS], [97, 98, EOS])
    assert not pair.truncated


def test_prompt_and_responses_cut_together():
    # prompt "<|bos|>" + "abcdef" -> [BOS d e f]; room 6 - 4 = 2: "xyz"+EOS -> "xy", "q"+EOS fits.
    pair = tokenize("<|bos|>abcdef", "xyz", "q", max_length=6, max_prompt_length=4)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([BOS, 100, 101, 102], [120, 121], [113, EOS])


def test_prompt_limit_of_one_keeps_only_bos():
    assert tokenize("abc", "x", "y", max_length=4, max_prompt_length=1).prompt_ids == [BOS]


@pytest.mark.parametrize("lengths", [(8, 8), (8, 9), (0, 0), (8, 0)])
def test_inconsistent_limits_raise_value_error(lengths):
    with pytest.raises(ValueError):
        tokenize("Hi", "a", "b", max_length=lengths[0], max_prompt_length=lengths[1])


class CharTokenizer:
    """A tokenizer that adds no BOS, has no EOS, and drops spaces: id = code point."""

    bos_token_id = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(c) for c in text if c != " "])


def test_tokenizer_without_bos_or_eos():
    pair = tokenize("abcdef", "xy", "z", max_length=6, max_prompt_length=3, tokenizer=CharTokenizer())
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([100, 101, 102], [120, 121], [122])


def test_response_with_no_tokens_is_a_bad_row():
    with pytest.raises(BadRow):
        tokenize("abc", "  ", "z", tokenizer=CharTokenizer())


def test_conversational_row_end_to_end():
    row = {
        "prompt": "Hi",
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}],
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    }
    (pair,), report = prepare([("u.parquet:0", row)], "auto", tok(), max_length=32, max_prompt_length=16)
    # "<|user|>\nHi<|end|>\n<|assistant|>\n" with BOS in front; "Yo<|end|>" ends with EOS already.
    assert pair.prompt_ids == [BOS, USER, NL, 72, 105, EOS, NL, ASSISTANT, NL]
    assert pair.chosen_ids == [89, 111, EOS]
    assert pair.rejected_ids == [78, 111, EOS]
    assert report.fmt == "conversational"


# --- collate ---------------------------------------------------------------------------------------

P1 = TokenizedPair(prompt_ids=[BOS, 72], chosen_ids=[1, EOS], rejected_ids=[2, 3, EOS], where="a:1", truncated=False)
P2 = TokenizedPair(prompt_ids=[BOS], chosen_ids=[4, 5, 6, EOS], rejected_ids=[7, EOS], where="a:2", truncated=False)
X = -100


def test_collate_chosen_rows_then_rejected_rows_right_padded():
    batch = collate([P1, P2], pad_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_lengths"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [
        [BOS, 72, 1, EOS, PAD],
        [BOS, 4, 5, 6, EOS],
        [BOS, 72, 2, 3, EOS],
        [BOS, 7, EOS, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [X, X, 1, EOS, X],
        [X, 4, 5, 6, EOS],
        [X, X, 2, 3, EOS],
        [X, 7, EOS, X, X],
    ]
    assert batch["prompt_lengths"].tolist() == [2, 1, 2, 1]


def test_collate_rejects_empty_batch_and_missing_pad():
    with pytest.raises(ValueError):
        collate([], pad_id=PAD)
    with pytest.raises(ValueError, match="pad"):
        collate([P1], pad_id=None)
