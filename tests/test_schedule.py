import math

import pytest

from tidpo_cli.schedule import lr_factor


def test_warmup_is_linear_and_reaches_peak():
    factors = [lr_factor(s, warmup_steps=4, total_steps=10, kind="constant") for s in range(6)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind,expected_mid,expected_end", [("linear", 0.5, 0.0), ("cosine", 0.5, 0.0),
                                                            ("constant", 1.0, 1.0)])
def test_decay_after_warmup(kind, expected_mid, expected_end):
    # warmup 2, total 12: progress = (step - 2) / 10; step 7 is half way, step 12 the end
    assert lr_factor(7, warmup_steps=2, total_steps=12, kind=kind) == pytest.approx(expected_mid)
    assert lr_factor(12, warmup_steps=2, total_steps=12, kind=kind) == pytest.approx(expected_end, abs=1e-12)


def test_cosine_quarter_point():
    assert lr_factor(3, warmup_steps=0, total_steps=12, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
