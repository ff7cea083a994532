"""Which pairs of Chromaprint fingerprints are worth comparing, found without comparing them all,
and the exact comparison of those pairs.

Comparing every pair (one n x n matrix product per offset) is fine for GTZAN's 1,000 clips and
hopeless for 100,000 (10^10 pairs). As AcoustID matches at scale, an inverted index maps
sub-words of the fingerprint items to where they occur; two fingerprints become a candidate pair
when they share a sub-word at positions that fit one copy starting at most `max_offset_items`
into the other, inside the compared window. Only candidates get the exact offset-aligned
comparison (`compare_pairs`), which gives the very numbers the all-pairs product gave.

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

Memory grows with the number of fingerprints, never with its square: the postings (16 bytes
per item and sub-word place), the hits of a block of fingerprints at a time (the chance hits
grow with the square of the fingerprints, but those of one block only with their number) and
the candidates compared `PAIRS_PER_BATCH` at a time. The time has a part that grows with the
square, the chance hits: a third of it at 10,000 fingerprints, nine tenths at 100,000 (README,
benchmarks/duplicates.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gtzan_mlops.settings.schema import FingerprintIndex

# Candidate pairs compared at once: each takes 2 x (max_offset + 1) x window items (about 40 kB
# at 15 s and 5 s), so a batch stays near 40 MB however many candidates there are.
PAIRS_PER_BATCH = 1024
# Postings (of all sub-word places) whose hits are generated at once: a block of about 1,000
# fingerprints at 15 s and 5 s, each meeting every other fingerprint's postings by chance at
# most a few times per item and place.
POSTINGS_PER_BLOCK = 2**19


def shifts(settings: FingerprintIndex) -> list[int]:
    """Where each sub-word starts in a 32-bit item: `subwords` of them, evenly spaced."""
    last = 32 - settings.subword_bits
    if settings.subwords == 1:
        return [last]
    return [round(index * last / (settings.subwords - 1)) for index in range(settings.subwords)]


def _heads(fingerprints: list[np.ndarray], span: int) -> np.ndarray:
    """The first `span` items of every fingerprint, one row each (uint32)."""
    short = [index for index, items in enumerate(fingerprints) if len(items) < span]
    if short:
        raise ValueError(f"fingerprints {short[:5]} have fewer than {span} items")
    if not fingerprints:
        return np.zeros((0, span), dtype=np.uint32)
    return np.stack([np.asarray(items[:span], dtype=np.uint32) for items in fingerprints])


@dataclass(frozen=True)
class _Place:
    """The postings of one sub-word place that can meet another fingerprint's: those of keys
    held by 2 to max_key_fingerprints fingerprints, sorted by (key, owner, position)."""

    owners: np.ndarray  # int32, as all four
    positions: np.ndarray
    group_end: np.ndarray  # where the postings of each posting's key end
    rank: np.ndarray  # of the posting owner * span + position among them, -1 if left out


def _place(heads: np.ndarray, shift: int, span: int, settings: FingerprintIndex) -> _Place:
    """The postings of the sub-words starting at bit `shift` of the items (`heads`, flat)."""
    packed = heads.astype(np.uint64)  # then in place: key << 32 | owner * span + position
    packed >>= np.uint64(shift)
    packed &= np.uint64((1 << settings.subword_bits) - 1)
    packed <<= np.uint64(32)
    packed |= np.arange(len(heads), dtype=np.uint64)
    packed.sort()
    keys = packed >> np.uint64(32)
    boundary = np.r_[True, keys[1:] != keys[:-1]]
    del keys
    posting = (packed & np.uint64(0xFFFFFFFF)).astype(np.int32)
    del packed
    owners = (posting // span).astype(np.int32)
    starts = np.flatnonzero(boundary)
    sizes = np.diff(np.r_[starts, len(posting)])
    # How many fingerprints hold each key: a new holder starts where the owner changes.
    new_holder = boundary | np.r_[True, owners[1:] != owners[:-1]]
    holders = np.add.reduceat(new_holder.astype(np.int32), starts)
    del boundary, new_holder
    kept = (holders >= 2) & (holders <= settings.max_key_fingerprints)
    held = np.repeat(kept, sizes)  # most keys of a small collection have one holder
    rank = np.full(len(posting), -1, dtype=np.int32)
    rank[posting[held]] = np.arange(np.count_nonzero(held), dtype=np.int32)
    sizes = sizes[kept]
    return _Place(
        owners=owners[held],
        positions=(posting[held] % span).astype(np.int32),
        group_end=np.repeat(np.cumsum(sizes, dtype=np.int64).astype(np.int32), sizes),
        rank=rank,
    )


def _hits(
    place: _Place, first: np.ndarray, count: int, span: int, window_items: int,
    max_offset_items: int,
) -> np.ndarray:  # fmt: skip
    """The hits from the postings `first` of a place: each with a later posting of its key in
    another fingerprint, at an alignment the comparison tries, coded `((a * count + b) * lanes
    + shift + max_offset) * span + position in a`.

    They are generated a distance d apart in the sorted postings, for d = 1, 2, ... while some
    key still has postings that far apart, so the work is the number of hits, not a loop over
    keys."""
    owners, positions, lanes = place.owners, place.positions, 2 * max_offset_items + 1
    hits = [np.zeros(0, dtype=np.int64)]
    index, distance = first, 1
    while len(index):
        index = index[index + distance < place.group_end[index]]
        first, second = index, index + distance
        a, b = owners[first], owners[second]  # a <= b: postings are sorted by owner in a key
        shift = positions[first] - positions[second]  # b starts `shift` items into a if >= 0
        fits = (a != b) & (np.abs(shift) <= max_offset_items)
        fits &= np.where(shift >= 0, positions[second], positions[first]) < window_items
        pair = a[fits].astype(np.int64) * count + b[fits]
        hits.append((pair * lanes + shift[fits] + max_offset_items) * span + positions[first][fits])
        distance += 1
    return np.concatenate(hits)


def candidate_pairs(
    fingerprints: list[np.ndarray],
    window_items: int,
    max_offset_items: int,
    settings: FingerprintIndex,
) -> np.ndarray:
    """The pairs (i, j), i < j, with at least `min_shared` items sharing a key at one alignment
    that the comparison tries: j starting s items into i (or i into j), |s| <=
    max_offset_items, the item inside the compared window. An array (pairs, 2), sorted. Every
    fingerprint needs window_items + max_offset_items items.

    The hits of a pair are generated with the postings of its first fingerprint i, for a block
    of fingerprints at a time (`POSTINGS_PER_BLOCK` postings): the chance hits, which grow
    with the square of the fingerprints, never all sit in memory at once."""
    span = window_items + max_offset_items
    count, lanes = len(fingerprints), 2 * max_offset_items + 1
    if count * span >= 2**31 or count * count * lanes * span >= 2**63:
        raise ValueError(f"{count} fingerprints: too many for one index (its codes overflow)")
    heads = _heads(fingerprints, span).ravel()
    places = [_place(heads, shift, span, settings) for shift in shifts(settings)]
    del heads
    per_block = max(1, POSTINGS_PER_BLOCK // (span * len(places)))
    found = [np.zeros(0, dtype=np.int64)]
    for low in range(0, count, per_block):
        postings = slice(low * span, min(low + per_block, count) * span)
        hits = np.concatenate(
            [
                _hits(place, _firsts(place, postings), count, span, window_items, max_offset_items)
                for place in places
            ]
        )
        # Overlapping sub-words of one item agree together: count the items, not the keys.
        alignments = _distinct(hits)
        del hits
        alignments //= span
        starts = np.flatnonzero(np.r_[True, alignments[1:] != alignments[:-1]])
        shared = np.diff(np.r_[starts, len(alignments)])
        found.append(_distinct(alignments[starts[shared >= settings.min_shared]] // lanes))
    pairs = np.concatenate(found)  # sorted: the blocks follow i
    return np.stack([pairs // count, pairs % count], axis=1)


def _firsts(place: _Place, postings: slice) -> np.ndarray:
    """Where a block's postings (owner * span + position) are among a place's, in order (the
    gathers from them then run through memory forwards)."""
    ranks = place.rank[postings]
    return np.sort(ranks[ranks >= 0])


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted; `values` is sorted in place (np.unique hashes first, many
    times slower on 10^7 integers)."""
    values.sort()
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def compare_pairs(
    fingerprints: list[np.ndarray],
    pairs: np.ndarray,
    window_items: int,
    max_offset_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, offset), each (pairs, 2), of every pair (i, j): in column 0 j starting
    `offset` items into i, in column 1 i into j. The similarity is the best share of agreeing
    bits between `window_items` items of one from item `offset` and the first `window_items`
    of the other, over 0 <= offset <= max_offset_items; the offset is the first that gives it.

    Counted as differing bits (popcount of the XOR), then the all-pairs product's float32
    arithmetic on the same exact integers, so the same values: that product gave (dot + bits)
    / (2 bits) with dot = bits - 2 differing, a sum of ±1 below 2^24, exact in float32."""
    span = window_items + max_offset_items
    bits = window_items * 32
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    similarity = np.zeros((len(pairs), 2), dtype=np.float32)
    offset = np.zeros((len(pairs), 2), dtype=np.int64)
    for start in range(0, len(pairs), PAIRS_PER_BATCH):
        batch = pairs[start : start + PAIRS_PER_BATCH]
        firsts = _heads([fingerprints[i] for i in batch[:, 0]], span)
        seconds = _heads([fingerprints[i] for i in batch[:, 1]], span)
        for column, (moving, fixed) in enumerate(((firsts, seconds), (seconds, firsts))):
            shifted = sliding_window_view(moving, window_items, axis=1)  # (pairs, offsets, items)
            starts = fixed[:, None, :window_items]
            differing = np.bitwise_count(shifted ^ starts).sum(axis=2, dtype=np.int64)
            scores = (2 * (bits - differing)).astype(np.float32) / np.float32(2 * bits)
            best = np.argmax(scores, axis=1)  # the first of equal values, as the matrix kept it
            rows = np.arange(len(batch))
            similarity[start : start + len(batch), column] = scores[rows, best]
            offset[start : start + len(batch), column] = best
    return similarity, offset
