"""The inverted index of fingerprint sub-words: every pair the all-pairs comparison matches is a
candidate, on synthetic fingerprints with planted copies and on the 70 real clips."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import numpy as np
import pytest
from fingerprint_helpers import all_pairs_product, signs
from fingerprint_helpers import synthetic_fingerprints as made_up

from gtzan_mlops.data import fingerprint_index
from gtzan_mlops.data.fingerprint_index import (
    candidate_pairs,
    compare_pairs,
    shifts,
)
from gtzan_mlops.settings.schema import FingerprintIndex

WINDOW, MAX_OFFSET = 121, 40  # 15 s and 5 s of Chromaprint items, as params.yaml has them
SETTINGS = FingerprintIndex(subwords=3, subword_bits=20, min_shared=2, max_key_fingerprints=100)
THRESHOLD = 0.85


def synthetic_fingerprints(
    count: int, copies: int, bit_error: float, seed: int = 0
) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
    """Made-up fingerprints with planted copies (tests/fingerprint_helpers.py) of this window."""
    return made_up(count, copies, bit_error, WINDOW, MAX_OFFSET, seed)


def all_pair_matches(prints: list[np.ndarray]) -> set[tuple[int, int]]:
    """What the all-pairs comparison matches: either direction at or above the threshold."""
    similarity, _ = all_pairs_product(prints, WINDOW, MAX_OFFSET)
    either = np.maximum(similarity, similarity.T) >= THRESHOLD
    return {(int(i), int(j)) for i, j in np.argwhere(np.triu(either, k=1))}


def test_one_pair_compares_as_the_all_pairs_product():
    prints, _ = synthetic_fingerprints(2, 1, 0.05)
    first, copy = prints[0], prints[2]
    bits = WINDOW * 32
    starts = np.stack([signs(copy[:WINDOW])])
    expected = max(
        float(((signs(first[o : o + WINDOW])[None] @ starts.T + bits) / (2 * bits))[0, 0])
        for o in range(MAX_OFFSET + 1)
    )
    similarity, _ = compare_pairs([first, copy], np.array([[0, 1]]), WINDOW, MAX_OFFSET)
    assert float(similarity[0, 0]) == expected


def test_compare_pairs_gives_the_values_and_offsets_of_the_all_pairs_product():
    prints, _ = synthetic_fingerprints(40, 20, 0.1)
    length = WINDOW + 2 * MAX_OFFSET
    prints += [
        np.zeros(length, dtype=np.uint32),  # silence: every offset ties, the first one counts
        np.tile(np.array([7, 7, 9], dtype=np.uint32), length)[:length],  # ties every 3 items
        np.full(length, 0xFFFFFFFF, dtype=np.uint32),  # the opposite of silence: similarity 0
        prints[0].copy(),  # an exact copy: similarity 1
    ]
    pairs = np.array(list(itertools.combinations(range(len(prints)), 2)))
    similarity, offset = compare_pairs(prints, pairs, WINDOW, MAX_OFFSET)
    expected, expected_offset = all_pairs_product(prints, WINDOW, MAX_OFFSET)
    first, second = pairs.T
    assert np.array_equal(similarity[:, 0], expected[first, second])
    assert np.array_equal(similarity[:, 1], expected[second, first])
    assert np.array_equal(offset[:, 0], expected_offset[first, second])
    assert np.array_equal(offset[:, 1], expected_offset[second, first])
    assert similarity.min() == 0.0 and similarity.max() == 1.0


def test_sub_words_are_spread_over_the_item_and_short_fingerprints_are_refused():
    assert shifts(SETTINGS) == [0, 6, 12]
    one = FingerprintIndex(subwords=1, subword_bits=24, min_shared=1, max_key_fingerprints=2)
    assert shifts(one) == [8]
    short = [np.zeros(WINDOW + MAX_OFFSET, dtype=np.uint32), np.zeros(WINDOW, dtype=np.uint32)]
    with pytest.raises(
        ValueError, match=rf"fingerprints \[1\] have fewer than {WINDOW + MAX_OFFSET}"
    ):
        candidate_pairs(short, WINDOW, MAX_OFFSET, SETTINGS)


@pytest.mark.parametrize("bit_error", [0.02, 0.08, 0.13])
def test_every_planted_copy_is_a_candidate_and_matches(bit_error):
    prints, planted = synthetic_fingerprints(150, 30, bit_error)
    candidates = {tuple(pair) for pair in candidate_pairs(prints, WINDOW, MAX_OFFSET, SETTINGS)}
    matched = all_pair_matches(prints)
    assert matched == {(original, copy) for original, copy, _ in planted}
    assert matched <= candidates
    assert len(candidates) < 3 * len(matched) + 20  # unrelated pairs rarely share a sub-word


def test_blocks_of_fingerprints_find_the_candidates_of_one_block(monkeypatch):
    prints, planted = synthetic_fingerprints(300, 60, 0.1)
    whole = candidate_pairs(prints, WINDOW, MAX_OFFSET, SETTINGS)
    assert {(original, copy) for original, copy, _ in planted} <= {tuple(p) for p in whole}
    monkeypatch.setattr(fingerprint_index, "POSTINGS_PER_BLOCK", 7 * 3 * (WINDOW + MAX_OFFSET))
    assert np.array_equal(candidate_pairs(prints, WINDOW, MAX_OFFSET, SETTINGS), whole)


def test_a_sub_word_in_too_many_fingerprints_is_skipped():
    silence = np.zeros(WINDOW + MAX_OFFSET, dtype=np.uint32)
    prints = [silence.copy() for _ in range(5)]
    few = FingerprintIndex(subwords=3, subword_bits=20, min_shared=2, max_key_fingerprints=4)
    assert len(candidate_pairs(prints, WINDOW, MAX_OFFSET, few)) == 0
    assert len(candidate_pairs(prints, WINDOW, MAX_OFFSET, SETTINGS)) == 10


def test_no_fingerprints_no_candidates():
    assert candidate_pairs([], WINDOW, MAX_OFFSET, SETTINGS).shape == (0, 2)


@pytest.mark.skipif(shutil.which("fpcalc") is None, reason="needs fpcalc (.ci/system-packages.sh)")
def test_the_real_clips_give_the_pairs_of_the_all_pairs_comparison(gtzan_mini):
    paths = sorted(gtzan_mini.glob("genres/*/*.wav"))
    assert len(paths) == 70
    prints = []
    for path in paths:
        result = subprocess.run(
            ["fpcalc", "-raw", "-length", "120", str(path)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        line = next(row for row in result.stdout.splitlines() if row.startswith("FINGERPRINT="))
        prints.append(np.array(line.split("=", 1)[1].split(","), dtype=np.uint32))
    candidates = {tuple(pair) for pair in candidate_pairs(prints, WINDOW, MAX_OFFSET, SETTINGS)}
    matched = all_pair_matches(prints)
    assert matched <= candidates

    # Copies made of the real fingerprints (their sub-words are far from uniform): each clip's
    # fingerprint with 10 % of its bits flipped, starting up to 5 s into it or it into the copy.
    rng = np.random.default_rng(0)
    copies = []
    for index, items in enumerate(prints):
        shift = int(rng.integers(-MAX_OFFSET, MAX_OFFSET + 1))
        other = prints[(index + 1) % len(prints)]
        body = items[shift:] if shift >= 0 else np.r_[other[:-shift], items]
        flips = rng.random((len(body), 32)) < 0.1
        masks = (flips * (1 << np.arange(32, dtype=np.uint64))).sum(axis=1).astype(np.uint64)
        copies.append((body.astype(np.uint64) ^ masks).astype(np.uint32))
    both = prints + copies
    planted = {(index, index + len(prints)) for index in range(len(prints))}
    candidates = {tuple(pair) for pair in candidate_pairs(both, WINDOW, MAX_OFFSET, SETTINGS)}
    assert all_pair_matches(both) == planted
    assert planted <= candidates
