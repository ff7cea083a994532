"""The Keras 3 port of MSD_musicnn computes what the original musicnn code computes.

musicnn_reference.json holds the original's outputs (the wheel's own TF1 graph and checkpoint,
run by tools/musicnn_reference.py in a throwaway venv) for the first three 3 s patches of three
real clips, made by the project's own log_mel: the comparison is about the network alone. A wrong
padding, pooling, batch-norm setting or layer order loads the same weights without complaint and
still gives plausible tags; only this comparison sees it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow_helpers import GENRES

from gtzan_mlops.data.audio import load_waveform
from gtzan_mlops.features import musicnn
from gtzan_mlops.settings.loading import load_settings

REFERENCE = json.loads((Path(__file__).with_name("musicnn_reference.json")).read_text())
REGENERATE = REFERENCE["provenance"]["regenerate"]
BATCH_SIZE = load_settings(
    Path(__file__).resolve().parents[2] / "params.yaml"
).resources.features.musicnn_batch_size

# Tolerances. Measured (TF 2.21 on both sides, same machine): embeddings differ by at most
# 3.3e-6 in absolute value (values up to 3.3, so about 1e-6 of their scale), tag probabilities
# by at most 8.2e-7 absolute and 4.7e-6 relative. That is float32 round-off: the port's
# convolutions, means and dense layers sum the same products in another order (Keras 3 ops vs
# TF1 layers; oneDNN picks kernels by CPU). The bounds below leave a margin of about 15x for
# another CPU's summation order and stay some 10^4 below what a structural mistake does: in a
# scratch copy of the port, batch-norm epsilon 1e-5 instead of 1e-3, causal instead of centred
# time padding of the timbral convolutions, the temporal convolutions' 'same' padding split the
# other way, mean and max pooling swapped, no residual connections, or the two timbral branches
# swapped each moved the embeddings by 1.1 to 40 and the tags by 2x to 135x (relative); every
# one failed this test.
# Embeddings are batch-normalised activations of order 1, some near 0: an absolute bound.
EMBEDDING_ATOL = 5e-5
# Probabilities span 1e-4..1: relative, with an absolute floor for the smallest.
TAG_RTOL = 1e-4
TAG_ATOL = 1e-6


def test_reference_file_describes_the_original_run():
    provenance = REFERENCE["provenance"]
    assert provenance["model"] == musicnn.MODEL_NAME and provenance["musicnn_version"] == "0.1.0"
    assert provenance["tensorflow_version"] and provenance["date"] and REGENERATE
    assert len(REFERENCE["clips"]) >= 3
    for clip in REFERENCE["clips"]:
        patches = len(provenance["segment_starts_s"])
        assert np.shape(clip["embeddings"]) == (patches, musicnn.EMBEDDING_SIZE)
        assert np.shape(clip["tag_probabilities"]) == (patches, len(musicnn.MSD_TAGS))
        # The original's own spectrogram code agrees with the project's log_mel.
        assert clip["front_end_max_abs_diff"] < 1e-4, clip["path"]


@pytest.fixture(scope="module")
def port_outputs(gtzan_mini):
    """path -> (patch start frames, SegmentEmbeddings) of the port, from the same clips and
    segments as the reference; the clips are checked to be the reference's first."""
    starts_s = REFERENCE["provenance"]["segment_starts_s"]
    embedder = musicnn.embedder(musicnn.weights_dir(None), BATCH_SIZE)
    outputs = {}
    for clip in REFERENCE["clips"]:
        path = gtzan_mini / clip["path"]
        if not path.is_file():
            pytest.fail(f"{path}: reference clip missing from ../shared ({REGENERATE} anew?)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != clip["sha256"]:
            pytest.fail(
                f"{path}: sha256 {digest}, the reference was computed on {clip['sha256']}: "
                f"../shared changed; check it, then regenerate with `{REGENERATE}`"
            )
        waveform = load_waveform(path, musicnn.SAMPLE_RATE)
        frames = len(musicnn.log_mel(waveform))
        outputs[clip["path"]] = (
            musicnn.patch_starts(starts_s, frames),
            embedder.embed(waveform, starts_s),
        )
    return outputs


@pytest.mark.parametrize("clip", REFERENCE["clips"], ids=lambda clip: Path(clip["path"]).stem)
def test_port_matches_the_original_network(port_outputs, clip):
    starts, port = port_outputs[clip["path"]]
    assert starts == clip["patch_start_frames"]
    np.testing.assert_allclose(
        port.embeddings,
        clip["embeddings"],
        rtol=0,
        atol=EMBEDDING_ATOL,
        err_msg=f"{clip['path']}: embeddings differ from the original's",
    )
    np.testing.assert_allclose(
        port.tags,
        clip["tag_probabilities"],
        rtol=TAG_RTOL,
        atol=TAG_ATOL,
        err_msg=f"{clip['path']}: tag probabilities differ from the original's",
    )


def test_reference_clips_are_of_different_genres():
    """Three clips far apart exercise more of the network than three of one genre."""
    genres = {Path(clip["path"]).parent.name for clip in REFERENCE["clips"]}
    assert len(genres) == len(REFERENCE["clips"]) and genres <= set(GENRES)
