"""A byte-level tokenizer built in code, with a chat template: the offline default, no download.

Every UTF-8 byte is one token (256 ids), followed by a handful of special tokens. It is a real
`PreTrainedTokenizerFast`: `save_pretrained` writes a `tokenizer.json` that `AutoTokenizer` loads back.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# One turn is "<|role|>\n{content}<|end|>\n"; the end-of-turn token is also EOS, as in Llama-3-Instruct.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _byte_level_chars() -> list[str]:
    """The character the ByteLevel pre-tokenizer uses for each byte 0..255, so that token id == byte.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer: ids 0-255 are bytes, then PAD, BOS, EOS and the chat role tokens.

    It adds BOS in front of every encoded text (like Llama's tokenizers) and never adds EOS itself.
    """
    vocab = {ch: byte for byte, ch in enumerate(_byte_level_chars())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
