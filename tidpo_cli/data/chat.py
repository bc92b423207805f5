"""Conversational rows through a chat template: the prompt as the model sees it before replying, and each reply
as the text that follows it.

The prompt is rendered alone with the generation prompt, and prompt + reply as a whole conversation; the reply
is what the conversation adds after the prompt. Some templates render the prompt alone differently from the
start of the conversation (newer reasoning models open an empty thought block in the generation prompt that a
rendered assistant turn does not hold). `template_mismatch="common_prefix"` then cuts the prompt back to what
both renderings share, measured in tokens as TRL's DPOTrainer does: a cut measured in characters could end
inside a token ("<think>" and "<tool_call>" share "<t"), which would split that token in two. The cut is placed
at a token boundary of the rendered prompt and checked to give the same tokens as the start of the prompt's
own tokens, so the prompt ids are exactly those TRL keeps.
"""

from __future__ import annotations

import json
import os.path
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidpo_cli.data.examples import BadRow
from tidpo_cli.errors import DataError

MISMATCH = ("common_prefix", "error")
# apply_chat_template arguments tidpo sets itself; data.chat_template_kwargs may not hold them.
_OWN_ARGUMENTS = ("conversation", "tokenize", "add_generation_prompt", "chat_template", "continue_final_message",
                  "return_dict", "return_tensors")

Message = dict[str, str]


@dataclass(frozen=True)
class ChatOptions:
    """How conversational rows are rendered (the data.* keys of the same names)."""

    template: str | None = None                            # replaces the tokenizer's chat template
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra template variables (enable_thinking, ...)
    system_prompt: str | None = None                       # put in front of prompts without a system message
    template_mismatch: str = "common_prefix"               # or "error": refuse such rows as before


@dataclass(frozen=True)
class RenderedPair:
    prompt: str
    chosen: str
    rejected: str
    prompt_cut: str  # the end of the rendered prompt left out of the training sequence ("" when none)


def chat_options(data_cfg: Any) -> ChatOptions:
    """The ChatOptions of a data config (absent keys, as in a run of an older tidpo, take their defaults).

    `data.chat_template` is the Jinja text itself when it holds "{{" or "{%", otherwise a file: a template
    (.jinja or any text) or a chat_template.json as models ship it. Raises DataError naming the key.
    """
    def get(name: str, default: Any = None) -> Any:
        value = data_cfg.get(name, default) if hasattr(data_cfg, "get") else getattr(data_cfg, name, default)
        return default if value is None else value

    mismatch = get("template_mismatch", "common_prefix")
    if mismatch not in MISMATCH:
        raise DataError(f"data.template_mismatch={mismatch!r} is not allowed: expected one of {', '.join(MISMATCH)}")
    kwargs = get("chat_template_kwargs", {})
    kwargs = dict(kwargs.items()) if hasattr(kwargs, "items") else kwargs
    if not isinstance(kwargs, dict):
        raise DataError(f"data.chat_template_kwargs must be a mapping, e.g. {{enable_thinking: false}}; got {kwargs!r}")
    taken = sorted(set(kwargs) & set(_OWN_ARGUMENTS))
    if taken:
        raise DataError(f"data.chat_template_kwargs sets {', '.join(taken)}, which tidpo sets itself when it renders "
                        "the prompt and the conversation: remove it")
    system = get("system_prompt")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise DataError(f"data.system_prompt must be non-empty text or null, got {system!r}")
    template = get("chat_template")
    return ChatOptions(template=None if template is None else _template_text(str(template)), kwargs=kwargs,
                       system_prompt=system, template_mismatch=mismatch)


def _template_text(value: str) -> str:
    """The Jinja text of data.chat_template: the value itself, or the file it names; its syntax checked."""
    if "{{" in value or "{%" in value:
        text = value
    else:
        path = Path(value).expanduser()
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.chat_template: cannot read '{value}' ({getattr(e, 'strerror', None) or e}): give "
                            "a Jinja template file, a chat_template.json, or the template text itself") from None
        text = raw
        if path.suffix == ".json":
            try:
                text = json.loads(raw)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"data.chat_template: {value} is not a chat_template.json (an object with a "
                                "'chat_template' string)") from None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"data.chat_template: {value} holds no template")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # the environment transformers renders templates in, with the extension its templates use
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as e:
        raise DataError(f"data.chat_template: the template does not parse (line {e.lineno}: {e.message})") from None
    return text


def require_template(tokenizer: Any, options: ChatOptions) -> None:
    """Conversational data cannot be rendered at all without a chat template: a run-level error."""
    if options.template is None and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "conversational data (message lists) needs a chat template, and this tokenizer has none; use a "
            "chat/instruct model's tokenizer, give one with data.chat_template=FILE, or convert the data to "
            "prompt/chosen/rejected strings"
        )


def render_pair(tokenizer: Any, prompt: list[Message], chosen: list[Message], rejected: list[Message],
                options: ChatOptions) -> RenderedPair:
    """Prompt text (with the generation prompt) and the two response texts of one conversational pair."""
    prompt_text, prompt = _rendered_prompt(tokenizer, prompt, options)
    fulls = [render(tokenizer, prompt + reply, options, add_generation_prompt=False) for reply in (chosen, rejected)]
    cut = len(prompt_text)
    if not all(full.startswith(prompt_text) for full in fulls):
        if options.template_mismatch == "error":
            raise BadRow(
                "the chat template does not extend the prompt: rendering prompt + reply does not start with the "
                "rendered prompt (with generation prompt); data.template_mismatch=common_prefix trains on such rows"
            )
        cut = _common_prefix_cut(tokenizer, prompt_text, fulls)
        if cut == 0:
            raise BadRow("the chat template renders the prompt alone and the conversation with nothing in common")
    responses = [_until_eos(tokenizer, full[cut:]) for full in fulls]
    return RenderedPair(prompt_text[:cut], responses[0], responses[1], prompt_cut=prompt_text[cut:])


def render(tokenizer: Any, messages: list[Message], options: ChatOptions, *, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`; a template that rejects them makes the row bad."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=options.template, **options.kwargs)
    except TemplateError as e:
        raise BadRow(f"the chat template rejected the messages: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"tokenizer.apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def _rendered_prompt(tokenizer: Any, prompt: list[Message], options: ChatOptions) -> tuple[str, list[Message]]:
    """The prompt's text with the generation prompt, and its messages: data.system_prompt in front, unless the
    prompt has a system message of its own.

    A template that refuses a system message, or renders none, cannot honour the option: a run-level error
    rather than every row skipped or the instruction silently lost.
    """
    if options.system_prompt is None or any(m["role"] == "system" for m in prompt):
        return render(tokenizer, prompt, options, add_generation_prompt=True), prompt
    with_system = [{"role": "system", "content": options.system_prompt}, *prompt]
    try:
        rendered = render(tokenizer, with_system, options, add_generation_prompt=True)
    except BadRow as e:
        render(tokenizer, prompt, options, add_generation_prompt=True)  # a row the template refuses anyway stays bad
        raise DataError(f"data.system_prompt: the chat template refuses a system message ({str(e).split(': ', 1)[-1]}); "
                        "unset data.system_prompt, or put the instruction in the prompt itself") from None
    if options.system_prompt not in rendered:
        raise DataError("data.system_prompt: the chat template does not render a system message (the text is "
                        "missing from the rendered prompt); unset data.system_prompt, or use a template with a "
                        "system role")
    return rendered, with_system


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _common_prefix_cut(tokenizer: Any, prompt_text: str, fulls: list[str]) -> int:
    """Where to cut the rendered prompt so that it starts every rendered conversation: at the first token of the
    prompt that a conversation's tokens do not share, moved back while the text there is not shared or would
    tokenize differently."""
    try:
        encoded = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: the shared characters
        return len(os.path.commonprefix([prompt_text, *fulls]))
    ids, offsets = list(encoded.input_ids), list(encoded.offset_mapping)
    shared = min(len(os.path.commonprefix([ids, _ids(tokenizer, full)])) for full in fulls)
    for k in range(shared, 0, -1):
        cut = offsets[k][0] if k < len(ids) else len(prompt_text)
        kept = prompt_text[:cut]
        if all(full.startswith(kept) for full in fulls) and _ids(tokenizer, kept) == ids[:k]:
            return cut
    return 0


def _until_eos(tokenizer: Any, response: str) -> str:
    """Templates write a newline (or other whitespace) after the end-of-turn token; when that token is EOS the
    response stops there, so the model learns to stop at EOS rather than to write whitespace after it."""
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos and response.rstrip().endswith(eos):
        return response.rstrip()
    return response
