"""The synthetic critical-token task of the offline demo, generated in code.

The user asks for a list of letters to be copied. The chosen reply copies it; the rejected reply is the
same list with 1..max_changed items replaced by letters that are not in the list. Everything else in the
two replies is identical, so the preference hinges on a few critical tokens: exactly the situation
token-importance weighting is meant for. Rows come out in the conversational format and go through the
same chat-template path as real data.
"""

from __future__ import annotations

import random
import string
from typing import Iterator

LETTERS = string.ascii_lowercase


def make_pair(rng: random.Random, min_items: int, max_items: int, max_changed: int) -> dict:
    """One conversational preference row: {"prompt": [user], "chosen": [assistant], "rejected": [assistant],
    "chosen_critical": spans, "rejected_critical": spans}. The spans mark the critical tokens: the letters at the
    positions where the two replies differ, as [start, end) character spans into each reply's content (the same
    in both, letter i of a reply being its character 2 i)."""
    n = rng.randint(min_items, max_items)
    items = rng.sample(LETTERS, n)
    outsiders = [c for c in LETTERS if c not in items]
    corrupted = list(items)
    changed = rng.sample(range(n), rng.randint(1, max_changed))
    for position in changed:
        corrupted[position] = rng.choice(outsiders)
    spans = [[2 * position, 2 * position + 1] for position in sorted(changed)]
    return {
        "prompt": [{"role": "user", "content": "Copy: " + " ".join(items)}],
        "chosen": [{"role": "assistant", "content": " ".join(items)}],
        "rejected": [{"role": "assistant", "content": " ".join(corrupted)}],
        "chosen_critical": spans,
        "rejected_critical": [list(span) for span in spans],
    }


def synthetic_rows(num_rows: int, seed: int, *, min_items: int, max_items: int,
                   max_changed: int, name: str) -> Iterator[tuple[str, dict]]:
    """`num_rows` rows as (where, row), reproducible from `seed`; `name` labels them ("synthetic/train")."""
    rng = random.Random(seed)
    for index in range(num_rows):
        yield f"{name}:{index}", make_pair(rng, min_items, max_items, max_changed)
