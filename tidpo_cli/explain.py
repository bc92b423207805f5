"""`tidpo explain`: a picture of which response tokens TI-DPO weighs, and by how much (METHOD §1).

For each response (chosen, and rejected when there is one) the model sees `prompt + response`, the
gradient saliency of every token is computed with `importance.gradient_saliency` (the run's
`loss.importance.target` and `attribution`, else the paper's), and the weights the loss would use come from
`importance.mix_weights` over the response span (with the run's `exclude_last`). Each response also gets
`last_share`, the share of its weight on its last token, and, where the data marks critical characters
(`chosen_critical` / `rejected_critical`, data/formats.py), `critical_share`, the share on the tokens that
overlap them (`importance.weight_shares`). Three files are written: `explain.html` (tokens coloured by weight,
critical tokens underlined), `explain.png` (heatmaps) and `explain.json` (the numbers).

Colour scales: the raw importance (sum 1 over the response) and the prior (sum 1) are shown multiplied
by the response length n, so that all three rows share the weights' scale (mean 1 over the response) and
a token of the same colour counts the same in every row. Colour intensity grows with the square root of
the value: one token (often the final EOS, whose embedding feeds the target logit directly) can take
several times the mean, and a linear scale would leave every other token white.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from .data.examples import BadRow, PreferenceExample
from .data.chat import ChatOptions, chat_options, render_pair, require_template
from .data.formats import DEFAULT_CHAT, FORMATS, detect_format, to_example
from .data.readers import read_rows
from .data.tokenize import tokenize_example
from .errors import CommandLineParser, DataError, UserError
from .importance import ATTRIBUTIONS, TARGETS, gaussian_prior, gradient_saliency, last_token, mix_weights, weight_shares
from .modeling import pick_device
from .outputs import claim_output, write_files
from .trained import load_trained, locate, run_config

DEFAULT_LAM = 0.7        # paper Table B13 (conf/loss/tidpo.yaml)
DEFAULT_SIGMA_DIV = 4.0  # paper Table B13: sigma = n / 4
DEFAULT_TARGET, DEFAULT_ATTRIBUTION = "last_max_logit", "grad_l1"  # paper Eq. 5 and 6 (conf/loss/base.yaml)
DEFAULT_MAX_LENGTH = 512
DEFAULT_ROWS = "0:8"
PNG_MAX_EXAMPLES = 8
SIDES = ("chosen", "rejected")
OUTPUTS = ("explain.html", "explain.png", "explain.json")

# Stand-ins that make invisible characters visible in the HTML and on the PNG's axis.
_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


# ---------------------------------------------------------------------------------------------- maths

def importance_table(model: torch.nn.Module, tokenizer: Any, example: PreferenceExample, *, lam: float,
                     sigma_div: float, max_length: int, max_prompt_length: int | None = None,
                     target: str = DEFAULT_TARGET, attribution: str = DEFAULT_ATTRIBUTION,
                     exclude_last: bool = False) -> dict:
    """Token importance of each response of `example`, as plain lists (JSON-ready).

    Each side is `prompt + response` tokenized by `tokenize_example` (same BOS/EOS/truncation as
    training), span = the response tokens. Per side, over the n response tokens:
    `saliency` (raw importance: `attribution` of the gradient of `target`; by default L1 gradient norms),
    `raw` (saliency / its sum: sums to 1; all 0 when the saliency is 0), `prior` (Gaussian prior, sums to
    1), `weights` (`mix_weights`: mean 1, what TI-DPO uses), `last_share` (the weights' share on the last
    token), `critical` (the critical tokens' indices, None where the example marks none) and `critical_share`
    (the weights' share on them, None where unmarked). Each side is its own one-row batch; for the `margin`
    target a chosen row differentiates + log p(response), a rejected one - log p(response), its own term of the
    pair's difference (the other response's term has no gradient with respect to this row's embeddings).
    An empty `example.rejected` means "no rejected response": that side is None.
    Raises `BadRow` when the texts cannot be tokenized within the limits.
    """
    if max_prompt_length is None:
        max_prompt_length = default_prompt_length(max_length)
    has_rejected = bool(example.rejected)
    # tokenize_example wants two responses; a missing rejected one borrows the chosen text and is dropped.
    to_tokenize = example if has_rejected else dataclasses.replace(example, rejected=example.chosen)
    pair = tokenize_example(to_tokenize, tokenizer, max_length, max_prompt_length)
    texts = {"chosen": example.chosen, "rejected": example.rejected}
    settings = {"lam": lam, "sigma_div": sigma_div, "target": target, "attribution": attribution,
                "exclude_last": exclude_last}
    sides: dict[str, dict | None] = {}
    for side, response_ids, critical, sign in (("chosen", pair.chosen_ids, pair.critical[0], 1.0),
                                               ("rejected", pair.rejected_ids, pair.critical[1], -1.0)):
        if side == "rejected" and not has_rejected:
            sides[side] = None
            continue
        sides[side] = {"text": texts[side], **response_table(model, tokenizer, pair.prompt_ids, response_ids,
                                                             critical, sign, **settings)}
    return {"where": example.where, "prompt": example.prompt, "prompt_tokens": len(pair.prompt_ids),
            "truncated": pair.truncated, **settings, **sides}


def response_table(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], response_ids: list[int],
                   critical: tuple[int, ...] | None, sign: float, *, lam: float, sigma_div: float, target: str,
                   attribution: str, exclude_last: bool) -> dict:
    """The numbers for one response (the keys `importance_table` lists per side): one unpadded row, so nothing
    depends on batching. `sign`: the row's side (+1 chosen, -1 rejected), read by the `margin` target only."""
    from .losses import IGNORE_INDEX
    from .objective import saliency_targets

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    mask = torch.ones_like(ids)
    span = torch.zeros_like(ids, dtype=torch.bool)
    start = len(prompt_ids)
    span[0, start:] = True
    row = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~span, IGNORE_INDEX)}
    sides = torch.tensor([sign], device=device)
    saliency = gradient_saliency(model, ids, mask, attribution=attribution,                     # [1, T]
                                 target_values=lambda hidden: saliency_targets(model, hidden, row, slice(None), target,
                                                                               sides=sides))
    mixed = mix_weights(saliency, span, lam=lam, sigma_div=sigma_div, exclude_last=exclude_last)
    mixed_span = span & ~last_token(span) if exclude_last else span  # what the prior spans (mix_weights)
    marked = torch.zeros_like(span)
    if critical is not None:
        marked[0, [start + i for i in critical]] = True
    response_saliency = saliency[0, start:].double().cpu()
    total = float(response_saliency.sum())
    raw = response_saliency / total if total > 0 else torch.zeros_like(response_saliency)
    return {
        "ids": list(response_ids),
        "tokens": [token_text(tokenizer, i) for i in response_ids],
        "saliency": response_saliency.tolist(),
        "raw": raw.tolist(),
        "prior": gaussian_prior(mixed_span, sigma_div)[0, start:].cpu().tolist(),
        "weights": mixed.weights[0, start:].cpu().tolist(),
        "fallback": mixed.fallbacks > 0,
        "last_share": float(weight_shares(mixed.weights, span, last_token(span))[0]),
        "critical": None if critical is None else list(critical),
        "critical_share": None if critical is None else float(weight_shares(mixed.weights, span, marked)[0]),
    }


def default_prompt_length(max_length: int) -> int:
    """Half the total, as the shipped data configs do (256 of 512)."""
    return max(1, max_length // 2)


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token decoded on its own. A byte-level piece of a UTF-8 character decodes to U+FFFD.

    SentencePiece tokenizers drop a word's leading space when a token is decoded alone; it is put back
    from the piece's "▁" so that the tokens read as the text does.
    """
    try:
        text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except (ValueError, TypeError, OverflowError, IndexError, KeyError):
        return "\ufffd"
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


def visible(text: str, *, space: str = " ") -> str:
    """`text` with newlines, tabs and other control characters shown as symbols; "" as ∅."""
    if not text:
        return "∅"
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ch == " ":
            out.append(space)
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))  # the Unicode "control pictures" block
        elif ch == "\x7f":
            out.append("␡")
        else:
            out.append(ch)
    return "".join(out)


def _scaled(side: dict, key: str) -> list[float]:
    """A row on the weights' scale (mean 1 over the response): raw and prior times n, weights as they are."""
    values = side[key]
    return values if key == "weights" else [v * len(values) for v in values]


def _colour_max(table: dict) -> float:
    """The top of an example's colour scale: its largest value over both sides, raw and final rows."""
    values = [v for side in SIDES if table.get(side) for key in ("raw", "weights") for v in _scaled(table[side], key)]
    finite = [v for v in values if math.isfinite(v)]
    return max([1.0, *finite])


# ----------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: .3rem; }
.meta { color: #555; margin-top: 0; }
.legend { display: flex; align-items: center; gap: .5rem; font-size: .85rem; color: #555; }
.legend .bar { width: 14rem; height: .8rem; border: 1px solid #ccc;
  background: linear-gradient(to right, rgb(255,255,255), rgb(215,48,31)); }
section.example { border-top: 1px solid #ddd; margin-top: 1.5rem; padding-top: .5rem; }
h2 { font-size: 1.15rem; margin: .4rem 0; }
h2 small, h3 small { color: #777; font-weight: normal; }
h3 { font-size: 1rem; margin: .4rem 0; }
pre.prompt { background: #f6f6f6; border: 1px solid #e2e2e2; padding: .5rem; white-space: pre-wrap;
  word-break: break-word; max-height: 14rem; overflow: auto; margin: .2rem 0 .6rem; }
.sides { display: grid; grid-template-columns: repeat(auto-fit, minmax(22rem, 1fr)); gap: 1rem; }
.side { border: 1px solid #e2e2e2; border-radius: 4px; padding: .5rem; }
.label { font-size: .8rem; color: #555; margin: .5rem 0 .15rem; }
.tokens { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .9rem;
  line-height: 1.75; white-space: pre-wrap; word-break: break-all; }
.tokens span { border-radius: 2px; box-shadow: inset 0 0 0 1px rgba(0,0,0,.06); }
.note { color: #a33; font-size: .85rem; }
"""

COLOUR_GAMMA = 0.5  # intensity = (value / top) ** gamma, in the HTML and the PNG alike
_WHITE = (255, 255, 255)
_RED = (215, 48, 31)  # the end of the colour scale (matplotlib's "Reds" reaches a similar red)


def _background(value: float, top: float) -> tuple[str, str]:
    """CSS background and text colour for `value` on a white-to-red scale from 0 to `top`."""
    a = min(max(value / top, 0.0), 1.0) ** COLOUR_GAMMA if top > 0 and math.isfinite(value) else 0.0
    rgb = tuple(round(w + (r - w) * a) for w, r in zip(_WHITE, _RED))
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", "#fff" if a > 0.65 else "#111"


def _token_spans(side: dict, key: str, top: float) -> str:
    """The response as coloured spans; the tooltip gives the token and all three numbers."""
    n = len(side["tokens"])
    scaled = _scaled(side, key)
    parts = []
    critical = set(side.get("critical") or ())
    for i, token in enumerate(side["tokens"]):
        background, colour = _background(scaled[i], top)
        tip = (f"#{i} “{visible(token, space='␣')}”  weight {side['weights'][i]:.3f}  "
               f"raw {side['raw'][i]:.4f} (×n {side['raw'][i] * n:.3f})  prior {side['prior'][i]:.4f}"
               + ("  critical" if i in critical else ""))
        underline = ";text-decoration:underline" if i in critical else ""
        parts.append(f'<span style="background:{background};color:{colour}{underline}" title="{html.escape(tip)}">'
                     f"{html.escape(visible(token))}</span>")
        if "\n" in token:
            parts.append("<br>")
    return "".join(parts)


def _side_html(name: str, side: dict | None, top: float) -> str:
    if side is None:
        return f'<div class="side"><h3>{name}</h3><p class="meta">no {name} response given</p></div>'
    n = len(side["tokens"])
    note = ('<p class="note">the saliency was 0 over this response: the weights are the prior alone</p>'
            if side["fallback"] else "")
    shares = f" · last token {side['last_share']:.0%} of the weight"
    if side.get("critical_share") is not None:
        shares += f" · critical tokens (underlined) {side['critical_share']:.0%}"
    return (f'<div class="side"><h3>{name} <small>{n} tokens{shares}</small></h3>{note}'
            f'<div class="label">raw importance (share of the response, shown ×n)</div>'
            f'<div class="tokens">{_token_spans(side, "raw", top)}</div>'
            f'<div class="label">after prior (the weights TI-DPO uses, mean 1)</div>'
            f'<div class="tokens">{_token_spans(side, "weights", top)}</div></div>')


def _example_html(index: int, table: dict) -> str:
    top = _colour_max(table)
    truncated = ('<p class="note">cut to the length limits: the model saw the end of the prompt '
                 f'({table["prompt_tokens"]} tokens) and the start of each response</p>'
                 if table["truncated"] else "")
    sides = "".join(_side_html(name, table[name], top) for name in SIDES)
    return (f'<section class="example"><h2>Example {index} <small>{html.escape(str(table["where"]))} · '
            f'colour scale 0 to {top:.2f}</small></h2>{truncated}'
            f'<h3>Prompt</h3><pre class="prompt">{html.escape(table["prompt"])}</pre>'
            f'<div class="sides">{sides}</div></section>')


def render_html(tables: list[dict], *, title: str = "tidpo explain") -> str:
    """A self-contained page (inline CSS, no scripts, no external assets): one section per example."""
    head = tables[0] if tables else {"lam": DEFAULT_LAM, "sigma_div": DEFAULT_SIGMA_DIV}
    body = "".join(_example_html(table.get("index", i), table) for i, table in enumerate(tables))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>Token importance (TI-DPO)</h1>\n"
        f'<p class="meta">{html.escape(title)} · λ = {head["lam"]:g} · σ = n / {head["sigma_div"]:g} · '
        "weights = λ·raw + (1 − λ)·prior, scaled to mean 1 over each response. "
        "Hover a token for its numbers; ↵ is a newline, ⇥ a tab, � part of a character.</p>\n"
        '<div class="legend"><span>0</span><span class="bar"></span>'
        "<span>the example's largest value (raw ×n or weight); intensity ∝ √value</span></div>\n"
        f"{body}\n</body>\n</html>\n"
    )


# ------------------------------------------------------------------------------------------------ PNG

_ROW_LABELS = ("raw ×n", "prior ×n", "weight")
_CELL_IN = 0.17          # width of one token column, inches
_MAX_PLOT_IN = 30.0      # widest heatmap before columns shrink and labels thin out
_LABEL_CHARS = 10


def _tick_label(token: str) -> str:
    text = visible(token, space="␣")
    if len(text) > _LABEL_CHARS:
        text = text[: _LABEL_CHARS - 1] + "…"
    return text.replace("$", r"\$")  # a bare "$" would start matplotlib mathtext


def render_png(tables: list[dict], path: str | os.PathLike) -> None:
    """Heatmaps (rows raw ×n, prior ×n, weight; one column per response token), chosen above rejected,
    one block per example with its own colour bar; at most `PNG_MAX_EXAMPLES` examples."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = tables[:PNG_MAX_EXAMPLES]
    widest = max((len(t[s]["tokens"]) for t in shown for s in SIDES if t.get(s)), default=1)
    cell = min(_CELL_IN, _MAX_PLOT_IN / widest)
    blocks = [[s for s in SIDES if t.get(s)] for t in shown]
    heights = [0.5 + 1.9 * len(sides) for sides in blocks]
    fig = Figure(figsize=(max(7.0, 2.6 + widest * cell), sum(heights)), layout="constrained", dpi=110)
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(len(shown), 1, height_ratios=heights, squeeze=False)[:, 0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing")  # CJK etc. without a font
        for subfig, table, sides in zip(subfigs, shown, blocks):
            _example_png(subfig, table, sides, widest, cell)
        if len(tables) > len(shown):
            fig.suptitle(f"first {len(shown)} of {len(tables)} examples (all are in explain.html)", fontsize=10)
        fig.savefig(path, dpi=110)


def _example_png(subfig, table: dict, sides: list[str], widest: int, cell: float) -> None:
    import numpy as np
    from matplotlib.colors import PowerNorm

    top = _colour_max(table)
    axes = subfig.subplots(len(sides), 1, squeeze=False)[:, 0]
    image = None
    for ax, side_name in zip(axes, sides):
        side = table[side_name]
        grid = np.array([_scaled(side, key) for key in ("raw", "prior", "weights")])
        image = ax.imshow(grid, aspect="auto", cmap="Reds", interpolation="nearest",
                          norm=PowerNorm(COLOUR_GAMMA, vmin=0.0, vmax=top))
        n = len(side["tokens"])
        ax.set_xlim(-0.5, widest - 0.5)  # same column width for both sides: aligned tokens line up
        step = max(1, math.ceil(0.13 / cell))  # thin the labels when the columns get narrower than a label
        # Every step-th token, and always the last (often EOS, where the weight piles up).
        ticks = [i for i in range(0, n, step) if i <= n - 1 - step] + [n - 1]
        ax.set_xticks(ticks, [_tick_label(side["tokens"][i]) for i in ticks], fontsize=7)
        for label in ax.get_xticklabels():  # one character reads best upright, longer tokens sideways
            label.set_rotation(0 if len(label.get_text().replace("\\", "")) <= 2 else 90)
        ax.set_yticks(range(3), _ROW_LABELS, fontsize=8)
        ax.tick_params(length=2, pad=1)
        title = f"{side_name} ({n} tokens{', saliency 0: prior only' if side['fallback'] else ''})"
        ax.set_title(title, fontsize=9, loc="left")
    where = str(table["where"]).replace("$", r"\$")
    subfig.suptitle(f"example {table.get('index', '')}  ·  {where}  ·  λ = {table['lam']:g}, "
                    f"σ = n/{table['sigma_div']:g}", fontsize=10)
    bar = subfig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.01, aspect=12)
    bar.set_label("weight (mean 1)", fontsize=8)
    bar.ax.tick_params(labelsize=7)


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="tidpo explain",
        description="Show which response tokens TI-DPO weighs: explain.html, explain.png, explain.json.",
        epilog="MODEL is a run directory (its final/ model, and the run's loss.importance lam / sigma_div unless "
               "given here), RUN/checkpoints/step-N, or an HF model directory.",
    )
    parser.add_argument("model", metavar="MODEL", help="run directory, checkpoint or HF model directory")
    text = parser.add_argument_group("one example from the command line")
    text.add_argument("--prompt", help="prompt text")
    text.add_argument("--response", help="response text (shown as the chosen side)")
    text.add_argument("--rejected", help="optional second response, shown beside the first")
    text.add_argument("--chat", action="store_true",
                      help="render --prompt as a user message and the responses as assistant replies with the "
                           "model's chat template, as conversational data is (default: the text as given)")
    data = parser.add_argument_group("examples from a data file")
    data.add_argument("--data", metavar="FILE", help="a .jsonl/.jsonl.gz/.json/.parquet file, dataset folder or hub name")
    data.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="data layout (default: auto)")
    data.add_argument("--split", default="train", help="split for a dataset folder or hub name (default: train)")
    data.add_argument("--rows", default=DEFAULT_ROWS, help="START:STOP row range, or one row index (default: 0:8)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: ./explain, or RUN/explain)")
    parser.add_argument("--overwrite", action="store_true", help="replace explain.html, explain.png and "
                        "explain.json in --out DIR (the default folder is always rewritten)")
    parser.add_argument("--lam", type=float, help=f"importance vs prior mix λ (default: the run's, else {DEFAULT_LAM})")
    parser.add_argument("--sigma-div", type=float,
                        help=f"prior width σ = n / SIGMA_DIV (default: the run's, else {DEFAULT_SIGMA_DIV:g})")
    parser.add_argument("--max-length", type=int,
                        help=f"prompt + response tokens (default: {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--max-prompt-length", type=int, help="prompt tokens, cut from the left (default: half of --max-length)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ... (default: auto)")
    return parser


def parse_rows(spec: str) -> range:
    """`START:STOP`, `START:`, `:STOP` or one index `N`, all non-negative, as a range of row indices."""
    bad = UserError(f"--rows must be START:STOP (e.g. 0:8) or one row index (e.g. 3), with whole numbers >= 0 "
                    f"and START < STOP; got {spec!r}")
    text = spec.strip()
    try:
        if ":" not in text:
            start = int(text)
            stop = start + 1
        else:
            head, tail = text.split(":", 1)
            start = int(head) if head.strip() else 0
            stop = int(tail) if tail.strip() else sys.maxsize
    except ValueError:
        raise bad from None
    if start < 0 or stop <= start:
        raise bad
    return range(start, stop)


def _from_config(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException:
        return None


def _chat_options(cfg: Any) -> ChatOptions:
    """How the run rendered its conversational rows (its data.chat_template, _kwargs, system_prompt and
    template_mismatch), so that explained rows get the same tokens; the defaults outside a run."""
    data = _from_config(cfg, "data")
    try:
        return DEFAULT_CHAT if data is None else chat_options(data)
    except DataError as e:
        raise UserError(f"the run's config: {e}") from None


def settings(args: argparse.Namespace, cfg: Any) -> dict:
    """lam and sigma_div: explicit flags, else the run's loss.importance, else the paper's values; target,
    attribution and exclude_last: the run's loss.importance, else the paper's (last_max_logit, grad_l1, false).
    max_length (default 512) and max_prompt_length (default half of it) come from the flags only: a run's
    training limits can be short (the demo's are 48) and would cut the text being explained."""
    def pick(flag, key, default, kind):
        if flag is not None:
            return flag
        value = _from_config(cfg, key)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    lam = pick(args.lam, "loss.importance.lam", DEFAULT_LAM, float)
    sigma_div = pick(args.sigma_div, "loss.importance.sigma_div", DEFAULT_SIGMA_DIV, float)
    max_length = DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length
    target = _from_config(cfg, "loss.importance.target") or DEFAULT_TARGET
    attribution = _from_config(cfg, "loss.importance.attribution") or DEFAULT_ATTRIBUTION
    exclude_last = _from_config(cfg, "loss.importance.exclude_last") or False
    for key, value, known in (("target", target, TARGETS), ("attribution", attribution, ATTRIBUTIONS),
                              ("exclude_last", exclude_last, (True, False))):
        if value not in known:
            raise UserError(f"the run's config has loss.importance.{key}={value!r}, which this tidpo does not know: "
                            f"expected one of {', '.join(map(str, known))}")
    if not 0.0 <= lam <= 1.0:
        raise UserError(f"--lam must be between 0 and 1 (the share of gradient importance in the mix), got {lam:g}")
    if not (sigma_div > 0 and math.isfinite(sigma_div)):
        raise UserError(f"--sigma-div must be a positive number (sigma = n / sigma_div), got {sigma_div:g}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2 (prompt + response tokens), got {max_length}")
    max_prompt = default_prompt_length(max_length) if args.max_prompt_length is None else args.max_prompt_length
    if not 1 <= max_prompt < max_length:
        raise UserError(f"--max-prompt-length must be at least 1 and below --max-length ({max_length}), "
                        f"got {max_prompt}")
    return {"lam": lam, "sigma_div": sigma_div, "target": target, "attribution": attribution,
            "exclude_last": bool(exclude_last), "max_length": max_length, "max_prompt_length": max_prompt}


def command_line_example(args: argparse.Namespace, tokenizer: Any = None,
                         chat: ChatOptions = DEFAULT_CHAT) -> PreferenceExample:
    """The --prompt / --response / --rejected example: the text as given, or with --chat rendered with the chat
    template (needs `tokenizer`)."""
    if args.prompt is None or args.response is None:
        missing = " and ".join(f for f, v in (("--prompt", args.prompt), ("--response", args.response)) if v is None)
        raise UserError(f"missing {missing}: give --prompt TEXT --response TEXT [--rejected TEXT], "
                        "or --data FILE for examples from a file")
    if not args.response:
        raise UserError("--response is empty: give the response text to explain")
    if not getattr(args, "chat", False) or tokenizer is None:
        return PreferenceExample(prompt=args.prompt, chosen=args.response, rejected=args.rejected or "",
                                 where="command line")
    try:
        require_template(tokenizer, chat)
        rendered = render_pair(tokenizer, [{"role": "user", "content": args.prompt}],
                               [{"role": "assistant", "content": args.response}],
                               [{"role": "assistant", "content": args.rejected or args.response}], chat)
    except (BadRow, DataError) as e:
        raise UserError(f"--chat: {e}") from None
    return PreferenceExample(prompt=rendered.prompt, chosen=rendered.chosen,
                             rejected=rendered.rejected if args.rejected else "", where="command line",
                             prompt_cut=rendered.prompt_cut)


def data_examples(args: argparse.Namespace, tokenizer: Any,
                  chat: ChatOptions = DEFAULT_CHAT) -> list[tuple[int, PreferenceExample]]:
    """(row index, example) for the rows in `--rows` of `--data`, converted with `to_example` (conversational
    rows rendered as `chat` says); unusable rows are reported on stderr and skipped."""
    rows = parse_rows(args.rows)
    fmt = None if args.format == "auto" else args.format
    examples, seen = [], 0
    for index, (where, row) in enumerate(read_rows(args.data, split=args.split)):
        seen = index + 1
        if index >= rows.stop:
            break
        if index < rows.start:
            continue
        try:
            fmt = fmt or detect_format(row)
            examples.append((index, to_example(row, fmt, tokenizer, where, chat)))
        except BadRow as e:
            print(f"tidpo explain: skipped row {index} ({where}): {e}", file=sys.stderr)
    if not examples:
        if seen <= rows.start:
            raise UserError(f"--rows {args.rows} selects no rows: {args.data} has {seen} rows "
                            f"(rows are numbered from 0)")
        raise UserError(f"no usable row in --rows {args.rows} of {args.data} (see the skipped rows above): "
                        "check --format or pick other rows")
    return examples


def explain_main(argv: list[str]) -> None:
    """`tidpo explain MODEL (--prompt P --response R [--rejected R2] | --data FILE [--rows A:B]) [...]`."""
    args = build_parser().parse_args(argv)
    from_text = any(v is not None for v in (args.prompt, args.response, args.rejected))
    if args.data is not None and from_text:
        raise UserError("use either --data FILE or --prompt/--response/--rejected, not both")
    if args.data is None:
        command_line_example(args)  # missing text fails before the model loads
    else:
        parse_rows(args.rows)  # a bad --rows fails before the model loads
    kind, model_dir, run_dir = locate(args.model)
    cfg = run_config(run_dir, model_dir if kind == "checkpoint" else None)
    opts = settings(args, cfg)
    device = pick_device(args.device, key="--device")
    out = Path(args.out).expanduser() if args.out else (run_dir / "explain" if run_dir else Path("explain"))
    claim_output(out, OUTPUTS, given=args.out is not None, overwrite=args.overwrite)

    trained = load_trained(args.model, device)
    model, tokenizer = trained.model, trained.tokenizer
    chat = _chat_options(cfg)
    examples = ([(0, command_line_example(args, tokenizer, chat))] if args.data is None
                else data_examples(args, tokenizer, chat))
    source = f" (run config: {run_dir})" if cfg is not None else ""
    if _from_config(cfg, "loss.importance.span") == "prompt_response":
        print("tidpo explain: the run weighted prompt + response (span prompt_response); shown here: the "
              "response span, so its weights differ from that run's", file=sys.stderr)
    print(f"model {model_dir}: lam {opts['lam']:g}, sigma_div {opts['sigma_div']:g}, target {opts['target']}, "
          f"attribution {opts['attribution']}, exclude_last {str(opts['exclude_last']).lower()}, "
          f"max_length {opts['max_length']}, max_prompt_length {opts['max_prompt_length']}{source}")

    tables = []
    for index, ex in examples:
        try:
            table = importance_table(model, tokenizer, ex, **opts)
        except BadRow as e:
            raise UserError(f"cannot explain {ex.where}: {e}") from None
        if table["truncated"]:
            print(f"tidpo explain: {ex.where} was cut to --max-length {opts['max_length']} / "
                  f"--max-prompt-length {opts['max_prompt_length']}; raise them to see all of it", file=sys.stderr)
        if ex.prompt_cut:
            print(f"tidpo explain: {ex.where}: the chat template renders the prompt alone differently from the "
                  f"conversation; the prompt stops before {ex.prompt_cut!r} (data.template_mismatch)", file=sys.stderr)
        tables.append({"index": index, **table})
    print(share_summary(tables))
    write_outputs(tables, out, {"model": str(model_dir), **opts})


def share_summary(tables: list[dict]) -> str:
    """One line: the mean `last_share` over the responses shown, and the mean `critical_share` over those the data
    marks (when any is)."""
    sides = [table[side] for table in tables for side in SIDES if table.get(side)]
    line = f"last_share (weight on the last token): mean {sum(s['last_share'] for s in sides) / len(sides):.3f} " \
           f"over {len(sides)} responses"
    marked = [s["critical_share"] for s in sides if s["critical_share"] is not None]
    if marked:
        line += f"; critical_share (on the critical tokens): mean {sum(marked) / len(marked):.3f} over " \
                f"{len(marked)} marked responses"
    return line


def write_outputs(tables: list[dict], out: Path, meta: dict) -> list[Path]:
    """explain.html, explain.png and explain.json under `out` (all three or none); prints and returns their
    paths."""
    page = render_html(tables, title=f"tidpo explain · {meta['model']}")
    numbers = json.dumps({**meta, "span": "response", "examples": tables}, indent=1, ensure_ascii=False)
    writers = {"explain.html": lambda path: path.write_text(page, encoding="utf-8"),
               "explain.png": lambda path: render_png(tables, path),
               "explain.json": lambda path: path.write_text(numbers, encoding="utf-8")}
    paths = write_files(out, writers, "the explain output", "tidpo explain")
    for path in paths:
        print(f"wrote {path}")
    return paths
