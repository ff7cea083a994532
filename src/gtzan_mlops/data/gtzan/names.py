"""GTZAN's names: a clip's track id is its file's name without the extension (`blues.00012`),
its genre the name of its folder; the artist-filtered lists and the reference tables name clips
by path (`blues/blues.00029.wav`) or by file name (`blues.00029.au`)."""

from __future__ import annotations

from pathlib import Path


def track_id(path: Path) -> str:
    """`genres/blues/blues.00012.au` -> `blues.00012`."""
    return path.stem


def genre_of(path: Path) -> str:
    """`genres/blues/blues.00012.au` -> `blues`: the folder, whatever the file is called."""
    return path.parent.name


def track_id_of_list_entry(entry: str) -> str:
    """`blues/blues.00029.wav` (or .au, or a bare file name) -> `blues.00029`."""
    return Path(entry.strip()).stem
