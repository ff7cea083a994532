"""The MSD_musicnn feature set: the Keras model holds the checkpoint's weights (every variable
used once), its input is musicnn's own without NumPy 2's float16 overflow, its tags make sense
on real clips, and a served model on the embeddings classifies raw audio end to end."""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow_helpers import GENRES, serving_limits, sqlite_store
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gtzan_mlops.data.audio import decode_mono, load_waveform
from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS
from gtzan_mlops.serving.packaging import log_serving_model
from gtzan_mlops.serving.spec import BASE64_COLUMN, ServingSpec, output_columns
from gtzan_mlops.settings.loading import load_settings

SETTINGS = REFERENCE_SETTINGS
BATCH_SIZE = load_settings(
    Path(__file__).resolve().parents[2] / "params.yaml"
).resources.features.musicnn_batch_size
CLIPS_PER_GENRE = 7  # jazz has 00000-00002 and 00004-00007 in ../shared


def _clips(gtzan_mini, genre: str) -> list:
    return sorted((gtzan_mini / "genres" / genre).glob("*.wav"))[:CLIPS_PER_GENRE]


@pytest.fixture(scope="module")
def weights():
    return musicnn.weights_dir(None)


@pytest.fixture(scope="module")
def embedded(gtzan_mini, weights):
    """genre -> list of ExtractedSets of its real clips: the musicnn set, segmented as the stage
    does (the hand-crafted features, 80% of the cost, are not needed here)."""
    result = {}
    for genre in GENRES:
        result[genre] = []
        for path in _clips(gtzan_mini, genre):
            waveform, rate = decode_mono(path)
            result[genre].append(
                feature_sets.extract_sets(
                    waveform,
                    rate,
                    SETTINGS,
                    weights,
                    include_clip=False,
                    handcrafted=False,
                    batch_size=BATCH_SIZE,
                )
            )
    return result


def test_checkpoint_fills_every_weight_and_uses_every_variable(weights):
    import keras
    import tensorflow as tf

    model = musicnn.build_model()
    before = [keras.ops.convert_to_numpy(weight) for weight in model.weights]
    musicnn.load_checkpoint(model, weights)
    reader = tf.compat.v1.train.NewCheckpointReader(f"{weights}/")
    for weight, initial in zip(model.weights, before, strict=True):
        loaded = keras.ops.convert_to_numpy(weight)
        np.testing.assert_array_equal(loaded, reader.get_tensor(weight.path))
        if loaded.size > 1:  # the input's 1-channel batch norm may start at its own values
            assert not np.array_equal(loaded, initial), f"{weight.path} kept its initial value"
    model_variables = {weight.path for weight in model.weights}
    checkpoint = {
        name
        for name in reader.get_variable_to_shape_map()
        if "/Adam" not in name and not name.startswith("beta")
    }
    assert model_variables == checkpoint and len(model.weights) == len(checkpoint) == 64


class _Weight:
    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path, self.shape, self.value = path, shape, None

    def assign(self, value):
        self.value = value


class _Model:
    def __init__(self, *weights: _Weight):
        self.weights = list(weights)


def test_a_missing_unused_or_misshapen_variable_is_an_error():
    shapes = {"dense/kernel": [2, 3], "dense/bias": [3], "dense/kernel/Adam": [2, 3]}
    tensors = {name: np.zeros(shape) for name, shape in shapes.items()}
    good = _Model(_Weight("dense/kernel", (2, 3)), _Weight("dense/bias", (3,)))
    musicnn.assign_checkpoint(good, shapes, tensors.__getitem__)  # optimizer slots are left
    assert all(weight.value is not None for weight in good.weights)

    missing = _Model(*good.weights, _Weight("dense_1/kernel", (3, 1)))
    with pytest.raises(musicnn.MusicnnError, match="dense_1/kernel has no checkpoint variable"):
        musicnn.assign_checkpoint(missing, shapes, tensors.__getitem__)
    unused = _Model(_Weight("dense/kernel", (2, 3)))
    with pytest.raises(musicnn.MusicnnError, match="not used by the model: dense/bias"):
        musicnn.assign_checkpoint(unused, shapes, tensors.__getitem__)
    misshapen = _Model(_Weight("dense/kernel", (3, 2)), _Weight("dense/bias", (3,)))
    with pytest.raises(musicnn.MusicnnError, match="dense/kernel: checkpoint shape"):
        musicnn.assign_checkpoint(misshapen, shapes, tensors.__getitem__)


def test_missing_weights_folder_is_a_clear_error(tmp_path):
    with pytest.raises(musicnn.MusicnnError, match=r"no MSD_musicnn checkpoint \(missing .index"):
        musicnn.weights_dir(tmp_path)


def test_loud_audio_does_not_overflow_the_float16_input():
    """musicnn casts the mel spectrogram to float16; under NumPy 2, `10000 * x` then stays
    float16 and every value above ~6.55 becomes inf. A loud clip must give a finite input."""
    import librosa

    rate = musicnn.SAMPLE_RATE
    time = np.arange(3 * rate) / rate
    loud = np.sign(np.sin(2 * np.pi * 110 * time)).astype(np.float32)  # full-scale square wave
    mel = librosa.feature.melspectrogram(
        y=loud, sr=rate, n_fft=musicnn.N_FFT, hop_length=musicnn.HOP_LENGTH, n_mels=96
    )
    assert mel.max() > 6.55  # the case: the original computation overflows on this clip
    with np.errstate(over="ignore"):
        assert np.isinf(10000 * mel.astype(np.float16)).any()
    spectrogram = musicnn.log_mel(loud)
    assert spectrogram.shape[1] == musicnn.N_MELS and np.isfinite(spectrogram).all()
    np.testing.assert_allclose(spectrogram.max(), np.log10(10000 * mel.max() + 1), rtol=1e-3)


def test_patches_start_at_their_segments_and_end_inside_the_spectrogram():
    assert musicnn.patch_starts([0.0, 3.0, 6.0], 1876) == [0, 188, 375]  # 187.5 rounds to even
    assert musicnn.patch_starts([27.0], 1870) == [1870 - musicnn.PATCH_FRAMES]
    with pytest.raises(musicnn.MusicnnError, match="fewer than one 187-frame"):
        musicnn.patch_starts([0.0], 100)


@pytest.mark.parametrize(
    ("genre", "expected"),
    [
        ("metal", {"metal", "heavy metal"}),
        ("jazz", {"jazz"}),
        ("hiphop", {"Hip-Hop"}),
        ("blues", {"blues"}),
        ("classical", {"instrumental"}),  # MSD's 50 tags have no 'classical'
    ],
)
def test_tags_of_real_clips_name_their_genre(embedded, genre, expected):
    mean_tags = np.mean([clip.musicnn_tags.mean(axis=0) for clip in embedded[genre]], axis=0)
    top5 = {musicnn.MSD_TAGS[index] for index in np.argsort(-mean_tags)[:5]}
    assert top5 & expected, f"{genre}: top 5 tags {sorted(top5)}"


def test_embeddings_are_finite_and_each_segment_has_its_own(embedded):
    for genre, clips in embedded.items():
        for clip in clips:
            assert clip.musicnn_segments.shape == (10, musicnn.EMBEDDING_SIZE), genre
            assert np.isfinite(clip.musicnn_segments).all() and np.isfinite(clip.musicnn_tags).all()
            distinct = {row.tobytes() for row in clip.musicnn_segments}
            assert len(distinct) == 10, f"{genre}: segments share an embedding"
            assert np.all((clip.musicnn_tags >= 0) & (clip.musicnn_tags <= 1))


def test_embedding_is_the_same_wherever_the_clip_is_decoded(gtzan_mini, weights):
    """Resampled from the file's rate inside extract_sets, or loaded at 16 kHz directly."""
    path = gtzan_mini / "genres" / "rock" / "rock.00000.wav"
    waveform, rate = decode_mono(path)
    through_sets = feature_sets.extract_sets(
        waveform, rate, SETTINGS, weights, batch_size=BATCH_SIZE
    )
    starts = [3.0 * index for index in range(10)]
    direct = musicnn.embedder(weights, BATCH_SIZE).embed(
        load_waveform(path, musicnn.SAMPLE_RATE), starts
    )
    np.testing.assert_allclose(through_sets.musicnn_segments, direct.embeddings, rtol=1e-5)


def test_served_model_on_embeddings_classifies_raw_audio(
    embedded, gtzan_mini, weights, tmp_path, monkeypatch
):
    """A segment-level classifier on the musicnn embeddings of six clips per genre, served as
    the pipeline serves it; the seventh clip of each genre goes in as base64 audio. Loading the
    served model reads the weights it carries, not the musicnn package."""
    train = [(clip, genre) for genre in GENRES for clip in embedded[genre][:-1]]
    rows = np.vstack([clip.segment_rows("musicnn") for clip, _ in train])
    labels = np.concatenate([[GENRES.index(genre)] * 10 for _, genre in train])
    columns = feature_sets.columns("musicnn", SETTINGS.n_mfcc)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(pd.DataFrame(rows, columns=columns), labels)
    spec = ServingSpec(
        "logreg", "sklearn", "segment", tuple(GENRES), SETTINGS.to_dict(), feature_set="musicnn"
    )
    held_out = [_clips(gtzan_mini, genre)[-1] for genre in GENRES]
    request = pd.DataFrame(
        {BASE64_COLUMN: [base64.b64encode(path.read_bytes()).decode() for path in held_out]}
    )
    with sqlite_store(tmp_path / "store"):
        with mlflow.start_run():
            native = mlflow.sklearn.log_model(
                classifier, name="native", pip_requirements=["scikit-learn"]
            ).model_uri
            limits = serving_limits(max_rows=len(GENRES))  # one request, one clip per genre
            info = log_serving_model(spec, native, limits, musicnn_weights=weights)

        def no_package():
            raise AssertionError("the served model looked for the musicnn package")

        monkeypatch.setattr(musicnn, "packaged_weights_dir", no_package)
        musicnn._EMBEDDERS.clear()  # built again, from the model's own artifact
        served = mlflow.pyfunc.load_model(info.model_uri)
        answer = served.predict(request)

    loaded_from = next(iter(musicnn._EMBEDDERS))[0]
    assert loaded_from != weights and (loaded_from / "NOTICE").read_text().startswith("The MSD")
    assert list(answer.columns) == output_columns(GENRES)
    probabilities = answer[[f"prob_{genre}" for genre in GENRES]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    # The mean of the segment probabilities, from the same features as the stage's.
    direct = np.vstack(
        [
            classifier.predict_proba(
                pd.DataFrame(embedded[genre][-1].segment_rows("musicnn"), columns=columns)
            ).mean(axis=0)
            for genre in GENRES
        ]
    )
    np.testing.assert_allclose(probabilities, direct, rtol=1e-4, atol=1e-6)
    correct = (answer["genre"].to_numpy() == np.asarray(GENRES)).sum()
    assert correct >= 7, list(answer["genre"])
