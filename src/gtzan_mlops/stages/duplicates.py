"""`gtzan-mlops duplicates`: the clips that are one recording, however they were copied.

GTZAN holds exact and near repetitions of recordings under different track ids (Sturm, "The
GTZAN dataset", 2013), and folders users add hold re-encoded, gain-changed or trimmed copies.
A split that knows songs only by their id puts such copies on both sides. This stage finds them
(data/duplicates.py): identical decoded samples, or Chromaprint fingerprints agreeing on at
least `min_similarity` of their bits, compared only where an inverted index of fingerprint
sub-words finds a candidate pair (data/fingerprint_index.py), so it scales to many clips.

Clips linked by a match form a duplicate group. Outputs: `data/duplicates.csv` (every usable clip
of the manifest: its samples' sha256, fingerprint length and `duplicate_group`, empty when it
has no duplicate), `data/duplicate_pairs.csv` (every matched pair: how, similarity, offset) and
`reports/duplicates/duplicates.md` (every group). The split stage keeps each group on one side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data.duplicates import DuplicatesError, analyse, report_markdown
from gtzan_mlops.data.splits import GROUP_COLUMN
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Settings

REPORT_FILE = "duplicates.md"  # in paths.duplicates_report


def run(settings: Settings, root: Path) -> dict[str, Any]:
    paths = settings.paths
    manifest_path = resolve_path(paths.manifest, root)
    try:
        manifest = pd.read_csv(manifest_path, dtype={"track_id": str})
    except FileNotFoundError:
        raise DuplicatesError(f"{manifest_path}: no such file (run the fetch stage)") from None
    workers = settings.resources.duplicates.workers or os.cpu_count() or 1
    clips, pairs = analyse(manifest, root, settings.duplicates, workers)
    clips.to_csv(resolve_path(paths.duplicates, root), index=False)
    pairs.to_csv(resolve_path(paths.duplicate_pairs, root), index=False)
    report = resolve_path(paths.duplicates_report, root) / REPORT_FILE
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(report_markdown(clips, pairs, settings.duplicates) + "\n", encoding="utf-8")
    grouped = clips[clips[GROUP_COLUMN] != ""]
    return {
        "clips": len(clips),
        "duplicate_groups": int(grouped[GROUP_COLUMN].nunique()),
        "clips_in_groups": len(grouped),
        "pairs": len(pairs),
        "not_fingerprinted": int((clips["fingerprint_items"] == 0).sum()),
    }


def describe(summary: dict[str, Any]) -> str:
    return (
        f"duplicates: {summary['duplicate_groups']} groups ({summary['clips_in_groups']} of "
        f"{summary['clips']} clips, {summary['pairs']} matched pairs)"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "duplicates",
        __doc__.split("\n\n")[0].split(": ", 1)[1],
        run,
        argv,
        errors=(DuplicatesError,),
        describe=describe,
    )
