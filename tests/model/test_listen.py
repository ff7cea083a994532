"""The listening page: its JSON endpoints, and a person's visit in headless Chromium."""

from __future__ import annotations

import base64
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from live_services import chromium_page, free_port
from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier, sqlite_store

from gtzan_mlops.apps import listen
from gtzan_mlops.serving.spec import BASE64_COLUMN

MODEL_NAME = "gtzan-listen-test"
TAGS = {
    "family": "logistic_regression",
    "feature_set": "handcrafted",
    "split": "song-grouped",
    "leaky": "false",
    "metric_name": "test_song_macro_f1",
    "metric_value": "0.612345",
    "metric_low": "0.450000",
    "metric_high": "0.780000",
    "metric_level": "0.95",
    "test_clips": "20",
    "data_source": "local (../shared/data/gtzan_mini)",
    "training_clips": "50",
}


@pytest.fixture(scope="module")
def champion(tmp_path_factory, reference_table):
    """A champion trained here (logistic regression on the reference table), registered with
    the tags the promote stage sets."""
    with sqlite_store(tmp_path_factory.mktemp("listen-store")) as uri:
        served = log_served(log_sklearn(reference_classifier(reference_table)), level="segment")
        version = mlflow.register_model(served, MODEL_NAME, tags=TAGS)
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", version.version)
        yield uri, f"models:/{MODEL_NAME}@champion"


def _serve(classifier: listen.Classifier):
    """The page's app on a free port of 127.0.0.1, in a thread; returns (base URL, server)."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(listen.create_app(classifier), host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the page did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def page_server(champion):
    _, uri = champion
    model = mlflow.pyfunc.load_model(uri, model_config={"max_upload_mib": 8})
    classifier = listen.Classifier(uri, model)
    base, server, thread = _serve(classifier)
    yield base, model
    server.should_exit = True
    thread.join(timeout=10)


def _expected(model, data: bytes) -> pd.Series:
    rows = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(data).decode()]})
    return model.predict(rows).iloc[0]


def test_classify_endpoint_answers_as_the_pyfunc(page_server, gtzan_mini):
    base, model = page_server
    clip = (gtzan_mini / "genres/metal/metal.00004.wav").read_bytes()
    response = requests.post(
        f"{base}/api/classify", data=clip, headers={"X-Filename": "metal.00004.wav"}, timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = _expected(model, clip)
    assert answer["genre"] == expected["genre"] and answer["file"] == "metal.00004.wav"
    assert answer["classes"] == GENRES
    for genre in GENRES:
        assert answer["probabilities"][genre] == pytest.approx(expected[f"prob_{genre}"])
    assert len(answer["timeline"]) == 10 and answer["timeline"][0]["start_s"] == 0.0
    mean = np.mean([[s["probabilities"][g] for g in GENRES] for s in answer["timeline"]], axis=0)
    np.testing.assert_allclose(mean, [answer["probabilities"][g] for g in GENRES])


@pytest.mark.parametrize(
    ("body", "name", "status", "message"),
    [
        (b"not audio at all", "notes.txt", 400, "notes.txt: not decodable as audio"),
        (b"", "empty.wav", 400, "empty.wav: empty (0 bytes)"),
        (b"\0" * (9 * 2**20), "big.wav", 413, "big.wav: larger than the limit of 8 MiB"),
        (b"x", "../../etc/passwd\r\nX: y", 400, ".._.._etc_passwd"),
    ],
)
def test_classify_endpoint_refuses_bad_files_with_the_models_message(
    page_server, body, name, status, message
):
    base, _ = page_server
    response = requests.post(
        f"{base}/api/classify",
        data=body,
        headers={"X-Filename": name.replace("\r\n", " ")},
        timeout=60,
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text and "/tmp" not in response.text


def test_model_endpoint_names_the_registered_version_and_its_evaluation(page_server):
    base, _ = page_server
    info = requests.get(f"{base}/api/model", timeout=10).json()
    assert info["name"] == MODEL_NAME and info["version"] == "1" and info["alias"] == "champion"
    assert info["family"] == "logistic_regression" and info["feature_set"] == "handcrafted"
    assert info["split"] == "song-grouped" and info["metric_value"] == "0.612345"
    assert info["metric_low"] == "0.450000" and info["metric_high"] == "0.780000"
    assert info["data_source"] == "local (../shared/data/gtzan_mini)"
    assert info["level"] == "segment" and info["max_upload_mib"] == 8


def test_the_page_loads_nothing_from_the_network(page_server):
    base, _ = page_server
    html = requests.get(base, timeout=10).text
    assert "<script" in html and "api/classify" in html
    for reference in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert reference not in html


@pytest.mark.slow
@pytest.mark.network
def test_a_person_uploads_songs_in_chromium(page_server, gtzan_mini, tmp_path, artifacts_dir):
    """Upload a real clip through the file input, read the answer off the page, upload a
    non-audio file (its message shows), then another clip (the page still works)."""
    base, model = page_server
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not audio samples\n")
    clips = [gtzan_mini / "genres/metal/metal.00004.wav", gtzan_mini / "genres/jazz/jazz.00001.wav"]
    with chromium_page(tmp_path) as page:
        page.goto(base)
        page.wait_for_selector("#model dd[data-field='model']")
        assert page.inner_text("#model").count(MODEL_NAME) == 1
        card = {
            field: page.inner_text(f"#model dd[data-field='{field}']")
            for field in ("trained on", "test score there")
        }
        assert card["trained on"] == "local (../shared/data/gtzan_mini), 50 clips"
        assert card["test score there"] == (
            "test_song_macro_f1 0.612 [0.450, 0.780] (95 % interval, 20 test clips)"
        )

        for index, upload in enumerate([clips[0], not_audio, clips[1]]):
            page.set_input_files("#file", str(upload))
            state = "error" if upload == not_audio else "done"
            page.wait_for_function(f"document.body.dataset.state === '{state}'")
            page.screenshot(
                path=str(artifacts_dir / f"listen_{index}_{upload.stem}.png"), full_page=True
            )
            if upload == not_audio:
                assert "notes.wav: not decodable as audio" in page.inner_text("#error")
                continue
            expected = _expected(model, upload.read_bytes())
            assert page.inner_text("#genre") == expected["genre"]
            bars = page.eval_on_selector_all(
                ".bar", "rows => rows.map(r => [r.dataset.genre, Number(r.dataset.probability)])"
            )
            assert sorted(genre for genre, _ in bars) == sorted(GENRES)
            for genre, probability in bars:
                assert probability == pytest.approx(expected[f"prob_{genre}"], abs=1e-9)
            assert page.locator("#timeline g.column").count() == 10  # one per 3 s segment
            assert page.inner_text("#error") == ""
        # A whole song: two real classical clips then two metal ones, 2 minutes, 40 segments.
        import soundfile

        from gtzan_mlops.data.audio import load_waveform

        parts = [
            load_waveform(gtzan_mini / f"genres/{genre}/{genre}.0000{index}.wav", 22050)[
                : 30 * 22050
            ]
            for genre in ("classical", "metal")
            for index in (3, 4)
        ]
        song = tmp_path / "classical-then-metal.flac"
        soundfile.write(song, np.concatenate(parts), 22050)
        page.set_input_files("#file", str(song))
        page.wait_for_function(
            "document.body.dataset.state === 'done' && "
            "document.querySelectorAll('#timeline g.column').length === 40"
        )
        page.screenshot(path=str(artifacts_dir / "listen_song.png"), full_page=True)
        # The player's position moves the cursor along the timeline.
        page.eval_on_selector(
            "#player", "p => { p.currentTime = 15; p.dispatchEvent(new Event('timeupdate')); }"
        )
        assert float(page.get_attribute("#cursor", "x1")) > 80
