"""Row formats -> PreferenceExample, and prepare() over good, bad and random rows."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo_cli.data.examples import BadRow, PreferenceExample
from tidpo_cli.data.formats import FORMATS, detect_format, to_example
from tidpo_cli.data.prepare import prepare
from tidpo_cli.errors import DataError
from tidpo_cli.data.chat import ChatOptions
from tidpo_cli.tokenizer import build_byte_tokenizer


@functools.lru_cache(maxsize=1)
def tok():
    return build_byte_tokenizer()


def example(row: dict, fmt: str, tokenizer=None, chat: ChatOptions = ChatOptions()) -> PreferenceExample:
    return to_example(row, fmt, tokenizer if tokenizer is not None else tok(), "t.jsonl:1", chat)


def bad_reason(row: dict, fmt: str, tokenizer=None, chat: ChatOptions = ChatOptions()) -> str:
    with pytest.raises(BadRow) as info:
        example(row, fmt, tokenizer, chat)
    return str(info.value)


# --- hh_rlhf ---------------------------------------------------------------------------------------

HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Can you help me?\n\nAssistant:"


def test_hh_splits_at_last_assistant_and_keeps_the_space_in_the_response():
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Can you help me?\n\nAssistant: Sure, with what?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Can you help me?\n\nAssistant: No.",
    }
    ex = example(row, "hh_rlhf")
    assert ex.prompt == HH_PROMPT
    assert ex.chosen == " Sure, with what?"
    assert ex.rejected == " No."
    assert ex.where == "t.jsonl:1"


def test_hh_rejected_with_a_different_history_is_bad():
    row = {
        "chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
        "rejected": "\n\nHuman: A\n\nAssistant: X",
    }
    assert bad_reason(row, "hh_rlhf") == "chosen and rejected do not share a prompt"


def test_hh_without_assistant_turn_is_bad():
    assert "Assistant" in bad_reason({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: ho"}, "hh_rlhf")


def test_hh_identical_and_empty_responses_are_bad():
    same = "\n\nHuman: A\n\nAssistant: B"
    assert "identical" in bad_reason({"chosen": same, "rejected": same}, "hh_rlhf")
    assert "empty 'chosen'" in bad_reason({"chosen": "\n\nHuman: A\n\nAssistant:", "rejected": same}, "hh_rlhf")


def test_hh_assistant_turn_that_says_nothing_is_kept():
    # Four rows of the real harmless-base data prefer an empty assistant turn: " " after "Assistant:".
    ex = example({"chosen": "\n\nHuman: A\n\nAssistant: ", "rejected": "\n\nHuman: A\n\nAssistant: B"}, "hh_rlhf")
    assert (ex.prompt, ex.chosen, ex.rejected) == ("\n\nHuman: A\n\nAssistant:", " ", " B")


@pytest.mark.parametrize(
    "row, words",
    [
        ({"chosen": "\n\nHuman: A\n\nAssistant: B"}, "missing key 'rejected'"),
        ({"rejected": "x"}, "missing key 'chosen'"),
        ({"chosen": 3, "rejected": "x"}, "'chosen' is a number, expected a string"),
        ({"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": None}, "'rejected' is null, expected a string"),
    ],
)
def test_hh_missing_and_wrong_type(row, words):
    assert bad_reason(row, "hh_rlhf") == words


# --- prompt_chosen_rejected ------------------------------------------------------------------------


def test_pcr_plain_strings():
    ex = example({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}, "prompt_chosen_rejected")
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: 2+2?", " 4", " 5")


def test_pcr_repeated_prompt_is_stripped():
    ex = example({"prompt": "Q: 2+2?", "chosen": "Q: 2+2? 4", "rejected": "Q: 2+2? 5"}, "prompt_chosen_rejected")
    assert (ex.chosen, ex.rejected) == (" 4", " 5")


def test_pcr_prompt_starting_only_one_response_is_a_coincidence_not_a_repeat():
    ex = example({"prompt": "Hi", "chosen": "Hi there!", "rejected": "Hello."}, "prompt_chosen_rejected")
    assert (ex.chosen, ex.rejected) == ("Hi there!", "Hello.")


@pytest.mark.parametrize(
    "row, words",
    [
        ({"chosen": "a", "rejected": "b"}, "missing key 'prompt'"),
        ({"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' is a number, expected a string"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "'chosen' is a list, expected a string"),
        ({"prompt": "  \n", "chosen": "a", "rejected": "b"}, "empty 'prompt'"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty 'chosen' response"),
        ({"prompt": "p", "chosen": "pa", "rejected": "p"}, "empty 'rejected' response"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' responses are identical"),
    ],
)
def test_pcr_bad_rows(row, words):
    assert bad_reason(row, "prompt_chosen_rejected") == words


# --- detect_format ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"chosen": "a", "rejected": "b"}, "hh_rlhf"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "prompt_chosen_rejected"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "hh_rlhf"),
        ({"chosen": [], "rejected": []}, "conversational"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": []}, "conversational"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_names_keys_and_formats():
    with pytest.raises(BadRow) as info:
        detect_format({"question": "q", "answer": "a"})
    message = str(info.value)
    for word in ("'answer'", "'question'", "hh_rlhf", "prompt_chosen_rejected", "conversational"):
        assert word in message


def test_unknown_format_is_a_data_error():
    with pytest.raises(DataError, match="auto"):
        example({"chosen": "a", "rejected": "b"}, "alpaca")


# --- conversational (byte tokenizer template: "<|role|>\n{content}<|end|>\n") -----------------------


def test_ultrafeedback_binarized_row():
    row = {
        "prompt": "What is 2+2?",
        "prompt_id": "0f3a",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    }
    ex = example(row, "conversational")
    assert ex.prompt == "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    # The newline the template writes after the final <|end|> (= EOS) is not part of the response.
    assert ex.chosen == "4<|end|>"
    assert ex.rejected == "5<|end|>"


def test_prompt_message_list_and_reply_only_lists():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    ex = example(row, "conversational")
    assert ex.prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert (ex.chosen, ex.rejected) == ("Hello.<|end|>", "Go away.<|end|>")


def test_no_prompt_key_uses_all_but_the_last_message():
    history = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    row = {
        "chosen": history + [{"role": "assistant", "content": "yes"}],
        "rejected": history + [{"role": "assistant", "content": "no"}],
    }
    ex = example(row, "conversational")
    assert ex.prompt == "<|user|>\nA<|end|>\n<|assistant|>\nB<|end|>\n<|user|>\nC<|end|>\n<|assistant|>\n"
    assert (ex.chosen, ex.rejected) == ("yes<|end|>", "no<|end|>")


@pytest.mark.parametrize(
    "row, words",
    [
        (
            {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
            "chosen and rejected do not share a prompt",
        ),
        (
            {"chosen": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "A"}],
             "rejected": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "y"}]},
            "the last message of 'chosen' is not an assistant message",
        ),
        (
            {"prompt": "Q", "chosen": [{"role": "assistant", "content": 4}], "rejected": []},
            "'chosen' message 0 'content' is a number, expected a string",
        ),
        ({"prompt": "Q", "chosen": [{"content": "x"}], "rejected": []}, "'chosen' message 0 has no 'role'"),
        ({"prompt": "Q", "chosen": "x", "rejected": []}, "'chosen' is a string, expected a list of messages"),
        ({"prompt": "Q", "rejected": []}, "missing key 'chosen'"),
        ({"prompt": " ", "chosen": [], "rejected": []}, "empty 'prompt'"),
        (
            {"prompt": "Q", "chosen": [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "assistant", "content": "x"}]},
            "'chosen' and 'rejected' responses are identical",
        ),
        (
            {"prompt": "Q", "chosen": [{"role": "assistant", "content": ""}],
             "rejected": [{"role": "assistant", "content": "x"}]},
            "empty 'chosen' reply",
        ),
    ],
)
def test_conversational_bad_rows(row, words):
    assert bad_reason(row, "conversational") == words


def test_conversational_reply_holding_a_user_turn_is_bad():
    row = {
        "prompt": "Q",  # differs from the user turn the lists start with, so nothing is stripped
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "assistant", "content": "y"}],
    }
    assert "'user' message" in bad_reason(row, "conversational")


def test_tokenizer_without_chat_template_is_a_data_error():
    plain = build_byte_tokenizer()
    plain.chat_template = None
    row = {"prompt": "Q", "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match="chat template"):
        example(row, "conversational", plain)


def test_template_that_does_not_extend_the_prompt_is_bad_with_template_mismatch_error():
    odd = build_byte_tokenizer()
    # The generation prompt ends in "\n" but a rendered assistant turn has a space there instead.
    odd.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    row = {"prompt": "Q", "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    reason = bad_reason(row, "conversational", odd, ChatOptions(template_mismatch="error"))
    assert "does not extend the prompt" in reason and "data.template_mismatch=common_prefix" in reason
    # The default cuts the prompt back to what both renderings share: the "\n" after <|assistant|>.
    shortened = example(row, "conversational", odd)
    assert (shortened.prompt, shortened.prompt_cut) == ("<|user|> Q<|end|><|assistant|>", "\n")
    assert (shortened.chosen, shortened.rejected) == (" x<|end|>", " y<|end|>")


# --- prepare ---------------------------------------------------------------------------------------

GOOD = {
    "hh_rlhf": {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"},
    "prompt_chosen_rejected": {"prompt": "q", "chosen": "yes", "rejected": "no"},
    "conversational": {
        "prompt": "q",
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}],
    },
    "unpaired": {"prompt": "q", "completion": "yes", "label": True},
}


def run(rows, fmt="auto", **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return prepare([(f"d.jsonl:{i + 1}", row) for i, row in enumerate(rows)], fmt, tok(), **kw)


def test_prepare_counts_and_summary():
    rows = [GOOD["hh_rlhf"], {"chosen": "x"}, GOOD["hh_rlhf"], {"chosen": "no turn", "rejected": "b"}]
    pairs, report = run(rows)
    assert [p.where for p in pairs] == ["d.jsonl:1", "d.jsonl:3"]
    assert (report.rows, report.used, report.skipped, report.truncated) == (4, 2, 2, 0)
    assert report.first_skipped == ["d.jsonl:2: missing key 'rejected'", "d.jsonl:4: no '\\n\\nAssistant:' turn in 'chosen'"]
    assert report.summary() == (
        "read 4 rows from d.jsonl: used 2, skipped 2 (missing key 'rejected': 1; "
        "no '\\n\\nAssistant:' turn in 'chosen': 1), truncated 0"
    )


def test_prepare_auto_holds_the_first_detected_format():
    # The second row is a fine prompt_chosen_rejected row, but the data was detected as hh_rlhf.
    _, report = run([GOOD["hh_rlhf"], GOOD["prompt_chosen_rejected"]])
    assert report.fmt == "hh_rlhf"
    assert (report.used, report.skipped) == (1, 1)


def test_prepare_error_mode_names_row_reason_and_fix():
    with pytest.raises(DataError) as info:
        run([GOOD["hh_rlhf"], {"chosen": "x"}], on_bad_row="error")
    message = str(info.value)
    assert "d.jsonl:2" in message and "missing key 'rejected'" in message
    assert "data.on_bad_row=skip" in message


def test_prepare_all_bad_and_unknown_options():
    with pytest.raises(DataError, match="no usable rows.*missing key"):
        run([{"chosen": "x"}, {"chosen": "y"}], fmt="hh_rlhf")
    with pytest.raises(DataError, match="no rows"):
        run([])
    with pytest.raises(DataError) as info:
        run([GOOD["hh_rlhf"]], fmt="sharegpt")
    assert all(name in str(info.value) for name in (*FORMATS, "auto"))
    with pytest.raises(DataError, match="on_bad_row"):
        run([GOOD["hh_rlhf"]], on_bad_row="ignore")
    with pytest.raises(ValueError):
        run([GOOD["hh_rlhf"]], max_length=8, max_prompt_length=8)


def test_prepare_max_rows_stops_reading():
    def rows():
        for i in range(3):
            yield f"d.jsonl:{i + 1}", GOOD["hh_rlhf"]
        raise AssertionError("read past max_rows")

    pairs, report = prepare(rows(), "auto", tok(), max_length=64, max_prompt_length=32, max_rows=3)
    assert (len(pairs), report.rows) == (3, 3)


def test_prepare_no_chat_template_stops_even_when_skipping():
    plain = build_byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        prepare([("d:1", GOOD["conversational"])], "auto", plain, max_length=64, max_prompt_length=32)


# --- property: malformed rows are counted, never crash ---------------------------------------------

_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
# Keys of junk objects are at most 5 characters, so junk can never form a {"role", "content"} message.
junk = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)
non_string = junk.filter(lambda v: not isinstance(v, str))
non_list = junk.filter(lambda v: not isinstance(v, list))
blank = st.sampled_from(["", " ", "\n", " \t\n"])
no_assistant = st.text(max_size=20).filter(lambda s: "\n\nAssistant:" not in s)


def _with(fmt: str, **changes) -> dict:
    row = dict(GOOD[fmt])
    row.update(changes)
    return row


def _without(fmt: str, key: str) -> dict:
    return {k: v for k, v in GOOD[fmt].items() if k != key}


hh_bad = st.one_of(
    st.sampled_from(["chosen", "rejected"]).map(lambda k: _without("hh_rlhf", k)),
    st.tuples(st.sampled_from(["chosen", "rejected"]), non_string).map(lambda kv: _with("hh_rlhf", **{kv[0]: kv[1]})),
    no_assistant.map(lambda s: _with("hh_rlhf", chosen=s)),
    st.just(_with("hh_rlhf", rejected="\n\nHuman: other\n\nAssistant: no")),
    st.just(_with("hh_rlhf", chosen="\n\nHuman: q\n\nAssistant:")),
    st.just(_with("hh_rlhf", rejected=GOOD["hh_rlhf"]["chosen"])),
)
pcr_bad = st.one_of(
    st.sampled_from(["prompt", "chosen", "rejected"]).map(lambda k: _without("prompt_chosen_rejected", k)),
    st.tuples(st.sampled_from(["prompt", "chosen", "rejected"]), non_string.filter(lambda v: v is not None)).map(
        lambda kv: _with("prompt_chosen_rejected", **{kv[0]: kv[1]})
    ),
    blank.map(lambda s: _with("prompt_chosen_rejected", prompt=s)),
    st.sampled_from(["chosen", "rejected"]).map(lambda k: _with("prompt_chosen_rejected", **{k: ""})),
    st.just(_with("prompt_chosen_rejected", rejected="yes")),
)
conv_bad = st.one_of(
    st.sampled_from(["chosen", "rejected"]).map(lambda k: _without("conversational", k)),
    st.tuples(st.sampled_from(["chosen", "rejected"]), non_list).map(lambda kv: _with("conversational", **{kv[0]: kv[1]})),
    st.tuples(st.sampled_from(["chosen", "rejected"]), st.lists(junk, max_size=3)).map(
        lambda kv: _with("conversational", **{kv[0]: kv[1]})
    ),
    blank.map(lambda s: _with("conversational", prompt=s)),
    non_string.filter(lambda v: v is not None and not isinstance(v, list)).map(lambda v: _with("conversational", prompt=v)),
    st.just(_with("conversational", rejected=GOOD["conversational"]["chosen"])),
    st.just(_with("conversational", prompt=None, chosen=[{"role": "user", "content": "q"}])),
)
# Objects with none of the keys every format needs.
keyless = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("chosen", "rejected")), junk, max_size=4)
unpaired_bad = st.one_of(
    st.sampled_from(["prompt", "completion", "label"]).map(lambda k: _without("unpaired", k)),
    st.tuples(st.sampled_from(["prompt", "completion"]), non_string).map(lambda kv: _with("unpaired", **{kv[0]: kv[1]})),
    junk.filter(lambda v: not isinstance(v, bool)).map(lambda v: _with("unpaired", label=v)),
    blank.map(lambda s: _with("unpaired", prompt=s)),
    st.just(_with("unpaired", completion="")),
)
bad_rows = st.one_of(hh_bad, pcr_bad, conv_bad, unpaired_bad, keyless)
BAD_FOR = {"hh_rlhf": hh_bad, "prompt_chosen_rejected": pcr_bad, "conversational": conv_bad, "unpaired": unpaired_bad}


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_prepare_counts_every_bad_row_next_to_one_good_row(fmt, data):
    bad = data.draw(st.lists(st.one_of(BAD_FOR[fmt], keyless), min_size=1, max_size=8))
    rows = list(bad)
    rows.insert(data.draw(st.integers(0, len(bad))), GOOD[fmt])
    pairs, report = run(rows, fmt=fmt)
    assert (report.rows, report.used, report.skipped) == (len(rows), 1, len(bad))
    assert sum(report.skip_reasons.values()) == len(bad)
    assert len(report.first_skipped) == min(5, len(bad))
    assert len(pairs) == 1


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from((*FORMATS, "auto")), rows=st.lists(bad_rows, min_size=1, max_size=8))
def test_prepare_all_bad_rows_raise_only_data_error(fmt, rows):
    with pytest.raises(DataError) as info:
        run(rows, fmt=fmt)
    assert f"all {len(rows)} rows were bad" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(good=st.sampled_from(FORMATS), bad=st.lists(bad_rows, max_size=8))
def test_prepare_auto_after_a_good_first_row(good, bad):
    _, report = run([GOOD[good], *bad])
    assert (report.fmt, report.used, report.skipped) == (good, 1, len(bad))


def test_a_gold_reference_response_is_read_and_tokenized_as_a_third_response():
    """TPO's gold response: prompt_chosen_rejected rows may carry `reference` (TRL's column) or `gold`; empty is a
    bad row; a batch whose pairs lack one has the chosen response in its place."""
    from tidpo_cli.data.collate import collate
    from tidpo_cli.data.tokenize import tokenize_example

    row = {"prompt": "Q:", "chosen": " a", "rejected": " b", "reference": "Q: gold"}
    ex = to_example(row, "prompt_chosen_rejected", None, "f:1")
    assert ex.gold == " gold"  # a repeated prompt is stripped as from the other responses
    plain = {k: v for k, v in row.items() if k != "reference"}
    assert to_example({**plain, "gold": " g"}, "prompt_chosen_rejected", None, "f:1").gold == " g"
    assert to_example(plain, "prompt_chosen_rejected", None, "f:1").gold is None
    with pytest.raises(BadRow, match="empty 'reference' response"):
        to_example({**row, "reference": ""}, "prompt_chosen_rejected", None, "f:1")
    tokenizer = build_byte_tokenizer()
    with_gold = tokenize_example(ex, tokenizer, 64, 32)
    without = tokenize_example(to_example(plain, "prompt_chosen_rejected", None, "f:2"), tokenizer, 64, 32)
    assert with_gold.gold_ids[-1] == tokenizer.eos_token_id and without.gold_ids is None
    batch = collate([with_gold, without], tokenizer.pad_token_id)
    assert batch["gold_input_ids"].shape[0] == 2
    assert batch["gold_labels"][1][batch["gold_labels"][1] != -100].tolist() == without.chosen_ids
    assert batch["gold_labels"][0][batch["gold_labels"][0] != -100].tolist() == with_gold.gold_ids
