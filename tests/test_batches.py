"""The batch stream: epochs, length grouping, and the packed layout travelling with a batch."""

import random

from tidpo_cli.data.batches import BatchStream, pair_length
from tidpo_cli.data.examples import TokenizedPair


def make_pairs(n=200, seed=0):
    rng = random.Random(seed)
    return [TokenizedPair([1] * rng.randint(1, 40), [2] * rng.randint(1, 30), [3] * rng.randint(1, 30), f"r:{i}",
                          False) for i in range(n)]



def ordered_epoch(stream) -> list[list[int]]:
    order = stream._order(0)
    size = stream.micro_batch_size
    return [order[k:k + size] for k in range(0, len(order) - size + 1, size)]


def test_grouping_keeps_the_epochs_pairs_and_cuts_padding():
    pairs = make_pairs()
    plain, grouped = (BatchStream(pairs, 8, 0, seed=1, group_by_length=g) for g in (0, 5))
    a, b = ordered_epoch(plain), ordered_epoch(grouped)
    assert len(a) == len(b) == 25
    assert sorted(i for batch in a for i in batch) == sorted(i for batch in b for i in batch) == list(range(200))

    def padded(batches):  # token slots when each batch is padded to its longest pair
        return sum(len(batch) * max(pair_length(pairs[i]) for i in batch) for batch in batches)

    assert padded(b) < 0.8 * padded(a)
    # within each window of 5 micro-batches the lengths are sorted: no batch overlaps another's length range
    for w in range(0, 25, 5):
        ranges = sorted((min(pair_length(pairs[i]) for i in batch), max(pair_length(pairs[i]) for i in batch))
                        for batch in b[w:w + 5])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))


def test_grouping_shuffles_the_batches_of_a_window_and_the_seed_repeats_it():
    pairs = make_pairs()
    first, again, other = (ordered_epoch(BatchStream(pairs, 8, 0, seed=s, group_by_length=25)) for s in (1, 1, 2))
    assert first == again and first != other
    longest = [max(pair_length(pairs[i]) for i in batch) for batch in first]
    assert longest != sorted(longest, reverse=True)  # not longest-first: the batches were shuffled


def test_a_packed_stream_carries_the_packed_layout():
    batch = next(iter(BatchStream(make_pairs(16), 4, 0, seed=0, share_prompt=True)))
    assert batch["packed_ids"].shape[0] == 4 and batch["input_ids"].shape[0] == 8
