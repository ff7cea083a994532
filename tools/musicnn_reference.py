"""Regenerate tests/model/musicnn_reference.json: what the ORIGINAL musicnn code computes for a
few log-mel patches of real clips, the figures that the Keras 3 port
(src/gtzan_mlops/features/musicnn.py) must reproduce.

Why: the port rebuilds MSD_musicnn by hand. Its own tests show that every checkpoint variable is
used and that the tags make sense, but not that padding, pooling, batch-norm settings and layer
order are the original's. Only running the original network on the same input shows that.

How: the script runs twice.
- In the project's venv (`.venv/bin/python tools/musicnn_reference.py`), it computes the input
  patches with the project's own front end (`load_waveform`, `log_mel`, `patch_starts`), so that
  the comparison is about the network alone. It never installs anything into that venv.
- It makes a throwaway venv (a temporary folder, or --workdir) with the project's pinned
  tensorflow-cpu, numpy and librosa (constrained by requirements.lock), tf-keras of the same
  version (TF 2.16+ routes `tf.compat.v1.layers` through Keras 2, which Keras 3 no longer
  provides) and the hash-checked musicnn 0.1.0 wheel (requirements-nodeps.lock), all the wheel's
  pins (numpy<1.17, TF1) skipped with --no-deps. It then runs itself there with --inner: the
  wheel's `extractor.extractor` for MSD_musicnn, i.e. its `models.py` network on
  `tf.compat.v1` placeholders, restored with `tf.compat.v1.train.Saver` from the wheel's own
  checkpoint, with the project's patches fed in place of its `batch_data`. The wheel's own
  spectrogram (`batch_data`) is also computed on each whole clip, as a separate figure for the
  project's `log_mel`.

The wheel's code needs small fixes on today's stacks; each is a textual patch of the wheel's
source applied at run time (never to the installed file), checked to match exactly once; see
`EXTRACTOR_PATCHES`.

The MSD_musicnn network and weights are (c) Music Technology Group, Universitat Pompeu Fabra,
under the ISC licence (src/gtzan_mlops/MUSICNN_NOTICE).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
GTZAN_MINI = REPO_ROOT.parent / "shared" / "data" / "gtzan_mini"
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "model" / "musicnn_reference.json"
REGENERATE_COMMAND = ".venv/bin/python tools/musicnn_reference.py"

# One clip of three genres far apart, paths relative to gtzan_mini.
DEFAULT_CLIPS = (
    "genres/classical/classical.00000.wav",
    "genres/metal/metal.00000.wav",
    "genres/jazz/jazz.00000.wav",
)
# The first three 3 s segments, as the pipeline segments a clip
# (gtzan_mlops.features.musicnn.patch_starts).
SEGMENT_STARTS_S = (0.0, 3.0, 6.0)
SIGNIFICANT_DIGITS = 7  # float32 carries about 7.2 decimal digits

MODEL = "MSD_musicnn"
MUSICNN_VERSION = "0.1.0"
# The packages of the throwaway venv whose versions are the project's (requirements.lock).
PROJECT_PINNED = ("tensorflow_cpu", "numpy", "librosa")

# (what breaks, original text, replacement) for musicnn 0.1.0's extractor.py.
EXTRACTOR_PATCHES: tuple[tuple[str, str, str], ...] = (
    (
        # NumPy 2 (NEP 50): the Python int 10000 no longer promotes the float16 spectrogram to
        # float32 as NumPy 1's value-based casting did (uint16 x float16 -> float32), so the
        # product stays float16 and every mel value above ~6.55 becomes inf. Computed in
        # float32, as under the NumPy the wheel was written for; the float16 rounding is kept.
        "NumPy 2 float16 overflow in batch_data",
        "audio_rep = np.log10(10000 * audio_rep + 1)",
        "audio_rep = np.log10(10000 * audio_rep.astype(np.float32) + 1)",
    ),
    (
        # The loop over the batches after the first unpacks into midend1_, midend2_, midend3_
        # and backend_ but concatenates cnn1_, cnn2_, cnn3_ and penultimate_, the first batch's
        # values: every later patch got the first patch's features. Unpack into the names used.
        "stale loop variables in extractor's batch loop",
        "predicted_tags, timbral_, temporal_, midend1_, midend2_, midend3_, mean_pool_, "
        "max_pool_, backend_ = tf_out",
        "predicted_tags, timbral_, temporal_, cnn1_, cnn2_, cnn3_, mean_pool_, "
        "max_pool_, penultimate_ = tf_out",
    ),
    (
        # The restore sits in a bare `except:` that only re-raises for two other models: a
        # failed restore of MSD_musicnn would silently leave random weights in the reference.
        # An empty tuple matches no exception, so the restore's error propagates.
        "bare except around the checkpoint restore",
        "    except:\n        if model == 'MSD_musicnn_big':",
        "    except ():\n        if model == 'MSD_musicnn_big':",
    ),
)


# --- the project's side (project venv) ------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project_patches(clip: Path) -> tuple[Any, Any, list[int]]:
    """(whole log-mel spectrogram, (3, 187, 96) patches, their start frames) of a clip, by the
    project's own front end, as MusicnnEmbedder.embed computes them."""
    import numpy as np

    from gtzan_mlops.data.audio import load_waveform
    from gtzan_mlops.features.musicnn import PATCH_FRAMES, SAMPLE_RATE, log_mel, patch_starts

    spectrogram = log_mel(load_waveform(clip, SAMPLE_RATE))
    starts = patch_starts(list(SEGMENT_STARTS_S), len(spectrogram))
    patches = np.stack([spectrogram[start : start + PATCH_FRAMES] for start in starts])
    return spectrogram, patches, starts


def lock_pins(lock: Path, names: tuple[str, ...]) -> dict[str, str]:
    """name -> version of `names` in a `name==version` lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.replace("-", "_").lower() in names:
            pins[name] = version.split()[0]
    missing = set(names) - {name.replace("-", "_").lower() for name in pins}
    if missing:
        raise SystemExit(f"{lock}: no pin for {', '.join(sorted(missing))}")
    return pins


def make_reference_venv(venv: Path) -> Path:
    """Create (or reuse, if complete) the throwaway venv; its python."""
    python = venv / "bin" / "python"
    marker = venv / ".musicnn-reference-complete"
    if marker.is_file():
        return python
    # `-m venv` from a venv builds on the base interpreter: nothing of the project's venv leaks in.
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pins = lock_pins(REPO_ROOT / "requirements.lock", PROJECT_PINNED)
    tf_version = next(v for n, v in pins.items() if n.lower().startswith("tensorflow"))
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    requirements = [f"{name}=={version}" for name, version in pins.items()]
    # The whole tree at the project's versions.
    subprocess.run([*pip, "-c", str(REPO_ROOT / "requirements.lock"), *requirements], check=True)
    # tf-keras declares `tensorflow` (not -cpu) as a dependency: --no-deps keeps the CPU build.
    subprocess.run([*pip, "--no-deps", f"tf-keras=={tf_version}"], check=True)
    # musicnn pins numpy<1.17 and TF1: --no-deps, and the project's hash of the wheel.
    nodeps_lock = REPO_ROOT / "requirements-nodeps.lock"
    subprocess.run([*pip, "--no-deps", "--require-hashes", "-r", str(nodeps_lock)], check=True)
    marker.touch()
    return python


def run_reference(workdir: Path, clips: list[str], output: Path) -> dict[str, Any]:
    """Compute the project's patches, run the original in the throwaway venv, write `output`."""
    import numpy as np

    started = time.monotonic()
    inputs: dict[str, Any] = {}
    project_spectrograms = {}
    clip_records = []
    for index, relative in enumerate(clips):
        path = GTZAN_MINI / relative
        spectrogram, patches, starts = project_patches(path)
        project_spectrograms[relative] = spectrogram
        inputs[f"path_{index}"] = np.array(str(path))
        inputs[f"patches_{index}"] = patches
        clip_records.append(
            {"path": relative, "sha256": sha256_of(path), "patch_start_frames": starts}
        )
    patches_file = workdir / "patches.npz"
    np.savez(patches_file, count=len(clips), **inputs)

    python = make_reference_venv(workdir / "venv")
    results_file = workdir / "original.npz"
    environment = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    environment.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [str(python), __file__, "--inner", str(patches_file), str(results_file)],
        check=True,
        cwd=workdir,
        env=environment,
    )
    original = np.load(results_file)
    versions = json.loads(str(original["versions"]))

    for index, record in enumerate(clip_records):
        embeddings = original[f"penultimate_{index}"]
        tags = original[f"tags_{index}"]
        own_spectrogram = original[f"spectrogram_{index}"]
        ours = project_spectrograms[record["path"]]
        if own_spectrogram.shape != ours.shape:
            raise SystemExit(
                f"{record['path']}: the original's spectrogram has shape {own_spectrogram.shape},"
                f" the project's {ours.shape}"
            )
        record["front_end_max_abs_diff"] = float(np.max(np.abs(own_spectrogram - ours)))
        record["embeddings"] = rounded(embeddings)
        record["tag_probabilities"] = rounded(tags)

    reference = {
        "provenance": {
            "what": (
                "MSD_musicnn penultimate-layer embeddings (batch-normalised dense layer, 200 "
                "units) and sigmoid tag probabilities (50 MSD tags, in "
                "gtzan_mlops.features.musicnn.MSD_TAGS order) computed by the original musicnn "
                "extractor code (TF1 graph via "
                "tf.compat.v1) on log-mel patches made by the project's log_mel"
            ),
            "model": MODEL,
            "musicnn_version": versions["musicnn"],
            "tensorflow_version": versions["tensorflow"],
            "tf_keras_version": versions["tf_keras"],
            "numpy_version": versions["numpy"],
            "librosa_version": versions["librosa"],
            "extractor_patches": [what for what, _, _ in EXTRACTOR_PATCHES],
            "clips_root": "shared/data/gtzan_mini",
            "segment_starts_s": list(SEGMENT_STARTS_S),
            "significant_digits": SIGNIFICANT_DIGITS,
            "front_end_max_abs_diff": (
                "per clip: max |original batch_data log-mel - project log_mel| over the whole "
                "clip (both at 16 kHz, librosa's soxr_hq resampling)"
            ),
            "date": datetime.date.today().isoformat(),
            "regenerate": REGENERATE_COMMAND,
        },
        "clips": clip_records,
    }
    output.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {output} ({output.stat().st_size} bytes) in {time.monotonic() - started:.0f} s")
    return reference


def rounded(values: Any) -> list:
    """Nested lists of floats with SIGNIFICANT_DIGITS significant digits."""
    import numpy as np

    return np.vectorize(lambda x: float(f"{x:.{SIGNIFICANT_DIGITS}g}"), otypes=[float])(
        np.asarray(values, dtype=np.float64)
    ).tolist()


# --- the original's side (throwaway venv) ---------------------------------------------------


def patched_extractor() -> types.ModuleType:
    """musicnn.extractor with EXTRACTOR_PATCHES applied to its source, each exactly once."""
    import importlib.util

    spec = importlib.util.find_spec("musicnn.extractor")
    source = Path(spec.origin).read_text()
    for what, original, replacement in EXTRACTOR_PATCHES:
        count = source.count(original)
        if count != 1:
            raise SystemExit(f"patch '{what}': found {count} times in {spec.origin}, expected 1")
        source = source.replace(original, replacement)
    module = types.ModuleType("musicnn.extractor")
    module.__file__ = spec.origin  # the checkpoint is found beside it
    sys.modules["musicnn.extractor"] = module
    exec(compile(source, spec.origin, "exec"), module.__dict__)
    return module


def run_original(patches_file: Path, results_file: Path) -> None:
    """Run the wheel's extractor on each clip's patches; save its outputs and versions."""
    import importlib.metadata
    import warnings

    import numpy as np
    import tensorflow as tf

    # Every tf.compat.v1.layers call warns that it is deprecated: known, and noise here.
    warnings.filterwarnings("ignore", message=r"`tf\.layers\.", category=UserWarning)
    extractor = patched_extractor()
    if "/site-packages/musicnn/" not in extractor.__file__ or sys.prefix == sys.base_prefix:
        raise SystemExit(f"musicnn from {extractor.__file__}: expected the throwaway venv's")
    inputs = np.load(patches_file)
    original_batch_data = extractor.batch_data
    results: dict[str, Any] = {}
    for index in range(int(inputs["count"])):
        path = str(inputs[f"path_{index}"])
        patches = inputs[f"patches_{index}"].astype(np.float32)
        # The original's own spectrogram of the whole clip (patched for NumPy 2).
        _, spectrogram = original_batch_data(path, patches.shape[1], patches.shape[1])
        results[f"spectrogram_{index}"] = spectrogram.astype(np.float32)

        # The project's patches in place of batch_data's, through the extractor unchanged
        # otherwise: graph, restore, one patch per session run (configuration.BATCH_SIZE).
        def fixed_batch(file_name: str, n_frames: int, overlap: int, patches=patches) -> tuple:
            if n_frames != patches.shape[1]:
                raise SystemExit(f"extractor asked for {n_frames}-frame patches")
            return patches, None

        extractor.batch_data = fixed_batch
        taggram, labels, features = extractor.extractor(
            path, model=MODEL, input_length=3, input_overlap=False, extract_features=True
        )
        results[f"tags_{index}"] = taggram
        results[f"penultimate_{index}"] = features["penultimate"]
        if len(labels) != 50 or taggram.shape != (len(patches), 50):
            raise SystemExit(f"unexpected taggram {taggram.shape} for {len(labels)} labels")
    versions = {
        "musicnn": importlib.metadata.version("musicnn"),
        "tensorflow": tf.__version__,
        "tf_keras": importlib.metadata.version("tf-keras"),
        "numpy": np.__version__,
        "librosa": importlib.metadata.version("librosa"),
    }
    if versions["musicnn"] != MUSICNN_VERSION:
        raise SystemExit(f"musicnn {versions['musicnn']} installed, expected {MUSICNN_VERSION}")
    np.savez(results_file, versions=np.array(json.dumps(versions)), **results)


# --- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the throwaway venv and intermediate files, kept (and its venv reused) "
        "after the run; default: a temporary folder, removed",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--clip", action="append", help="clip path under gtzan_mini (repeatable); default: three"
    )
    parser.add_argument("--inner", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        run_original(*args.inner)
        return 0
    clips = args.clip or list(DEFAULT_CLIPS)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run_reference(args.workdir.resolve(), clips, args.output)
    else:
        with tempfile.TemporaryDirectory(prefix="musicnn-reference-") as folder:
            run_reference(Path(folder), clips, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
