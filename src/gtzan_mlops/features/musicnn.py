"""Pretrained MSD_musicnn embeddings: the architecture as a Keras 3 model, weights from the
checkpoint that the `musicnn` wheel carries.

MSD_musicnn (Pons and Serra, "musicnn: pre-trained convolutional neural networks for music audio
tagging", 2019; ISC licence, © Music Technology Group, Universitat Pompeu Fabra, see
`MUSICNN_NOTICE` beside this file) is a tagger trained on the Million Song Dataset's 50 most
frequent Last.fm tags. Its input is a log-compressed mel patch of 187 frames (about 3 s at
16 kHz); its penultimate layer (200 units, after batch normalisation) is the embedding used
here, one per 3 s segment, and its sigmoid outputs are the 50 tag probabilities.

The `musicnn` package is used only as the carrier of the checkpoint files: its own extractor is
TF1 graph code, restores the weights inside a bare `except:` (a failed restore would silently
serve random weights) and, under NumPy 2, overflows its float16 input and repeats the first
patch's features for every patch. Here every non-optimizer checkpoint variable must be used by
exactly one model weight, or loading fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gtzan_mlops.features.tf_runtime import import_tensorflow

MODEL_NAME = "MSD_musicnn"

# The model's input, as musicnn's configuration.py and its training config.json define it: not
# settings, since the weights are only valid for these values.
SAMPLE_RATE = 16000
N_FFT = 512
HOP_LENGTH = 256
N_MELS = 96
PATCH_FRAMES = 187  # librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1
EMBEDDING_SIZE = 200
# musicnn's configuration.MSD_LABELS, in the order of the tag outputs.
MSD_TAGS: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill",
    "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
    "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock",
    "60s", "rnb", "indie pop", "sad", "House", "happy",
)  # fmt: skip
EMBEDDING_NAMES: tuple[str, ...] = tuple(f"musicnn_{i:03d}" for i in range(EMBEDDING_SIZE))

# The checkpoint's files, by the prefix "" inside the model folder (".index", ".data-...").
CHECKPOINT_FILES = (".index", ".data-00000-of-00001")
# Checkpoint variables of the optimizer, not of the model.
_OPTIMIZER_MARKERS = ("/Adam", "beta1_power", "beta2_power")


class MusicnnError(ValueError):
    """The musicnn weights are missing, incomplete or do not fit the model."""


def packaged_weights_dir() -> Path:
    """The MSD_musicnn checkpoint folder inside the installed `musicnn` wheel, found without
    importing the package (its modules are TF1 code)."""
    spec = importlib.util.find_spec("musicnn")
    if spec is None or not spec.submodule_search_locations:
        raise MusicnnError(
            "the musicnn package is not installed: it carries the MSD_musicnn weights "
            "(install the project with `make setup`, which installs it from "
            "requirements-nodeps.lock)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_NAME


def weights_dir(configured: str | os.PathLike[str] | None) -> Path:
    """The checkpoint folder: `configured` if given, else the one in the musicnn wheel; checked
    for the checkpoint's files."""
    folder = Path(configured) if configured else packaged_weights_dir()
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise MusicnnError(f"{folder}: no MSD_musicnn checkpoint (missing {', '.join(missing)})")
    return folder


def weights_digest(folder: Path) -> str:
    """sha256 of the checkpoint's files: part of the key of every cached embedding."""
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


# --- input ----------------------------------------------------------------------------------


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """(frames, 96) float32 input of a mono waveform at 16 kHz, as musicnn computes it: librosa's
    power mel spectrogram (n_fft 512, hop 256, 96 bands), cast to float16 and compressed with
    log10(10000 x + 1).

    The product is computed in float32: under NumPy 2 the original `10000 * x` stays float16 and
    every value above about 6.55 becomes inf. The cast to float16 is kept, since the model was
    trained on its rounding.
    """
    import librosa

    mel = librosa.feature.melspectrogram(
        y=np.asarray(waveform, dtype=np.float32),
        sr=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        n_fft=N_FFT,
        n_mels=N_MELS,
    ).T
    rounded = mel.astype(np.float16).astype(np.float32)
    return np.log10(np.float32(10000.0) * rounded + np.float32(1.0))


def patch_starts(starts_s: list[float], n_frames: int) -> list[int]:
    """The first mel frame of the patch of each segment starting at `starts_s` seconds: the
    nearest frame, moved back so that the patch ends inside the spectrogram."""
    if n_frames < PATCH_FRAMES:
        raise MusicnnError(
            f"{n_frames} mel frames are fewer than one {PATCH_FRAMES}-frame musicnn patch"
        )
    last = n_frames - PATCH_FRAMES
    return [min(round(start * SAMPLE_RATE / HOP_LENGTH), last) for start in starts_s]


# --- the model ------------------------------------------------------------------------------


def build_model() -> Any:
    """MSD_musicnn as a Keras 3 functional model: (batch, 187, 96) log-mel patches in,
    (embedding (batch, 200), tag logits (batch, 50)) out.

    Layer names are the checkpoint's variable scopes: TF1's `tf.compat.v1.layers` named them
    conv2d, conv2d_1, ... and batch_normalization, batch_normalization_1, ... in the order
    musicnn's `build_musicnn` created them, which is the order below.
    """
    import_tensorflow()
    import keras
    from keras import layers, ops

    counters = {"conv2d": 0, "batch_normalization": 0, "dense": 0}

    def scope(kind: str) -> str:
        number = counters[kind]
        counters[kind] += 1
        return kind if number == 0 else f"{kind}_{number}"

    def batch_norm(tensor: Any) -> Any:
        # TF1's defaults: epsilon 1e-3 (Keras' too), statistics over the last axis.
        return layers.BatchNormalization(epsilon=1e-3, name=scope("batch_normalization"))(tensor)

    def pad_time(tensor: Any) -> Any:
        return layers.ZeroPadding2D(padding=((3, 3), (0, 0)))(tensor)

    def conv_block(tensor: Any, filters: int, kernel: tuple[int, int], padding: str) -> Any:
        """Conv (ReLU), batch norm, max over the frequency axis: (batch, time, filters)."""
        conv = layers.Conv2D(
            filters, kernel, padding=padding, activation="relu", name=scope("conv2d")
        )(tensor)
        normalised = batch_norm(conv)
        return ops.max(normalised, axis=2)

    patches = keras.Input(shape=(PATCH_FRAMES, N_MELS), name="log_mel")
    normalised = batch_norm(ops.expand_dims(patches, 3))

    # Front end: timbral filters (7 frames x 40 % and 70 % of the bands), temporal filters
    # (128, 64, 32 frames x 1 band); 1.6 x 128 = 204 and 1.6 x 32 = 51 filters.
    padded = pad_time(normalised)
    timbral_74 = conv_block(padded, 204, (7, int(0.4 * N_MELS)), "valid")
    timbral_77 = conv_block(padded, 204, (7, int(0.7 * N_MELS)), "valid")
    temporal = [conv_block(normalised, 51, (length, 1), "same") for length in (128, 64, 32)]
    front_end = ops.concatenate([timbral_74, timbral_77, *temporal], axis=2)  # (b, 187, 561)

    # Mid end: three 7-frame convolutions over all channels, the last two residual.
    mid_input = ops.expand_dims(front_end, 3)
    outputs = [mid_input]
    current = mid_input
    for index in range(3):
        width = current.shape[2]
        conv = layers.Conv2D(
            64, (7, width), padding="valid", activation="relu", name=scope("conv2d")
        )(pad_time(current))
        transposed = ops.transpose(batch_norm(conv), (0, 1, 3, 2))  # (b, 187, 64, 1)
        current = transposed if index == 0 else ops.add(transposed, current)
        outputs.append(current)
    mid_end = ops.concatenate(outputs, axis=2)  # (b, 187, 753, 1)

    # Back end: max and mean over time, interleaved per channel as TF1's concat + flatten did.
    pooled = ops.concatenate([ops.max(mid_end, axis=1), ops.mean(mid_end, axis=1)], axis=2)
    flat = batch_norm(layers.Flatten()(pooled))  # (b, 1506)
    dense = layers.Dense(EMBEDDING_SIZE, activation="relu", name=scope("dense"))(flat)
    embedding = batch_norm(dense)  # musicnn's "penultimate"
    logits = layers.Dense(len(MSD_TAGS), name=scope("dense"))(embedding)
    return keras.Model(patches, [embedding, logits], name=MODEL_NAME)


def _checkpoint_key(weight: Any) -> str:
    # Keras 3 paths are "<layer name>/<variable name>", e.g. "conv2d_1/kernel".
    return weight.path


def load_checkpoint(model: Any, folder: Path) -> None:
    """Set every weight of `model` from the TF1 checkpoint in `folder`.

    Read through the checkpoint's ".index" prefix: `tf.train.load_checkpoint(folder)` follows
    the folder's stale `checkpoint` file to the author's machine.
    """
    tf = import_tensorflow()

    try:
        reader = tf.compat.v1.train.NewCheckpointReader(f"{folder}{os.sep}")  # the prefix ""
    except (tf.errors.OpError, RuntimeError) as error:
        raise MusicnnError(f"{folder}: not a readable TensorFlow checkpoint ({error})") from error
    try:
        assign_checkpoint(model, reader.get_variable_to_shape_map(), reader.get_tensor)
    except MusicnnError as error:
        raise MusicnnError(f"{folder}: {error}") from error


def assign_checkpoint(
    model: Any, shapes: dict[str, list[int]], get_tensor: Callable[[str], np.ndarray]
) -> None:
    """Assign each model weight the checkpoint variable of its path (`shapes`: variable ->
    shape). A weight without a variable, a variable of another shape, or a non-optimizer
    variable left unused is an error: nothing is served with weights it did not load."""
    wanted = {name for name in shapes if not any(marker in name for marker in _OPTIMIZER_MARKERS)}
    used: set[str] = set()
    problems: list[str] = []
    for weight in model.weights:
        key = _checkpoint_key(weight)
        if key not in shapes:
            problems.append(f"model weight {key} has no checkpoint variable")
            continue
        if key in used:
            problems.append(f"checkpoint variable {key} used twice")
            continue
        if tuple(shapes[key]) != tuple(weight.shape):
            problems.append(f"{key}: checkpoint shape {shapes[key]}, model {tuple(weight.shape)}")
            continue
        weight.assign(get_tensor(key))
        used.add(key)
    unused = sorted(wanted - used)
    if unused:
        problems.append(f"checkpoint variables not used by the model: {', '.join(unused)}")
    if problems:
        raise MusicnnError("the checkpoint does not fit MSD_musicnn: " + "; ".join(problems))


@dataclass(frozen=True)
class SegmentEmbeddings:
    """musicnn's view of the segments of one clip."""

    embeddings: np.ndarray  # (n_segments, 200) penultimate-layer activations
    tags: np.ndarray  # (n_segments, 50) MSD tag probabilities


class MusicnnEmbedder:
    """MSD_musicnn with its weights loaded; one per process (building it costs about a second)."""

    def __init__(self, folder: Path, batch_size: int):
        if batch_size < 1:
            raise MusicnnError(f"the musicnn batch size must be at least 1, got {batch_size}")
        self.folder = folder
        self.batch_size = batch_size
        self.model = build_model()
        load_checkpoint(self.model, folder)
        tf = import_tensorflow()
        # One graph for every batch size (traced once, about 0.4 s): an eager call dispatches
        # the network's ops one by one from Python, which made a clip's ten patches take 0.33 s
        # instead of 0.21 s on 2 cores, with the same numbers to the last bit.
        self._forward = tf.function(
            lambda batch: self.model(batch, training=False),
            input_signature=[tf.TensorSpec([None, PATCH_FRAMES, N_MELS], tf.float32)],
            autograph=False,
        )

    def embed_patches(self, patches: np.ndarray) -> SegmentEmbeddings:
        """Embeddings and tag probabilities of (n, 187, 96) log-mel patches."""
        from keras import ops

        embeddings, tags = [], []
        for start in range(0, len(patches), self.batch_size):
            batch = np.ascontiguousarray(patches[start : start + self.batch_size], np.float32)
            embedding, logits = self._forward(batch)
            embeddings.append(ops.convert_to_numpy(embedding))
            tags.append(ops.convert_to_numpy(ops.sigmoid(logits)))
        if not embeddings:
            return SegmentEmbeddings(np.empty((0, EMBEDDING_SIZE)), np.empty((0, len(MSD_TAGS))))
        return SegmentEmbeddings(
            np.concatenate(embeddings).astype(np.float64), np.concatenate(tags).astype(np.float64)
        )

    def embed(self, waveform: np.ndarray, starts_s: list[float]) -> SegmentEmbeddings:
        """One embedding per segment of a mono 16 kHz waveform, each from the patch that starts
        at the segment's start (`starts_s`, seconds)."""
        spectrogram = log_mel(waveform)
        starts = patch_starts(starts_s, len(spectrogram))
        patches = np.stack([spectrogram[start : start + PATCH_FRAMES] for start in starts])
        return self.embed_patches(patches)


_EMBEDDERS: dict[tuple[Path, int], MusicnnEmbedder] = {}


def embedder(folder: Path, batch_size: int) -> MusicnnEmbedder:
    """The process's embedder for the weights in `folder`, built on first use."""
    key = (Path(folder), int(batch_size))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = MusicnnEmbedder(*key)
    return _EMBEDDERS[key]
