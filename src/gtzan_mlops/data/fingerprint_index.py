"""Which pairs of Chromaprint fingerprints are worth comparing, found without comparing them all.

Comparing every pair (one n x n matrix product per offset) is fine for GTZAN's 1,000 clips and
hopeless for 100,000 (10^10 pairs). As AcoustID matches at scale, an inverted index maps
sub-words of the fingerprint items to where they occur; two fingerprints become a candidate pair
when they share a sub-word at positions that fit one copy starting at most `max_offset_items`
into the other, inside the compared window. Only candidates get the exact offset-aligned
comparison (`pair_similarity`), which gives the very numbers the all-pairs product gave.

Why sub-words, and why two items: two copies of one recording agree on 85 % or more of the
fingerprint bits (duplicates.min_similarity), but a whole 32-bit item survives a 15 % bit-error
rate only 0.85^32 = 0.6 % of the time. Each item gives three 20-bit sub-words (bits 0-19, 6-25,
12-31), at least one of which survives 8.7 % of the time, so about 10.6 of the 121 items of a
15 s window share a key at the right alignment even at the worst similarity that still matches:
fewer than 2 (min_shared) with a chance of about 3e-4, and real copies (0.95 agreement, ~56
items) practically never. Unrelated fingerprints meet on a 20-bit key by chance, but two items
meeting at one alignment happen for about 1 pair in 200,000. A key held by very many
fingerprints (silence, a constant tone) tells recordings apart no better than a stop word tells
documents apart: it is skipped, and those pairs still meet through their other keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IndexSettings:
    """How the index cuts items into keys and when a pair becomes a candidate (params
    `duplicates.index`)."""

    subwords: int  # keys per item: this many sub-words, evenly spaced over its 32 bits
    subword_bits: int  # the width of each
    min_shared: int  # keys two fingerprints must share at one alignment to be compared
    max_key_fingerprints: int  # a key found in more fingerprints than this is skipped

    @property
    def shifts(self) -> list[int]:
        last = 32 - self.subword_bits
        if self.subwords == 1:
            return [last]
        return [round(index * last / (self.subwords - 1)) for index in range(self.subwords)]


def signs(items: np.ndarray) -> np.ndarray:
    """±1 per bit of the items, so that a dot product counts agreeing minus differing bits."""
    bits = np.unpackbits(items.astype(">u4").view(np.uint8))
    return bits.astype(np.float32) * 2 - 1


def _postings(
    fingerprints: list[np.ndarray], span: int, settings: IndexSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, fingerprint, position) of the first `span` items of every fingerprint, sorted by
    key: each item gives one key per sub-word, tagged with the sub-word's place."""
    mask = np.uint64((1 << settings.subword_bits) - 1)
    keys, owners, positions = [np.zeros(0, dtype=np.uint64)], [], []
    for index, items in enumerate(fingerprints):
        head = items[:span].astype(np.uint64)
        for place, shift in enumerate(settings.shifts):
            keys.append(((head >> np.uint64(shift)) & mask) | np.uint64(place << 32))
            owners.append(np.full(len(head), index, dtype=np.int64))
            positions.append(np.arange(len(head), dtype=np.int64))
    key = np.concatenate(keys)
    owner = np.concatenate([np.zeros(0, dtype=np.int64), *owners])
    position = np.concatenate([np.zeros(0, dtype=np.int64), *positions])
    order = np.lexsort((position, owner, key))
    return key[order], owner[order], position[order]


def candidate_pairs(
    fingerprints: list[np.ndarray],
    window_items: int,
    max_offset_items: int,
    settings: IndexSettings,
) -> np.ndarray:
    """The pairs (i, j), i < j, with at least `min_shared` items sharing a key at one alignment
    that the comparison tries: j starting s items into i (or i into j), |s| <=
    max_offset_items, the item inside the compared window. An array (pairs, 2), sorted.

    Each hit is a pair of postings of one key; they are generated a distance d apart in the
    key-sorted postings, for d = 1, 2, ... while some key still has postings that far apart,
    so the work is the number of hits, not a loop over keys."""
    keys, owners, positions = _postings(fingerprints, window_items + max_offset_items, settings)
    if len(keys) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    boundary = np.r_[True, keys[1:] != keys[:-1]]
    group = np.cumsum(boundary) - 1
    starts = np.flatnonzero(boundary)
    sizes = np.diff(np.r_[starts, len(keys)])
    # How many fingerprints hold each key: a new holder starts where the owner changes.
    new_holder = boundary | np.r_[True, owners[1:] != owners[:-1]]
    holders = np.add.reduceat(new_holder.astype(np.int64), starts)
    kept = (holders >= 2) & (holders <= settings.max_key_fingerprints)
    index = np.flatnonzero(kept[group])
    group_end = (starts + sizes)[group]
    hits = [np.zeros((0, 4), dtype=np.int64)]
    distance = 1
    while len(index):
        index = index[index + distance < group_end[index]]
        first, second = index, index + distance
        a, b = owners[first], owners[second]  # a <= b: postings are sorted by owner in a key
        shift = positions[first] - positions[second]  # b starts `shift` items into a if >= 0
        fits = (a != b) & (np.abs(shift) <= max_offset_items)
        fits &= np.where(shift >= 0, positions[second], positions[first]) < window_items
        hits.append(np.stack([a[fits], b[fits], shift[fits], positions[first][fits]], axis=1))
        distance += 1
    # Overlapping sub-words of one item agree together: count the items, not the keys.
    items = np.unique(np.concatenate(hits), axis=0)
    found, counts = np.unique(items[:, :3], axis=0, return_counts=True)
    pairs = found[counts >= settings.min_shared][:, :2]
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), dtype=np.int64)


def pair_similarity(
    first: np.ndarray, second: np.ndarray, window_items: int, max_offset_items: int
) -> tuple[float, int, float, int]:
    """(similarity, offset) of `second` starting `offset` items into `first`, then of `first`
    into `second`: the best share of agreeing bits between `window_items` items of one from
    item `offset` and the first `window_items` of the other, over 0 <= offset <=
    max_offset_items. The same float32 arithmetic as the all-pairs product, so the same values
    (a sum of ±1 below 2^24 is exact in float32 whatever the order)."""
    bits = window_items * 32
    first_start, second_start = signs(first[:window_items]), signs(second[:window_items])
    results = []
    for moving, fixed in ((first, second_start), (second, first_start)):
        shifted = np.stack(
            [
                signs(moving[offset : offset + window_items])
                for offset in range(max_offset_items + 1)
            ]
        )
        similarity = (shifted @ fixed + np.float32(bits)) / np.float32(2 * bits)
        best = int(np.argmax(similarity))  # the first of equal values, as the matrix kept it
        results += [float(similarity[best]), best]
    return results[0], results[1], results[2], results[3]
