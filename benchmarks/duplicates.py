"""What the duplicates stage sees on the real clips: the largest fingerprint similarity between
two different clips of ../shared's 70, and how copies of one real clip score against it (a FLAC
copy, a 16 kHz re-encode at -6 dB, the same recording starting 2 s later) beside another song of
the same artist. The copies are made here, in a temporary folder.

    python benchmarks/duplicates.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import soundfile

from gtzan_mlops.data import duplicates
from gtzan_mlops.data.manifest import ManifestGates, build_manifest
from gtzan_mlops.settings.loading import load_settings
from gtzan_mlops.stages import duplicates as duplicates_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
GENRES_DIR = REPO_ROOT.parent / "shared" / "data" / "gtzan_mini" / "genres"


def main() -> None:
    params = load_settings(REPO_ROOT / "params.yaml")
    settings = params.duplicates
    paths = sorted(GENRES_DIR.glob("*/*.wav"))
    prints = [duplicates.fingerprint(path, settings.fingerprint_seconds) for path in paths]
    similarity, _ = duplicates.fingerprint_matches(
        prints, duplicates.window_items(settings), duplicates.max_offset_items(settings)
    )
    np.fill_diagonal(similarity, 0)
    either = np.maximum(similarity, similarity.T)
    first, second = np.unravel_index(either.argmax(), either.shape)
    print(
        f"{len(paths)} real clips: largest similarity between two different clips "
        f"{either.max():.3f} ({paths[first].stem}, {paths[second].stem}); "
        f"a match needs {settings.min_similarity}"
    )

    gates = ManifestGates.of(params)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "data/raw/genres/blues"
        folder.mkdir(parents=True)
        for name in ("blues.00000", "blues.00001"):  # two John Lee Hooker songs
            shutil.copyfile(GENRES_DIR / f"blues/{name}.wav", folder / f"{name}.wav")
        samples, rate = soundfile.read(GENRES_DIR / "blues/blues.00000.wav", dtype="float32")
        soundfile.write(folder / "blues.90000.flac", samples, rate)
        quieter = librosa.resample(samples, orig_sr=rate, target_sr=16000) * 10 ** (-6 / 20)
        soundfile.write(folder / "blues.90001.wav", quieter, 16000)
        soundfile.write(folder / "blues.90002.wav", samples[2 * rate :], rate)
        manifest = build_manifest(root / "data/raw", root, "copies", gates, 2, False)
        manifest.to_csv(root / "data/manifest.csv", index=False)
        print(duplicates_stage.describe(duplicates_stage.run(params, root)))
        print(pd.read_csv(root / params.paths.duplicate_pairs).to_string(index=False))


if __name__ == "__main__":
    main()
