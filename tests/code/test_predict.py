"""`gtzan-mlops predict`: real clips through the champion, bad files reported, others classified."""

from __future__ import annotations

import re

import mlflow
import pytest
import yaml
from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier, sqlite_store
from project_params import project_params

from gtzan_mlops.apps import predict

MODEL_NAME = "gtzan-predict-test"
LINE = re.compile(r"^(?P<path>.+): (?P<genre>\w+)  \((?P<top>.+)\)$")


@pytest.fixture(scope="module")
def champion(tmp_path_factory, reference_table):
    """A registered serving model with the champion alias, in a throwaway store."""
    with sqlite_store(tmp_path_factory.mktemp("predict-store")) as uri:
        served = log_served(log_sklearn(reference_classifier(reference_table)), level="segment")
        version = mlflow.register_model(served, MODEL_NAME)
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", version.version)
        yield uri


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    params = project_params({"genres": GENRES, "promote.model_name": MODEL_NAME}, validate=False)
    path.write_text(yaml.safe_dump(params))
    return path


def test_classifies_files_with_the_champion_and_reports_a_bad_one(
    champion, params_file, gtzan_mini, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion)
    clips = [gtzan_mini / "genres" / genre / f"{genre}.00002.wav" for genre in ("rock", "pop")]
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    files = [str(clips[0]), str(broken), str(clips[1])]

    code = predict.main([*files, "--params", str(params_file)])
    out, err = capsys.readouterr()
    assert code == 1  # one file failed
    lines = out.strip().splitlines()
    assert len(lines) == 2  # both good files classified, in order, despite the bad one between
    for line, clip in zip(lines, clips, strict=True):
        match = LINE.match(line)
        assert match, line
        assert match["path"] == str(clip)
        assert match["genre"] in GENRES
        top = [item.rsplit(" ", 1) for item in match["top"].split(", ")]
        assert len(top) == 3
        assert top[0][0] == match["genre"]
        probabilities = [float(value) for _, value in top]
        assert probabilities == sorted(probabilities, reverse=True)
    assert f"{broken}: FAILED: {broken}: not decodable as audio" in err
    assert "1 of 3 files could not be classified" in err


def test_explicit_model_uri_and_all_good_files_exit_zero(champion, gtzan_mini, capsys):
    clip = gtzan_mini / "genres" / "blues" / "blues.00000.wav"
    code = predict.main([str(clip), "--model", f"models:/{MODEL_NAME}/1", "--top", "2"])
    out, _ = capsys.readouterr()
    assert code == 0
    match = LINE.match(out.strip())
    assert match and len(match["top"].split(", ")) == 2


def test_missing_model_is_a_clear_error(champion, gtzan_mini, capsys):
    clip = gtzan_mini / "genres" / "blues" / "blues.00000.wav"
    code = predict.main([str(clip), "--model", "models:/no-such-model@champion"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "cannot load the model models:/no-such-model@champion" in err


def test_timeline_of_a_long_song_of_two_genres(champion, gtzan_mini, tmp_path, capsys):
    """`--timeline` prints runs of one genre through the song: a song made of real classical
    then real metal clips shows both, in that order."""
    import numpy as np
    import soundfile

    from gtzan_mlops.data.audio import load_waveform

    parts = [
        load_waveform(gtzan_mini / "genres" / genre / f"{genre}.{index:05d}.wav", 22050)
        for genre in ("classical", "metal")
        for index in (3, 4)
    ]
    song = tmp_path / "two-genres.flac"
    soundfile.write(song, np.concatenate([part[: 30 * 22050] for part in parts]), 22050)
    code = predict.main([str(song), "--model", f"models:/{MODEL_NAME}/1", "--timeline"])
    out, _ = capsys.readouterr()
    assert code == 0, out
    runs = [line.split() for line in out.strip().splitlines()[1:]]
    assert all(re.fullmatch(r"\d+:\d\d-\d+:\d\d", run[0]) for run in runs), out
    assert runs[0][0].startswith("0:00-") and runs[-1][0].endswith("-2:00"), out
    genres = [run[1] for run in runs]
    assert "classical" in genres and "metal" in genres, out
    assert genres.index("classical") < len(genres) - 1 - genres[::-1].index("metal"), out


def test_set_names_the_champion_and_the_exit_status_says_what_failed(
    champion, params_file, gtzan_mini, capsys, monkeypatch
):
    """--set as in every command: promote.model_name picks the champion for this run. Exit
    status 2 for settings or a model that cannot be loaded, nothing classified."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion)
    clip = str(gtzan_mini / "genres" / "jazz" / "jazz.00001.wav")
    params = yaml.safe_load(params_file.read_text())
    params["promote"]["model_name"] = "another-model"
    other = params_file.with_name("other.yaml")
    other.write_text(yaml.safe_dump(params))

    chosen = ["--params", str(other), "--set", f"promote.model_name={MODEL_NAME}"]
    assert predict.main([clip, *chosen]) == 0
    assert LINE.match(capsys.readouterr().out.strip())

    assert predict.main([clip, "--params", str(other)]) == 2
    out, err = capsys.readouterr()
    assert not out and "cannot load the model models:/another-model@champion" in err

    assert predict.main([clip, "--params", str(other), "--set", "promote.model_name=[a]"]) == 2
    out, err = capsys.readouterr()
    assert not out and "promote.model_name: Input should be a valid string" in err
