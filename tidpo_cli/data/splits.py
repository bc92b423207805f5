"""From the `data` config to tokenized training and held-out pairs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig

from ..errors import DataError
from .chat import chat_options
from .examples import TokenizedExample, TokenizedPair
from .prepare import PrepareReport, prepare
from .readers import read_rows
from .synthetic import synthetic_rows


@dataclass
class Splits:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    reports: dict[str, PrepareReport] = field(default_factory=dict)  # "train" / "eval" -> what was read


def load_splits(cfg: DictConfig, tokenizer, seed: int, *, held_out_only: bool = False) -> Splits:
    """Read, check and tokenize the training data and the held-out split that `cfg` (the data group) names.

    The held-out split is `eval_path`/`eval_split` when either is set, otherwise `eval_size` pairs held out
    from the training data by a seeded shuffle (so a file sorted by topic still gives a fair sample).
    `held_out_only` skips reading the training data where the held-out split does not come from it.
    `flip_labels` of the training pairs (never the held-out ones) have chosen and rejected swapped.
    """
    options = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   on_bad_row=cfg.on_bad_row, chat=chat_options(cfg))
    explicit_eval = cfg.eval_path is not None or cfg.eval_split is not None
    if held_out_only and explicit_eval and cfg.format != "synthetic":
        return _with_eval(Splits([], [], {}), cfg, tokenizer, options)
    if cfg.format == "synthetic":
        s = cfg.synthetic
        rows = synthetic_rows(s.num_train + cfg.eval_size, seed, min_items=s.min_items, max_items=s.max_items,
                              max_changed=s.max_changed, name="synthetic")
        pairs, report = prepare(rows, "conversational", tokenizer, max_rows=cfg.max_rows, **options)
    else:
        pairs, report = prepare(read_rows(cfg.path, cfg.split), cfg.format, tokenizer,
                                max_rows=cfg.max_rows, source=_named(cfg.path, cfg.split), **options)
    reports = {"train": report}

    if cfg.eval_path is None and cfg.eval_split is None:
        if cfg.eval_size == 0:
            return Splits(pairs, [], reports)
        if cfg.eval_size >= len(pairs):
            raise DataError(
                f"data.eval_size={cfg.eval_size} leaves no training pairs: only {len(pairs)} usable pairs were "
                f"read; lower data.eval_size or give a held-out set with data.eval_path"
            )
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        held_out = set(order[: cfg.eval_size])
        train = [p for i, p in enumerate(pairs) if i not in held_out]
        held = [pairs[i] for i in sorted(held_out)]
        return Splits(flip_labels(train, cfg.flip_labels, seed), held, reports)

    return _with_eval(Splits(flip_labels(pairs, cfg.flip_labels, seed), [], reports), cfg, tokenizer, options)


def flip_labels(pairs: list[TokenizedPair], fraction: float, seed: int) -> list[TokenizedPair]:
    """`pairs` with round(fraction * len) of them, drawn with `seed`, swapped: chosen becomes rejected.

    Label noise for robustness studies (the paper's Table B8): the same seed flips the same pairs.
    """
    count = round(fraction * len(pairs))
    if count == 0:
        return pairs
    flipped = set(random.Random(f"flip-{seed}").sample(range(len(pairs)), count))
    return [_flipped(p) if i in flipped else p for i, p in enumerate(pairs)]


def _flipped(p: TokenizedPair | TokenizedExample) -> TokenizedPair | TokenizedExample:
    if isinstance(p, TokenizedExample):  # unpaired: the label is what flips
        return replace(p, desirable=not p.desirable)
    return replace(p, chosen_ids=p.rejected_ids, rejected_ids=p.chosen_ids, critical=p.critical[::-1])


def _with_eval(splits: Splits, cfg: DictConfig, tokenizer, options: dict) -> Splits:
    """`splits` with the held-out pairs of `data.eval_path` / `data.eval_split` read in."""
    eval_source = cfg.eval_path or cfg.path
    if cfg.eval_path is None and Path(eval_source).is_file():
        raise DataError(
            f"data.eval_split={cfg.eval_split} needs a dataset with splits, but data.path={cfg.path} is a file: "
            f"set data.eval_path to a held-out file, or data.eval_split=null to hold out data.eval_size rows"
        )
    splits.eval, splits.reports["eval"] = prepare(read_rows(eval_source, cfg.eval_split), cfg.format, tokenizer,
                                                  source=_named(eval_source, cfg.eval_split), **options)
    return splits


def _named(path, split) -> str:
    """How a report names a data source before its first row: the file, or the dataset and its split."""
    return f"{path} (split {split})" if split and not Path(path).is_file() else str(path)
