"""Turning raw rows of the three supported layouts into `PreferenceExample`s.

- `hh_rlhf`: `chosen` / `rejected` are whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..."; the prompt is
  the shared text up to and including the last "\\n\\nAssistant:".
- `prompt_chosen_rejected`: three strings; responses that repeat the prompt have it stripped. An optional fourth,
  `reference` (or `gold`), is a gold response (TPO's third one).
- `unpaired`: `prompt` and `completion` strings and a boolean `label` (true: desirable, false: undesirable),
  TRL's unpaired preference layout, for loss=kto.
- `conversational`: `chosen` / `rejected` are lists of {"role", "content"} messages, with an optional
  `prompt` (a message list, or a string meaning one user message); rendered with the chat template
  (chat.py).

Any pair format may mark the characters that decide the pair: optional `chosen_critical` / `rejected_critical`
columns, each a list of [start, end) character spans into that response's text: the `chosen` / `rejected`
string as written (for hh_rlhf the whole dialogue, for conversational rows the content of the reply, which must
then be one message). They become spans into the response tidpo trains on (`PreferenceExample.chosen_critical`),
for the `importance/critical_share` metric; a span that is not [start, end] with 0 <= start < end <= the text's
length, or lies in the prompt, makes the row bad.

A row that cannot be used raises `BadRow` with a short reason naming the key; a problem that makes the
whole run impossible (no chat template) raises `DataError`.
"""

from __future__ import annotations

from typing import Any

from tidpo_cli.data.chat import ChatOptions, RenderedPair, render_pair, require_template
from tidpo_cli.data.examples import BadRow, PreferenceExample, UnpairedExample
from tidpo_cli.data.readers import json_kind
from tidpo_cli.errors import DataError

FORMATS = ("hh_rlhf", "prompt_chosen_rejected", "conversational", "unpaired")
HH_ASSISTANT = "\n\nAssistant:"
_MAX_KEYS_SHOWN = 8
DEFAULT_CHAT = ChatOptions()

Message = dict[str, str]


def detect_format(row: dict) -> str:
    """The format of one row, from the types of its `prompt` / `chosen` / `rejected` values.

    prompt + chosen + rejected strings -> prompt_chosen_rejected; chosen / rejected lists ->
    conversational; chosen / rejected strings without a prompt -> hh_rlhf. Anything else raises
    `BadRow` naming the keys found and the layouts expected.
    """
    if not isinstance(row, dict):
        raise BadRow(f"row is {json_kind(row)}, expected an object")
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if "completion" in row and "label" in row and "chosen" not in row:
        return "unpaired"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            return "hh_rlhf"
        if isinstance(prompt, str):
            return "prompt_chosen_rejected"
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    keys = sorted(map(str, row))
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN]) + (", ..." if len(keys) > _MAX_KEYS_SHOWN else "")
    raise BadRow(
        f"cannot detect the format from keys [{shown}]: expected 'chosen' and 'rejected' as dialogue "
        "strings (hh_rlhf), with a 'prompt' string (prompt_chosen_rejected), or as message lists "
        "(conversational); or 'prompt', 'completion' and a true/false 'label' (unpaired)"
    )


def to_example(row: dict, fmt: str, tokenizer: Any, where: str,
               chat: ChatOptions = DEFAULT_CHAT) -> PreferenceExample | UnpairedExample:
    """Convert one row of format `fmt` (one of `FORMATS`) into a `PreferenceExample`.

    `tokenizer` and `chat` are only used by the conversational format (its chat template). Raises `BadRow` for
    a row that cannot be used, `DataError` for an unknown format, a tokenizer without a chat template, or chat
    options that text rows cannot honour.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")
    if fmt == "conversational":
        require_template(tokenizer, chat)
    elif chat.system_prompt is not None or chat.kwargs:
        key = "data.system_prompt" if chat.system_prompt is not None else "data.chat_template_kwargs"
        raise DataError(f"{key} is set, but the data is {fmt} text, which no chat template renders: unset {key}, "
                        "or use conversational rows (message lists)")
    if not isinstance(row, dict):
        raise BadRow(f"row is {json_kind(row)}, expected an object")
    if fmt == "unpaired":
        return _unpaired(row, where)
    if fmt == "hh_rlhf":
        prompt, chosen, rejected = _hh_rlhf(row)
    elif fmt == "prompt_chosen_rejected":
        prompt, chosen, rejected = _prompt_chosen_rejected(row)
    else:
        rendered, replies = _conversational(row, tokenizer, chat)
        _check_texts(rendered.prompt, rendered.chosen, rendered.rejected)
        return PreferenceExample(prompt=rendered.prompt, chosen=rendered.chosen, rejected=rendered.rejected,
                                 where=where, prompt_cut=rendered.prompt_cut,
                                 chosen_critical=_reply_critical(row, "chosen", replies[0], rendered.chosen),
                                 rejected_critical=_reply_critical(row, "rejected", replies[1], rendered.rejected))
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, where=where,
                             gold=_gold(row, prompt) if fmt == "prompt_chosen_rejected" else None,
                             chosen_critical=_text_critical(row, "chosen", chosen),
                             rejected_critical=_text_critical(row, "rejected", rejected))


def _spans(row: dict, key: str, length: int) -> tuple[tuple[int, int], ...] | None:
    """`row[key]` as [start, end) character spans into a text of `length` characters; None when absent or null."""
    value = row.get(key)
    if value is None:
        return None
    value = value.tolist() if hasattr(value, "tolist") else value  # parquet / datasets arrays
    if not isinstance(value, (list, tuple)):
        raise BadRow(f"{key!r} is {json_kind(value)}, expected a list of [start, end] character spans")
    spans = []
    for span in value:
        span = span.tolist() if hasattr(span, "tolist") else span
        if not (isinstance(span, (list, tuple)) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise BadRow(f"{key!r} holds a span that is not [start, end] with whole numbers")
        if not 0 <= span[0] < span[1] <= length:
            raise BadRow(f"{key!r} holds a span outside its text (0 <= start < end <= the text's length)")
        spans.append((span[0], span[1]))
    return tuple(spans)


def _text_critical(row: dict, side: str, response: str) -> tuple[tuple[int, int], ...] | None:
    """The `{side}_critical` spans of a text row (into the `side` string as written) as spans into `response`, the
    end of that string that follows the prompt."""
    key = f"{side}_critical"
    column = row[side]
    spans = _spans(row, key, len(column))
    if spans is None:
        return None
    shift = len(column) - len(response)
    if any(start < shift for start, _ in spans):
        raise BadRow(f"{key!r} marks characters of the prompt, not of the {side} response")
    return tuple((start - shift, end - shift) for start, end in spans)


def _reply_critical(row: dict, side: str, reply: list[Message], response: str) -> tuple[tuple[int, int], ...] | None:
    """The `{side}_critical` spans of a conversational row (into the reply message's content) as spans into
    `response`, the reply as the chat template renders it, which must hold that content exactly once."""
    key = f"{side}_critical"
    if row.get(key) is None:
        return None
    if len(reply) != 1:
        raise BadRow(f"{key!r} needs a {side} reply of one message")
    content = reply[0]["content"]
    spans = _spans(row, key, len(content))
    if not spans:
        return spans
    at = response.find(content)
    if at < 0 or response.find(content, at + 1) >= 0:
        raise BadRow(f"{key!r}: the {side} reply's content is not found exactly once in its chat-template rendering")
    return tuple((start + at, end + at) for start, end in spans)


def _gold(row: dict, prompt: str) -> str | None:
    """The row's gold response (TPO: TRL's `reference` column, or `gold`), if it has one."""
    key = next((k for k in ("reference", "gold") if k in row), None)
    if key is None:
        return None
    gold = _string(row, key)
    if prompt and gold.startswith(prompt) and gold != prompt:
        gold = gold[len(prompt):]
    if not gold:
        raise BadRow(f"empty {key!r} response")
    return gold


def _string(row: dict, key: str) -> str:
    """`row[key]`, which must be a string."""
    if key not in row:
        raise BadRow(f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"{key!r} is {json_kind(value)}, expected a string")
    return value


def _check_texts(prompt: str, chosen: str, rejected: str, prompt_key: str = "prompt") -> None:
    """Checks shared by every format, on the final prompt and response texts.

    A whitespace-only response is allowed on purpose: an assistant turn that says nothing (" " after
    "Assistant:") is a real choice in HH-RLHF's harmless data, and it still teaches "stop here" via EOS.
    """
    if not prompt.strip():
        raise BadRow(f"empty {prompt_key!r}")
    if not chosen:
        raise BadRow("empty 'chosen' response")
    if not rejected:
        raise BadRow("empty 'rejected' response")
    if chosen == rejected:
        raise BadRow("'chosen' and 'rejected' responses are identical")


def _hh_rlhf(row: dict) -> tuple[str, str, str]:
    """Split two whole dialogues at the last "\\n\\nAssistant:" of `chosen` into prompt and responses.

    The space that usually follows "Assistant:" stays at the start of each response, so that
    prompt + response reproduces the original text exactly.
    """
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("no '\\n\\nAssistant:' turn in 'chosen'")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise BadRow("chosen and rejected do not share a prompt")
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    _check_texts(prompt, chosen_response, rejected_response, prompt_key="chosen")
    return prompt, chosen_response, rejected_response


def _prompt_chosen_rejected(row: dict) -> tuple[str, str, str]:
    """Three strings; when both responses start with the prompt text (some datasets repeat it), strip it.

    Both must repeat it: a short prompt like "Hi" that happens to start one response ("Hi there!") is a
    coincidence, not a repetition.
    """
    prompt, chosen, rejected = _string(row, "prompt"), _string(row, "chosen"), _string(row, "rejected")
    if prompt and chosen.startswith(prompt) and rejected.startswith(prompt):
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    _check_texts(prompt, chosen, rejected)
    return prompt, chosen, rejected


def _unpaired(row: dict, where: str) -> UnpairedExample:
    """`prompt` and `completion` strings and a boolean `label`; a completion that repeats the prompt has it
    stripped, as in prompt_chosen_rejected."""
    prompt, completion = _string(row, "prompt"), _string(row, "completion")
    if "label" not in row:
        raise BadRow("missing key 'label'")
    label = row["label"]
    if not isinstance(label, bool):
        raise BadRow(f"'label' is {json_kind(label)}, expected true or false")
    if prompt and completion.startswith(prompt) and completion != prompt:
        completion = completion[len(prompt):]
    if not prompt.strip():
        raise BadRow("empty 'prompt'")
    if not completion:
        raise BadRow("empty 'completion'")
    return UnpairedExample(prompt=prompt, completion=completion, desirable=label, where=where)


def _messages(value: Any, key: str) -> list[Message]:
    """A validated list of {"role", "content"} messages, reduced to those two keys."""
    if not isinstance(value, list):
        raise BadRow(f"{key!r} is {json_kind(value)}, expected a list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(f"{key!r} message {index} is {json_kind(message)}, expected an object")
        for field in ("role", "content"):
            if field not in message:
                raise BadRow(f"{key!r} message {index} has no {field!r}")
            if not isinstance(message[field], str):
                raise BadRow(f"{key!r} message {index} {field!r} is {json_kind(message[field])}, expected a string")
        # Extra keys (names, ids) are dropped: prompt repetition is judged on role and content only.
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt_messages(row: dict) -> list[Message] | None:
    """The `prompt` key as messages: a string is one user message; absent or null means no prompt key."""
    prompt = row.get("prompt")
    if prompt is None:
        return None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("empty 'prompt'")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise BadRow(f"'prompt' is {json_kind(prompt)}, expected a string or a list of messages")
    messages = _messages(prompt, "prompt")
    if not any(message["content"].strip() for message in messages):
        raise BadRow("empty 'prompt'")
    return messages


def _reply(messages: list[Message], prompt: list[Message], key: str) -> list[Message]:
    """The reply part of a chosen/rejected list that holds the reply alone or repeats the prompt first."""
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if not messages:
        raise BadRow(f"{key!r} holds no reply")
    for message in messages:
        if message["role"] != "assistant":
            raise BadRow(
                f"{key!r} holds a {message['role']!r} message besides the prompt; expected only the "
                "assistant reply, or the prompt messages repeated first"
            )
    return messages


def _split_last_turn(messages: list[Message], key: str) -> tuple[list[Message], list[Message]]:
    """(prompt, reply) for a message list without a separate prompt: the reply is the last message."""
    if not messages:
        raise BadRow(f"{key!r} is an empty message list")
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"the last message of {key!r} is not an assistant message")
    return messages[:-1], messages[-1:]


def _conversational(row: dict, tokenizer: Any,
                    chat: ChatOptions) -> tuple[RenderedPair, tuple[list[Message], list[Message]]]:
    """The prompt messages and each reply, checked, then rendered with the chat template (chat.py); and the two
    replies' messages."""
    if "chosen" not in row:
        raise BadRow("missing key 'chosen'")
    if "rejected" not in row:
        raise BadRow("missing key 'rejected'")
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    prompt = _prompt_messages(row)
    if prompt is None:
        prompt, chosen_reply = _split_last_turn(chosen, "chosen")
        rejected_prompt, rejected_reply = _split_last_turn(rejected, "rejected")
        if prompt != rejected_prompt:
            raise BadRow("chosen and rejected do not share a prompt")
        if not prompt:
            raise BadRow("no prompt: no 'prompt' key and 'chosen' holds only the reply")
    else:
        chosen_reply, rejected_reply = _reply(chosen, prompt, "chosen"), _reply(rejected, prompt, "rejected")
    if not any(message["content"].strip() for message in prompt):
        raise BadRow("empty 'prompt'")
    for key, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not any(message["content"] for message in reply):
            raise BadRow(f"empty {key!r} reply")
    if chosen_reply == rejected_reply:
        raise BadRow("'chosen' and 'rejected' responses are identical")
    return render_pair(tokenizer, prompt, chosen_reply, rejected_reply, chat), (chosen_reply, rejected_reply)
