"""Made-up Chromaprint fingerprints with planted copies, and the all-pairs comparison the
duplicates stage made before its inverted index (one n x n matrix product per offset): what the
tests and benchmarks/duplicates.py check the index against."""

from __future__ import annotations

import numpy as np


def synthetic_fingerprints(
    count: int, copies: int, bit_error: float, window: int, max_offset: int, seed: int = 0
) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
    """Made-up fingerprints of window + 2 max_offset items: `count` random ones, then `copies`
    noisy copies of the first ones, each starting a random offset into its original (or its
    original into it) with `bit_error` of the bits flipped. Returns them and the planted
    (original, copy, shift)."""
    rng = np.random.default_rng(seed)
    length = window + 2 * max_offset
    prints = [
        rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32) for _ in range(count)
    ]
    planted = []
    for index in range(copies):
        original = prints[index]
        shift = int(rng.integers(-max_offset, max_offset + 1))
        body = original[shift:] if shift >= 0 else np.r_[rng.integers(0, 2**32, -shift), original]
        flips = rng.random((len(body), 32)) < bit_error
        masks = (flips * (1 << np.arange(32, dtype=np.uint64))).sum(axis=1).astype(np.uint64)
        noisy = (body.astype(np.uint64) ^ masks).astype(np.uint32)[:length]
        planted.append((index, len(prints), shift))
        prints.append(noisy)
    return prints, planted


def signs(items: np.ndarray) -> np.ndarray:
    """±1 per bit of the items, so that a dot product counts agreeing minus differing bits."""
    bits = np.unpackbits(items.astype(">u4").view(np.uint8))
    return bits.astype(np.float32) * 2 - 1


def all_pairs_product(
    fingerprints: list[np.ndarray], window_items: int, max_offset_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, offset in items) of every ordered pair (i, j): the best share of agreeing
    bits between `window_items` of i from its item `o` and the first `window_items` of j, over
    0 <= o <= max_offset_items (j starts o items into i). One matrix product per offset: all
    pairs at once, n x n floats (the stage's comparison before the index, verbatim)."""
    count = len(fingerprints)
    bits = window_items * 32
    starts = np.stack([signs(items[:window_items]) for items in fingerprints])
    best = np.full((count, count), -1.0, dtype=np.float32)
    best_offset = np.zeros((count, count), dtype=np.int64)
    for offset in range(max_offset_items + 1):
        shifted = np.stack([signs(items[offset : offset + window_items]) for items in fingerprints])
        similarity = (shifted @ starts.T + bits) / (2 * bits)
        better = similarity > best
        best[better] = similarity[better]
        best_offset[better] = offset
    return best, best_offset
