"""data.flip_labels: label noise for robustness studies, on training pairs only."""

from __future__ import annotations

import pytest

from helpers import compose_config
from tidpo_cli.config import validate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.errors import ConfigError
from tidpo_cli.modeling import load_tokenizer


def splits(*overrides, seed=0):
    cfg = compose_config(["data.synthetic.num_train=200", "data.eval_size=40", *overrides])
    return load_splits(cfg.data, load_tokenizer(cfg.model), seed=seed)


def swapped(clean, noisy) -> list[int]:
    """Indices where `noisy` holds `clean`'s pair with chosen and rejected exchanged (anything else fails)."""
    out = []
    for i, (a, b) in enumerate(zip(clean, noisy, strict=True)):
        assert a.prompt_ids == b.prompt_ids and a.where == b.where
        if (a.chosen_ids, a.rejected_ids) == (b.chosen_ids, b.rejected_ids):
            continue
        assert (a.chosen_ids, a.rejected_ids) == (b.rejected_ids, b.chosen_ids)
        out.append(i)
    return out


def test_the_fraction_of_training_pairs_is_swapped_and_held_out_pairs_never():
    clean, noisy = splits(), splits("data.flip_labels=0.25")
    assert len(clean.train) == 200 and len(swapped(clean.train, noisy.train)) == 50
    assert swapped(clean.eval, noisy.eval) == []


def test_the_seed_picks_the_flipped_pairs():
    first = swapped(splits().train, splits("data.flip_labels=0.1").train)
    again = swapped(splits().train, splits("data.flip_labels=0.1").train)
    other = swapped(splits(seed=1).train, splits("data.flip_labels=0.1", seed=1).train)
    assert first == again and len(first) == len(other) == 20 and first != other


def test_a_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(ConfigError, match="data.flip_labels"):
        validate(compose_config(["data.flip_labels=1.5"]))
