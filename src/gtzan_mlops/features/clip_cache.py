"""The features stage's per-clip cache: each finished clip's feature sets in one file, keyed by
the audio's sha256 under a key of everything else that decides a feature value: the feature
settings, the musicnn weights and the extraction code (the source of the modules that compute a
clip's features, the versions of the libraries they call). A rerun after adding clips, or after
an interruption, extracts only what is missing; other settings or code never reuse an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from gtzan_mlops.features import musicnn
from gtzan_mlops.features.feature_sets import ExtractedSets, ExtractionSettings
from gtzan_mlops.features.handcrafted import ClipFeatures
from gtzan_mlops.tracking import compute_closure

# What computes a clip's feature values besides its settings: the decoding and extraction code
# (extract_sets and what it imports, decoding among it), not the pool, the cache or the tables.
EXTRACTION_MODULES = compute_closure("features.feature_sets")
EXTRACTION_LIBRARIES = ("librosa", "numpy", "scipy", "soundfile", "soxr", "tensorflow-cpu", "keras")


def extraction_code_fingerprint() -> dict[str, str]:
    """sha256 of the extraction modules and the versions of the libraries they call."""
    from importlib.metadata import version

    from gtzan_mlops.tracking import source_digest

    return {
        "source": source_digest(*EXTRACTION_MODULES),
        **{name: version(name) for name in EXTRACTION_LIBRARIES},
    }


def settings_key(settings: ExtractionSettings) -> str:
    """A short hash of everything that decides a feature value: settings, weights and code."""
    payload = json.dumps(
        {
            **settings.features.to_dict(),
            "musicnn_weights": musicnn.weights_digest(settings.musicnn_weights)
            if settings.musicnn_weights
            else None,
            "code": extraction_code_fingerprint(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_cached(path: Path) -> ExtractedSets | None:
    """The feature sets cached at `path`; None when absent or unreadable (a partial file from an
    interrupted run): the clip is extracted again."""
    try:
        with np.load(path) as cached:
            embedded = "musicnn_segments" in cached  # absent: hand-crafted only (see settings_key)
            return ExtractedSets(
                ClipFeatures(cached["clip"], cached["segments"]),
                int(cached["length"]),
                cached["musicnn_segments"] if embedded else None,
                cached["musicnn_tags"] if embedded else None,
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_cached(path: Path, extracted: ExtractedSets) -> None:
    """`extracted` at `path`, written atomically: an interrupted write never leaves a readable
    partial entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as handle:
        embeddings = (
            {"musicnn_segments": extracted.musicnn_segments, "musicnn_tags": extracted.musicnn_tags}
            if extracted.musicnn_segments is not None
            else {}
        )
        np.savez(
            handle,
            clip=extracted.handcrafted.clip,
            segments=extracted.handcrafted.segments,
            length=extracted.length,
            **embeddings,
        )
    partial.replace(path)
