"""The artist-filtered ("fault-filtered") GTZAN lists of Kereliuk, Sturm and Larsen (2015): 443
train, 197 valid and 290 test clips with no artist on two sides and the known-faulty clips left
out, published in github.com/coreyker/dnn-mgr (folder gtzan/). They are read from a folder of
one's own, or downloaded from `split.artist_filtered.url` (pinned to a commit of that
repository) and checked against the published lists' sha256: they decide which clips are test
clips.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gtzan_mlops.data.gtzan.names import track_id_of_list_entry
from gtzan_mlops.data.splits import SUBSETS
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import ArtistFiltered

LIST_FILES = {subset: f"{subset}_filtered.txt" for subset in SUBSETS}
PUBLISHED_AT = (
    "https://github.com/coreyker/dnn-mgr/tree/05f95ff5404d6c3e6f0594d0ffd2711e8a790dcc/gtzan"
)


def read_filtered_lists(folder: Path) -> dict[str, list[str]]:
    """The three artist-filtered lists as track ids, per subset."""
    lists = {}
    for subset, name in LIST_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(
                f"{path}: artist-filtered list not found; set split.artist_filtered.lists_dir "
                f"to the folder holding train/valid/test_filtered.txt (from {PUBLISHED_AT})"
            )
        entries = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        lists[subset] = [track_id_of_list_entry(entry) for entry in entries]
    return lists


def download_filtered_lists(
    base_url: str, folder: Path, timeout_s: float, sha256: dict[str, str] | None
) -> Path:
    """Fetch the three list files from `base_url` into `folder` (once); returns `folder`. With
    `sha256` (file name -> digest), a download or an earlier one whose content differs is
    refused: the lists decide which clips are test clips."""
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    for name in LIST_FILES.values():
        target = folder / name
        url = f"{base_url.rstrip('/')}/{name}"
        if target.is_file():
            _check_digest(target.read_bytes(), sha256, name, str(target))
            continue
        try:
            response = requests.get(url, timeout=timeout_s)
            response.raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                f"{url}: could not download the artist-filtered list ({error}); download "
                f"train/valid/test_filtered.txt by hand and set split.artist_filtered.lists_dir"
            ) from error
        _check_digest(response.content, sha256, name, url)
        partial = target.with_suffix(".part")
        partial.write_bytes(response.content)
        partial.replace(target)
    return folder


def _check_digest(content: bytes, sha256: dict[str, str] | None, name: str, where: str) -> None:
    if sha256 is None:
        return
    found = hashlib.sha256(content).hexdigest()
    if found != sha256[name]:
        raise ConfigError(
            f"{where}: sha256 {found} is not the published list's {sha256[name]} "
            "(split.artist_filtered.sha256); delete it to download it again, or set sha256 to "
            "null to use lists of your own"
        )


def lists_folder(settings: ArtistFiltered, root: Path) -> Path:
    """The folder of the lists: `lists_dir`, else the download folder, filled from `url` once
    (the published lists' sha256 checked, see `download_filtered_lists`)."""
    if settings.lists_dir:
        return resolve_path(settings.lists_dir, root)
    return download_filtered_lists(
        settings.url,
        resolve_path(settings.download_dir, root),
        settings.timeout_s,
        dict(settings.sha256) if settings.sha256 is not None else None,
    )


def filtered_lists(settings: ArtistFiltered, root: Path) -> dict[str, list[str]]:
    """The artist-filtered lists of `split.artist_filtered`, as track ids per subset."""
    return read_filtered_lists(lists_folder(settings, root))
