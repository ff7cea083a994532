"""The inverted index of fingerprint sub-words: every pair the all-pairs comparison matches is a
candidate, on synthetic fingerprints with planted copies and on the 70 real clips."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import numpy as np
import pytest

from gtzan_mlops.data.fingerprint_index import (
    IndexSettings,
    candidate_pairs,
    pair_similarity,
    signs,
)

WINDOW, MAX_OFFSET = 121, 40  # 15 s and 5 s of Chromaprint items, as params.yaml has them
SETTINGS = IndexSettings(subwords=3, subword_bits=20, min_shared=2, max_key_fingerprints=100)
THRESHOLD = 0.85


def synthetic_fingerprints(
    count: int, copies: int, bit_error: float, seed: int = 0
) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
    """Made-up fingerprints: `count` random ones, then `copies` noisy copies of the first
    ones, each starting a random offset into its original (or its original into it) with
    `bit_error` of the bits flipped. Returns them and the planted (original, copy, shift)."""
    rng = np.random.default_rng(seed)
    length = WINDOW + 2 * MAX_OFFSET
    prints = [
        rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32) for _ in range(count)
    ]
    planted = []
    for index in range(copies):
        original = prints[index]
        shift = int(rng.integers(-MAX_OFFSET, MAX_OFFSET + 1))
        body = original[shift:] if shift >= 0 else np.r_[rng.integers(0, 2**32, -shift), original]
        flips = rng.random((len(body), 32)) < bit_error
        masks = (flips * (1 << np.arange(32, dtype=np.uint64))).sum(axis=1).astype(np.uint64)
        noisy = (body.astype(np.uint64) ^ masks).astype(np.uint32)[:length]
        planted.append((index, len(prints), shift))
        prints.append(noisy)
    return prints, planted


def all_pair_matches(prints: list[np.ndarray]) -> set[tuple[int, int]]:
    """What the all-pairs comparison matches: either direction at or above the threshold."""
    matched = set()
    for i, j in itertools.combinations(range(len(prints)), 2):
        forward, _, backward, _ = pair_similarity(prints[i], prints[j], WINDOW, MAX_OFFSET)
        if max(forward, backward) >= THRESHOLD:
            matched.add((i, j))
    return matched


def test_pair_similarity_is_the_all_pairs_product_for_one_pair():
    prints, _ = synthetic_fingerprints(2, 1, 0.05)
    first, copy = prints[0], prints[2]
    bits = WINDOW * 32
    starts = np.stack([signs(copy[:WINDOW])])
    expected = max(
        float(((signs(first[o : o + WINDOW])[None] @ starts.T + bits) / (2 * bits))[0, 0])
        for o in range(MAX_OFFSET + 1)
    )
    assert pair_similarity(first, copy, WINDOW, MAX_OFFSET)[0] == expected


@pytest.mark.parametrize("bit_error", [0.02, 0.08, 0.13])
def test_every_planted_copy_is_a_candidate_and_matches(bit_error):
    prints, planted = synthetic_fingerprints(150, 30, bit_error)
    candidates = {tuple(pair) for pair in candidate_pairs(prints, WINDOW, MAX_OFFSET, SETTINGS)}
    matched = all_pair_matches(prints)
    assert matched == {(original, copy) for original, copy, _ in planted}
    assert matched <= candidates
    assert len(candidates) < 3 * len(matched) + 20  # unrelated pairs rarely share a sub-word


def test_a_sub_word_in_too_many_fingerprints_is_skipped():
    silence = np.zeros(WINDOW + MAX_OFFSET, dtype=np.uint32)
    prints = [silence.copy() for _ in range(5)]
    few = IndexSettings(subwords=3, subword_bits=20, min_shared=2, max_key_fingerprints=4)
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
