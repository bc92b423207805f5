"""`tidpo explain`: the numbers against importance.py recomputed here, the three output files, data rows,
run-directory defaults and the user errors. A tiny saved model; everything runs in-process."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from tidpo_cli.errors import UserError
from tidpo_cli.explain import explain_main, token_text
from tidpo_cli.importance import gradient_saliency, mix_weights
from tidpo_cli.modeling import build_tiny_llama
from tidpo_cli.tokenizer import build_byte_tokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}
PROMPT = "Copy: a b c <d>\n"
RESPONSE = "a b c & <d>\n"
REJECTED = "a x c"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "final"
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_llama(TINY, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def explained(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    explain_main([str(model_dir), "--prompt", PROMPT, "--response", RESPONSE, "--rejected", REJECTED,
                  "--out", str(out)])
    return out


def load(out: Path) -> dict:
    return json.loads((out / "explain.json").read_text(encoding="utf-8"))


def test_writes_the_three_files_and_prints_their_paths(model_dir, tmp_path, capsys):
    explain_main([str(model_dir), "--prompt", "Hi", "--response", "Hello", "--out", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    for name in ("explain.html", "explain.png", "explain.json"):
        assert (tmp_path / "o" / name).is_file()
        assert str(tmp_path / "o" / name) in printed
    assert load(tmp_path / "o")["examples"][0]["rejected"] is None  # no --rejected: one side only


def test_weights_are_mix_weights_of_gradient_saliency_with_mean_one(explained, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = load(explained)
    assert (data["lam"], data["sigma_div"]) == (0.7, 4.0)
    [table] = data["examples"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer.bos_token_id] + list(PROMPT.encode())  # byte tokenizer: id == byte
    for side, text in (("chosen", RESPONSE), ("rejected", REJECTED)):
        entry = table[side]
        response_ids = list(text.encode()) + [tokenizer.eos_token_id]
        assert entry["ids"] == response_ids
        n = len(response_ids)
        weights = entry["weights"]
        assert sum(weights) / n == pytest.approx(1.0, abs=1e-5)   # mean 1 over the response
        assert sum(entry["raw"]) == pytest.approx(1.0, abs=1e-6)
        assert sum(entry["prior"]) == pytest.approx(1.0, abs=1e-6)

        ids = torch.tensor([prompt_ids + response_ids])
        span = torch.zeros_like(ids, dtype=torch.bool)
        span[0, len(prompt_ids):] = True
        raw = gradient_saliency(model, ids, torch.ones_like(ids))
        expected = mix_weights(raw, span, lam=0.7, sigma_div=4.0).weights[0, len(prompt_ids):]
        assert weights == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
        response_raw = raw[0, len(prompt_ids):]
        assert entry["raw"] == pytest.approx((response_raw / response_raw.sum()).tolist(), rel=1e-4, abs=1e-7)
        # lam mixes the two sum-1 vectors before scaling to mean 1
        mixed = [0.7 * r + 0.3 * p for r, p in zip(entry["raw"], entry["prior"])]
        assert weights == pytest.approx([m / sum(mixed) * n for m in mixed], rel=1e-4)


class TagChecker(HTMLParser):
    """Every opened non-void tag is closed, in order."""

    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_well_formed_and_shows_every_token(explained):
    page = (explained / "explain.html").read_text(encoding="utf-8")
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert "<script" not in page and "http" not in page  # no external assets
    [table] = load(explained)["examples"]
    for side in ("chosen", "rejected"):
        for token in table[side]["tokens"]:
            shown = token.replace("\n", "↵")
            assert f">{html.escape(shown)}</span>" in page
    assert "&lt;d&gt;" in page and "&amp;" in page and "<d>" not in page
    assert "after prior (the weights TI-DPO uses" in page and "raw importance" in page


def test_png_is_a_real_image(explained):
    data = (explained / "explain.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(explained / "explain.png") as image:
        width, height = image.size
    assert width >= 600 and height >= 300


def test_data_rows_give_chosen_and_rejected_side_by_side(model_dir, tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    explain_main([str(model_dir), "--data", str(path), "--rows", "1:3", "--out", str(tmp_path / "o")])
    examples = load(tmp_path / "o")["examples"]
    assert [e["index"] for e in examples] == [1, 2]
    assert [e["prompt"] for e in examples] == ["Q1?", "Q2?"]
    for e in examples:
        assert e["chosen"]["text"].startswith("good") and e["rejected"]["text"].startswith("bad")
        for side in ("chosen", "rejected"):
            assert sum(e[side]["weights"]) / len(e[side]["ids"]) == pytest.approx(1.0, abs=1e-5)
    page = (tmp_path / "o" / "explain.html").read_text(encoding="utf-8")
    assert page.count('<section class="example">') == 2


def test_run_directory_uses_final_its_importance_settings_and_run_explain(model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("loss:\n  importance:\n    lam: 0.3\n    sigma_div: 8.0\n")
    (run / "final").symlink_to(model_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    explain_main([str(run), "--prompt", "Hi", "--response", "Hello"])
    data = load(run / "explain")
    assert (data["lam"], data["sigma_div"]) == (0.3, 8.0)
    assert data["examples"][0]["lam"] == 0.3
    # An explicit flag wins over the run's value.
    explain_main([str(run), "--prompt", "Hi", "--response", "Hello", "--lam", "0.9"])
    assert (load(run / "explain")["lam"], load(run / "explain")["sigma_div"]) == (0.9, 8.0)


def test_token_text_shows_a_replacement_char_for_part_of_a_utf8_character():
    tokenizer = build_byte_tokenizer()
    first, second = "é".encode()
    assert token_text(tokenizer, first) == "\ufffd" and token_text(tokenizer, second) == "\ufffd"
    assert token_text(tokenizer, ord("\n")) == "\n"


@pytest.mark.parametrize("argv, words", [
    (["{missing}", "--prompt", "p", "--response", "r"], ["does not exist", "RUN/final"]),
    (["{model}", "--data", "x.jsonl", "--rows", "5:2"], ["--rows", "START:STOP", "'5:2'"]),
    (["{model}", "--data", "x.jsonl", "--rows", "a:b"], ["--rows", "'a:b'"]),
    (["{model}", "--prompt", "p"], ["missing --response"]),
    (["{model}", "--data", "{nofile}"], ["does not exist"]),
    (["{model}", "--prompt", "p", "--response", "r", "--lam", "2"], ["--lam", "between 0 and 1"]),
])
def test_user_mistakes_are_one_clear_line(model_dir, tmp_path, argv, words):
    names = {"model": model_dir, "missing": tmp_path / "nope", "nofile": tmp_path / "nofile.jsonl"}
    with pytest.raises(UserError) as caught:
        explain_main([arg.format(**names) for arg in argv])
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message
