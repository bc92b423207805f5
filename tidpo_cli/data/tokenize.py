"""Token ids for one preference pair: BOS / EOS handling and truncation to the length limits."""

from __future__ import annotations

import weakref
from typing import Any

from tidpo_cli.data.examples import (BadRow, PreferenceExample, TokenizedExample, TokenizedPair,
                                     UnpairedExample)
from tidpo_cli.errors import DataError

# Whether a tokenizer adds BOS on its own, checked once per tokenizer object.
_ADDS_BOS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """Both limits positive and the prompt limit below the total, else ValueError."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"data.max_prompt_length ({max_prompt_length}) must be less than data.max_length ({max_length}): "
            "the responses need room after the prompt"
        )


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts BOS in front of text on its own (as Llama's do)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    result = bos is not None and len(ids) > 0 and ids[0] == bos
    try:
        _ADDS_BOS[tokenizer] = result
    except TypeError:  # not weak-referenceable: just check again next time
        pass
    return result


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def critical_tokens(tokenizer: Any, text: str, spans: tuple[tuple[int, int], ...], kept: int) -> tuple[int, ...]:
    """The indices, below `kept` (the tokens left after truncation), of the tokens of `text` (tokenized as a response
    is: no special tokens added) whose characters overlap a [start, end) span of `spans`: token i, covering the
    characters [a, b) by the tokenizer's offsets, when a < end and start < b for some span."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        raise DataError("chosen_critical / rejected_critical need a tokenizer with character offsets (a fast one): "
                        "this tokenizer has none; drop those columns") from None
    return tuple(i for i, (a, b) in enumerate(offsets[:kept]) if any(a < end and start < b for start, end in spans))


def _cut_prompt(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """Keep the END of the prompt (the question nearest the response), and a leading BOS if there is one."""
    if len(ids) <= limit:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + (ids[len(ids) - (limit - 1):] if limit > 1 else [])
    return ids[len(ids) - limit:]


def tokenize_example(ex: PreferenceExample | UnpairedExample, tokenizer: Any, max_length: int,
                     max_prompt_length: int) -> TokenizedPair | TokenizedExample:
    """Tokenize prompt and responses separately and fit them to the limits.

    The prompt gets one BOS in front when the tokenizer normally adds one (never a second, as chat
    templates often render it as text); each response ends with exactly one EOS. The prompt is cut from
    the left to `max_prompt_length`, then each response from the right so that prompt + response
    <= `max_length`; a cut response keeps no EOS, since it did not end there.
    Raises ValueError for inconsistent limits and `BadRow` when a response would have no tokens. A response
    with critical character spans gets its critical tokens (`critical_tokens`; none among a cut response's
    dropped tokens or its EOS).
    """
    check_lengths(max_length, max_prompt_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    truncated = False

    prompt = _ids(tokenizer, ex.prompt)
    if adds_bos(tokenizer) and (not prompt or prompt[0] != bos):
        prompt = [bos] + prompt
    if len(prompt) > max_prompt_length:
        prompt = _cut_prompt(prompt, max_prompt_length, bos)
        truncated = True

    responses = []
    sides = ((("completion", ex.completion),) if isinstance(ex, UnpairedExample)
             else (("chosen", ex.chosen), ("rejected", ex.rejected)) + ((("gold", ex.gold),) if ex.gold else ()))
    spans = {} if isinstance(ex, UnpairedExample) else {"chosen": ex.chosen_critical, "rejected": ex.rejected_critical}
    critical = {}
    for side, text in sides:
        ids = _ids(tokenizer, text)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if not ids:
            raise BadRow(f"the {side} response has no tokens")
        room = max_length - len(prompt)
        if room <= 0:
            raise BadRow("prompt leaves no room for the response: raise data.max_length or lower data.max_prompt_length")
        if len(ids) > room:
            ids = ids[:room]
            truncated = True
        responses.append(ids)
        if spans.get(side) is not None:
            critical[side] = critical_tokens(tokenizer, text, spans[side], len(ids))

    if isinstance(ex, UnpairedExample):
        return TokenizedExample(prompt_ids=prompt, completion_ids=responses[0], desirable=ex.desirable,
                                where=ex.where, truncated=truncated)
    return TokenizedPair(
        prompt_ids=prompt, chosen_ids=responses[0], rejected_ids=responses[1], where=ex.where, truncated=truncated,
        gold_ids=responses[2] if ex.gold else None, critical=(critical.get("chosen"), critical.get("rejected")),
    )
