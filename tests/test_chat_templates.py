"""Conversational rows through chat templates written here, each mimicking one behaviour of today's instruct and
reasoning models: the end-of-turn EOS followed by a newline (ChatML), BOS rendered by the template, a generation
prompt that opens an empty thought block the rendered turn does not hold, a template that reads a variable, a
template without a system role. The tokenizer is a byte-level BPE trained here, so tokens span several
characters as a real model's do. Expected texts are written out by hand; the token ids of prompt, chosen and
rejected are checked exactly, and against TRL's DPOTrainer on the same rows where its rule is ours."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tidpo_cli.data.chat import ChatOptions, chat_options
from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import BadRow
from tidpo_cli.data.formats import to_example
from tidpo_cli.data.prepare import prepare
from tidpo_cli.data.tokenize import tokenize_example
from tidpo_cli.errors import DataError
from tidpo_cli.losses import IGNORE_INDEX

SPECIAL = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = ["What is two plus two? Four. Five. Four! It is four. Name a colour. Blue. Red. Be brief.",
          "user assistant system\n\nThe capital of France is Paris."]

TURN = "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
TEMPLATES = {
    # ChatML: each turn ends with the end-of-turn token, which is EOS, and a newline.
    "chatml": "{% for m in messages %}" + TURN + "{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # BOS written by the template itself (as Llama 3's does), for a tokenizer that also adds one to plain text.
    "bos": "{{ bos_token }}{% for m in messages %}" + TURN + "{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # A reasoning model's: the generation prompt opens an empty thought block that rendered turns do not hold.
    "thinking": "{% for m in messages %}" + TURN + "{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}",
    # One that reads a variable: with enable_thinking=false both the generation prompt and the assistant turns
    # hold the empty thought block, so the template extends the prompt either way.
    "kwarg": "{% set off = enable_thinking is defined and not enable_thinking %}"
             "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{% if m['role'] == 'assistant' and off %}<think>\n\n</think>\n\n{% endif %}"
             "{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% if off %}<think>\n\n</think>\n\n{% endif %}"
             "{% endif %}",
    # No system role: it refuses a system message, as some instruct models' templates do.
    "no_system": "{% for m in messages %}{% if m['role'] == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}" + TURN + "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # Another without one: it leaves system messages out silently.
    "drops_system": "{% for m in messages if m['role'] != 'system' %}" + TURN + "{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}

QUESTION = [{"role": "user", "content": "What is two plus two?"}]
ROW = {"prompt": QUESTION, "chosen": [{"role": "assistant", "content": "Four."}],
       "rejected": [{"role": "assistant", "content": "Five."}]}
USER_TURN = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
OPEN = "<|im_start|>assistant\n"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def bpe_json() -> str:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return core.to_str()


@pytest.fixture(scope="module")
def make_tokenizer(bpe_json):
    """template name -> a fresh tokenizer with that chat template; `adds_bos` puts BOS in front of plain text."""
    def make(template: str, *, adds_bos: bool = False) -> PreTrainedTokenizerFast:
        core = Tokenizer.from_str(bpe_json)
        if adds_bos:
            core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>",
                                            pad_token="<pad>")
        tokenizer.chat_template = TEMPLATES[template]
        return tokenizer
    return make


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def pair_of(tokenizer, row=ROW, chat=ChatOptions()):
    example = to_example(row, "conversational", tokenizer, "t.jsonl:1", chat)
    return example, tokenize_example(example, tokenizer, max_length=128, max_prompt_length=96)


def test_the_tokenizer_merges_characters_into_tokens(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    assert len(ids(tokenizer, "What is two plus two?")) < len("What is two plus two?") / 2
    assert ids(tokenizer, "<think>\n\n</think>")[0] == tokenizer.convert_tokens_to_ids("<think>")


# (template, tokenizer adds BOS, chat options) -> (prompt text, BOS in front, text cut from the rendered prompt)
CASES = {
    "chatml": ("chatml", False, ChatOptions(), USER_TURN + OPEN, False, ""),
    "bos_in_template_and_tokenizer": ("bos", True, ChatOptions(), "<s>" + USER_TURN + OPEN, False, ""),
    "bos_from_tokenizer_only": ("chatml", True, ChatOptions(), USER_TURN + OPEN, True, ""),
    "generation_prompt_differs": ("thinking", False, ChatOptions(), USER_TURN + OPEN, False, EMPTY_THOUGHT),
    "kwarg_read": ("kwarg", False, ChatOptions(kwargs={"enable_thinking": False}), USER_TURN + OPEN + EMPTY_THOUGHT,
                   False, ""),
    "kwarg_unset": ("kwarg", False, ChatOptions(), USER_TURN + OPEN, False, ""),
    "system_prompt": ("chatml", False, ChatOptions(system_prompt="Be brief."),
                      "<|im_start|>system\nBe brief.<|im_end|>\n" + USER_TURN + OPEN, False, ""),
    "no_system_role_without_one": ("no_system", False, ChatOptions(), USER_TURN + OPEN, False, ""),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_prompt_chosen_and_rejected_token_ids(case, make_tokenizer):
    template, adds_bos, chat, prompt_text, bos_added, cut = CASES[case]
    tokenizer = make_tokenizer(template, adds_bos=adds_bos)
    example, pair = pair_of(tokenizer, chat=chat)
    assert (example.prompt, example.chosen, example.rejected) == (prompt_text, "Four.<|im_end|>", "Five.<|im_end|>")
    assert example.prompt_cut == cut
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert pair.prompt_ids == [bos] * bos_added + ids(tokenizer, prompt_text)
    assert pair.prompt_ids.count(bos) == (1 if adds_bos else 0)  # one BOS, never two
    assert pair.chosen_ids == ids(tokenizer, "Four.") + [eos]  # EOS once; the newline after it is not trained
    assert pair.rejected_ids == ids(tokenizer, "Five.") + [eos]
    batch = collate([pair], tokenizer.pad_token_id)
    start = len(pair.prompt_ids)
    for row, response in enumerate((pair.chosen_ids, pair.rejected_ids)):
        trained = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert trained == list(range(start, start + len(response)))
        assert batch["input_ids"][row, start:start + len(response)].tolist() == response


def test_a_row_with_its_own_system_message_keeps_it_alone(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    own = {**ROW, "prompt": [{"role": "system", "content": "Be kind."}, *QUESTION]}
    example, _ = pair_of(tokenizer, own, ChatOptions(system_prompt="Be brief."))
    assert example.prompt == "<|im_start|>system\nBe kind.<|im_end|>\n" + USER_TURN + OPEN


@pytest.mark.parametrize("template, words", [("no_system", "refuses a system message"),
                                             ("drops_system", "does not render a system message")])
def test_a_system_prompt_the_template_cannot_render_stops_the_run(template, words, make_tokenizer):
    with pytest.raises(DataError, match=f"data.system_prompt: the chat template {words}"):
        pair_of(make_tokenizer(template), chat=ChatOptions(system_prompt="Be brief."))


def test_template_mismatch_error_refuses_the_row_and_names_the_other_choice(make_tokenizer):
    with pytest.raises(BadRow, match="does not extend the prompt.*data.template_mismatch=common_prefix"):
        pair_of(make_tokenizer("thinking"), chat=ChatOptions(template_mismatch="error"))


# Both replies open with text that shares its first characters with the thought block's "<think>" token.
INSIDE_A_TOKEN = {**ROW, "chosen": [{"role": "assistant", "content": "<thinking> Four."}],
                  "rejected": [{"role": "assistant", "content": "<thinking> Five."}]}


def test_the_cut_is_on_tokens_not_inside_one(make_tokenizer):
    """On characters the rendered prompt and both conversations share "...assistant\n<think": a cut there would
    leave "<think" at the end of the prompt and split the "<think>" token. On tokens they part at "<think>"."""
    tokenizer = make_tokenizer("thinking")
    example, pair = pair_of(tokenizer, INSIDE_A_TOKEN)
    assert (example.prompt, example.prompt_cut) == (USER_TURN + OPEN, EMPTY_THOUGHT)
    assert (example.chosen, example.rejected) == ("<thinking> Four.<|im_end|>", "<thinking> Five.<|im_end|>")
    assert pair.prompt_ids == ids(tokenizer, USER_TURN + OPEN)
    assert pair.chosen_ids == ids(tokenizer, "<thinking> Four.<|im_end|>")


def test_prepare_counts_the_rows_whose_prompt_was_shortened(make_tokenizer):
    tokenizer = make_tokenizer("thinking")
    rows = [(f"t.jsonl:{i + 1}", ROW) for i in range(3)]
    _, report = prepare(rows, "conversational", tokenizer, max_length=128, max_prompt_length=96)
    assert report.shortened == 3 and report.used == 3
    assert report.summary().endswith("prompt shortened 3 (chat template mismatch)")
    assert repr(EMPTY_THOUGHT) in report.mismatch_warning()
    _, plain = prepare(rows, "conversational", make_tokenizer("chatml"), max_length=128, max_prompt_length=96)
    assert plain.shortened == 0 and plain.mismatch_warning() is None and "shortened" not in plain.summary()


def test_chat_options_from_config(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATES["chatml"])
    shipped = tmp_path / "chat_template.json"
    shipped.write_text(json.dumps({"chat_template": TEMPLATES["thinking"]}))
    assert chat_options({"chat_template": str(template)}).template == TEMPLATES["chatml"]
    assert chat_options({"chat_template": str(shipped)}).template == TEMPLATES["thinking"]
    assert chat_options({"chat_template": TEMPLATES["bos"]}).template == TEMPLATES["bos"]
    assert chat_options({}) == ChatOptions()
    for cfg, words in [({"chat_template": str(tmp_path / "none.jinja")}, "cannot read"),
                       ({"chat_template": "{% for m in messages %}"}, "does not parse"),
                       ({"chat_template_kwargs": {"add_generation_prompt": True}}, "tidpo sets itself"),
                       ({"system_prompt": " "}, "non-empty"), ({"template_mismatch": "guess"}, "common_prefix")]:
        with pytest.raises(DataError, match=words):
            chat_options(cfg)


def test_chat_options_on_text_rows_are_refused(make_tokenizer):
    row = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    for chat, key in ((ChatOptions(system_prompt="Be brief."), "data.system_prompt"),
                      (ChatOptions(kwargs={"enable_thinking": False}), "data.chat_template_kwargs")):
        with pytest.raises(DataError, match=f"{key} is set, but the data is prompt_chosen_rejected text"):
            to_example(row, "prompt_chosen_rejected", make_tokenizer("chatml"), "t:1", chat)


# --- against TRL's DPOTrainer -------------------------------------------------------------------------------

TRL_ROWS = [
    ROW,
    {"prompt": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}],
     "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "It is four."}]},
    INSIDE_A_TOKEN,
]


@pytest.mark.parametrize("template, kwargs", [("chatml", {}), ("bos", {}), ("thinking", {}),
                                              ("kwarg", {"enable_thinking": False})])
def test_the_token_ids_are_trls(template, kwargs, make_tokenizer, tmp_path):
    """TRL (1.16) tokenises the prompt alone and prompt + reply with the template and starts the reply where
    they diverge; it keeps the newline after the end-of-turn EOS, which tidpo leaves out (the one difference,
    taken out here). The tokenizer adds no BOS of its own: tidpo would add one that TRL does not."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tidpo_cli.modeling import build_tiny_llama

    tokenizer = make_tokenizer(template)
    torch.manual_seed(0)
    model, reference = (build_tiny_llama({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "num_key_value_heads": 2}, tokenizer)
                        for _ in range(2))
    rows = [{**row, "chat_template_kwargs": kwargs} for row in TRL_ROWS]
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=None)
    theirs = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tokenizer).train_dataset
    chat = ChatOptions(kwargs=kwargs)
    eos = tokenizer.eos_token_id
    for index, row in enumerate(TRL_ROWS):
        _, ours = pair_of(tokenizer, row, chat)
        trl = theirs[index]
        assert ours.prompt_ids == trl["prompt_ids"], index
        for side in ("chosen_ids", "rejected_ids"):
            expected = trl[side][: len(trl[side]) - trl[side][::-1].index(eos)]  # up to its last EOS
            assert expected != trl[side] and getattr(ours, side) == expected, (index, side)


# --- a run -------------------------------------------------------------------------------------------------

BYTE_THINKING = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n<think>\n\n</think>\n\n{% endif %}")


def test_a_run_trains_on_a_template_that_renders_the_prompt_differently(tmp_path, caplog, capsys):
    """The case every conversational row used to be refused for: a generation prompt with an empty thought
    block. With data.chat_template (the byte tokenizer's turns, a reasoning model's generation prompt) the run
    trains, its data report counts the shortened prompts, and final/ is saved with the template it used."""
    from transformers import AutoTokenizer

    from tidpo_cli.cli import compose_config
    from tidpo_cli.explain import explain_main
    from tidpo_cli.trainer import train

    template = tmp_path / "thinking.jinja"
    template.write_text(BYTE_THINKING)
    answers = ["yes", "no", "maybe", "four", "five", "blue", "red", "green"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": [{"role": "assistant", "content": a}],
                                        "rejected": [{"role": "assistant", "content": a[::-1] + "!"}]}) + "\n"
                            for i, a in enumerate(answers * 2)))
    overrides = ["data=preference", f"data.path={rows}", "data.format=auto", "data.eval_size=4", "data.max_length=64",
                 "data.max_prompt_length=40", f"data.chat_template={template}", "loss=dpo", "trainer.max_steps=2",
                 "trainer.micro_batch_size=4", "trainer.eval_batch_size=4", "trainer.eval_every=0",
                 "trainer.save_every=0", "trainer.share_prompt=false", "trainer.device=cpu", "logger.progress=off", "logger.log_every=1"]
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train(compose_config(overrides), run_dir)
    log = caplog.text
    assert "used 16, skipped 0, truncated 0, prompt shortened 16 (chat template mismatch)" in log
    assert f"in 16 of 16 pairs the prompt stops where the two differ, leaving out {EMPTY_THOUGHT!r}" in log
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    assert AutoTokenizer.from_pretrained(run_dir / "final").chat_template == BYTE_THINKING

    with pytest.raises(DataError, match="all 16 rows were bad.*does not extend the prompt"):
        train(compose_config([*overrides, "data.template_mismatch=error"]), tmp_path / "refused")

    # tidpo explain renders the rows as the run did (README: Chat templates), and --chat renders --prompt.
    capsys.readouterr()
    explain_main([str(run_dir), "--data", str(rows), "--rows", "0:2", "--out", str(tmp_path / "e1")])
    explain_main([str(run_dir), "--prompt", "Question 0?", "--response", "yes", "--chat", "--out", str(tmp_path / "e2")])
    notes = capsys.readouterr().err
    assert notes.count("the prompt stops before " + repr(EMPTY_THOUGHT)) == 3, notes
    for out, count in (("e1", 2), ("e2", 1)):
        shown = json.loads((tmp_path / out / "explain.json").read_text())["examples"]
        assert len(shown) == count and "".join(shown[0]["chosen"]["tokens"]) == "yes<|end|>"
