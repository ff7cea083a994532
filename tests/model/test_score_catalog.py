"""`gtzan-mlops score-catalog`: real clips scored through Ray Data actors (a local Ray of one CPU)
exactly as the served model scores them in-process, bad files each reported with its reason,
resuming (done files skipped, changed and failed ones scored again, the parts of a run that died
kept), list files, and the command's exit codes."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from live_services import clean_env, free_port
from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier, sqlite_store
from project_params import project_params

from gtzan_mlops.cluster import ray_session
from gtzan_mlops.serving.catalog import (
    WORKER_DIED,
    CatalogError,
    CatalogModel,
    fetch_model,
    list_catalog,
    model_identity,
    score_catalog,
)
from gtzan_mlops.serving.catalog_store import (
    CatalogOutputError,
    ModelIdentity,
    PartWriter,
    output_lock,
    output_schema,
    parts_folder,
)
from gtzan_mlops.serving.spec import BASE64_COLUMN
from gtzan_mlops.settings.schema import CatalogResources

MODEL_NAME = "gtzan-catalog-test"
PROBABILITIES = [f"prob_{genre}" for genre in GENRES]
CLIPS = {  # name in the catalog -> GTZAN clip
    "jazz.00001.wav": "jazz/jazz.00001.wav",
    "sub/rock.00002.wav": "rock/rock.00002.wav",
    "sub/deeper/blues.00000.wav": "blues/blues.00000.wav",
}
RESOURCES = CatalogResources(actors=1, batch_size=2)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A registered served model (the champion), segment level, refusing files over 2 MiB."""
    with sqlite_store(tmp_path_factory.mktemp("catalog-store")) as uri:
        yield uri


@pytest.fixture(scope="module")
def registered(store, reference_table):
    served = log_served(
        log_sklearn(reference_classifier(reference_table)), level="segment", max_upload_mib=2.0
    )
    version = mlflow.register_model(served, MODEL_NAME)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return f"models:/{MODEL_NAME}@champion", mlflow.pyfunc.load_model(served)


@pytest.fixture(scope="module")
def model(registered):
    return fetch_model(registered[0])


@pytest.fixture(scope="module")
def session():
    with ray_session(None, purpose="test score-catalog", num_cpus=1) as running:
        yield running


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, gtzan_mini) -> Path:
    """Three real clips at several depths, a text file named .wav, a file over the model's
    2 MiB, a file nobody may read, and files the folder listing leaves out."""
    folder = tmp_path_factory.mktemp("catalog")
    for name, clip in CLIPS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(gtzan_mini / "genres" / clip, folder / name)
    (folder / "notes.wav").write_text("not audio at all\n")
    (folder / "huge.flac").write_bytes(np.random.default_rng(0).bytes(3 * 2**20))
    locked = folder / "locked.wav"
    shutil.copyfile(gtzan_mini / "genres" / "pop" / "pop.00002.wav", locked)
    locked.chmod(0)
    (folder / "cover.jpg").write_bytes(b"\xff\xd8\xff")  # not audio by name: not listed
    (folder / ".hidden.wav").write_text("hidden")
    return folder


def score(paths, output, model, session, failures=None):
    def note(path: str, reason: str) -> None:
        if failures is not None:
            failures[path] = reason

    return score_catalog(paths, output, model, RESOURCES, session, note)


def in_process(served, path: Path) -> pd.Series:
    """What the served model answers in this process for the file's bytes."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return served.predict(pd.DataFrame({BASE64_COLUMN: [encoded]})).iloc[0]


def test_listing_a_folder_takes_its_audio_files_at_any_depth(catalog):
    listed = list_catalog(catalog)
    names = [Path(path).relative_to(catalog).as_posix() for path in listed]
    assert names == [  # a folder's files sorted, then its sub-folders', each in turn
        "huge.flac",
        "jazz.00001.wav",
        "locked.wav",
        "notes.wav",
        "sub/rock.00002.wav",
        "sub/deeper/blues.00000.wav",
    ]
    assert all(Path(path).is_absolute() for path in listed)
    with pytest.raises(CatalogError, match="no-such: no such folder or list file"):
        list_catalog(catalog / "no-such")


def test_a_registry_uri_is_pinned_to_its_version(registered):
    assert model_identity(registered[0]) == ModelIdentity(MODEL_NAME, "1")
    assert model_identity(f"models:/{MODEL_NAME}/1") == ModelIdentity(MODEL_NAME, "1")
    assert model_identity("runs:/abc/model") == ModelIdentity("runs:/abc/model", "")


def test_scores_every_file_as_the_model_does_and_reports_each_bad_one(
    catalog, model, registered, session, tmp_path
):
    output = tmp_path / "scores.parquet"
    failures: dict[str, str] = {}
    run = score(list_catalog(catalog), output, model, session, failures)

    unreadable = not AS_ROOT or not os.access(catalog / "locked.wav", os.R_OK)
    assert (run.files, run.skipped, run.actors) == (6, 0, 1)
    assert run.scored == 3 + (not unreadable)
    assert run.failed == 2 + unreadable == len(failures)
    table = pd.read_parquet(output)
    assert list(table.columns) == output_schema(GENRES).names
    assert sorted(table["path"]) == sorted(list_catalog(catalog))
    rows = table.set_index("path")
    assert set(rows["model_name"]) == {MODEL_NAME} and set(rows["model_version"]) == {"1"}

    _, served = registered
    for name in CLIPS:
        path = catalog / name
        row = rows.loc[str(path)]
        assert pd.isna(row["error"])
        expected = in_process(served, path)
        np.testing.assert_allclose(
            row[PROBABILITIES].to_numpy(float), expected[PROBABILITIES].to_numpy(float), rtol=1e-9
        )
        assert row[PROBABILITIES].sum() == pytest.approx(1.0)
        assert row["genre"] == expected["genre"] == GENRES[int(np.argmax(row[PROBABILITIES]))]
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["size_bytes"] == path.stat().st_size
        assert row["mtime_ns"] == path.stat().st_mtime_ns

    reasons = rows["error"].dropna().to_dict()
    assert reasons == failures
    notes, huge = str(catalog / "notes.wav"), str(catalog / "huge.flac")
    assert reasons[notes].startswith("not decodable as audio")
    assert reasons[huge] == (
        "file of 3.0 MiB exceeds the model's limit of 2 MiB (serving.max_upload_mib)"
    )
    assert pd.isna(rows.loc[huge, "sha256"])  # refused from its size, never read
    assert rows.loc[notes, "sha256"] == hashlib.sha256(b"not audio at all\n").hexdigest()
    if unreadable:
        assert reasons[str(catalog / "locked.wav")] == "unreadable (Permission denied)"
    assert all("\n" not in reason and "Traceback" not in reason for reason in reasons.values())
    assert rows.loc[list(reasons), PROBABILITIES].isna().all().all()
    assert not parts_folder(output).exists()


def test_a_rerun_skips_what_is_done_and_scores_what_changed_or_failed(
    catalog, model, session, tmp_path, gtzan_mini
):
    folder = tmp_path / "catalog"
    shutil.copytree(catalog / "sub", folder)  # rock and blues
    (folder / "notes.wav").write_text("still not audio")
    output = tmp_path / "scores.parquet"
    first = score(list_catalog(folder), output, model, session)
    assert (first.scored, first.failed, first.skipped) == (2, 1, 0)
    before = pd.read_parquet(output).set_index("path")

    again = score(list_catalog(folder), output, model, session)
    assert (again.scored, again.failed, again.skipped) == (0, 1, 2)  # the failed file retried

    # Another song under the rock clip's name (the same size, a later mtime): scored again.
    rock = folder / "rock.00002.wav"
    shutil.copyfile(gtzan_mini / "genres" / "metal" / "metal.00002.wav", rock)
    os.utime(rock, ns=(time.time_ns(), time.time_ns() + 10**9))
    (folder / "notes.wav").unlink()
    (folder / "notes.wav").write_bytes((gtzan_mini / "genres/pop/pop.00001.wav").read_bytes())
    third = score(list_catalog(folder), output, model, session)
    assert (third.scored, third.failed, third.skipped) == (2, 0, 1)

    after = pd.read_parquet(output).set_index("path")
    assert after.index.is_unique and len(after) == 3  # rows replaced, not added
    assert after["error"].isna().all()
    assert after.loc[str(rock), "sha256"] == hashlib.sha256(rock.read_bytes()).hexdigest()
    assert after.loc[str(rock), "sha256"] != before.loc[str(rock), "sha256"]
    blues = str(folder / "deeper" / "blues.00000.wav")
    pd.testing.assert_series_equal(after.loc[blues], before.loc[blues])


def test_the_parts_of_a_run_that_died_are_kept_and_not_scored_again(
    catalog, model, session, tmp_path
):
    """A run killed after writing a part: the next run folds the part in, skips its files and
    drops the part that was being written when it died."""
    clips = [str(catalog / name) for name in CLIPS]
    donor = tmp_path / "donor.parquet"
    score(clips[:1], donor, model, session)
    output = tmp_path / "scores.parquet"
    writer = PartWriter(output, output_schema(GENRES), part_rows=1, part_seconds=60)
    writer.add(pq.read_table(donor))  # as the killed run wrote it
    (parts_folder(output) / "part-cut-short.tmp").write_bytes(b"PAR1 half a part")

    run = score(clips, output, model, session)
    assert (run.skipped, run.scored, run.failed) == (1, 2, 0)
    table = pd.read_parquet(output)
    assert sorted(table["path"]) == sorted(clips)
    assert not parts_folder(output).exists()


def test_a_list_file_names_any_file_relative_to_itself(catalog, model, session, tmp_path):
    listing = tmp_path / "lists" / "catalog.txt"
    listing.parent.mkdir()
    relative = os.path.relpath(catalog / "jazz.00001.wav", listing.parent)
    unreadable = ["/proc/self/mem"] if Path("/proc/self/mem").exists() else []
    listing.write_text(
        "\n".join(
            [
                "# the catalog",
                relative,
                "",
                str(catalog / "jazz.00001.wav"),  # the same file again: scored once
                str(catalog / "cover.jpg"),  # listed, so scored whatever its name
                "missing.wav",
                *unreadable,
            ]
        )
    )
    paths = list_catalog(listing)
    assert paths[:3] == [
        str(catalog / "jazz.00001.wav"),
        str(catalog / "cover.jpg"),
        str(listing.parent / "missing.wav"),
    ]
    failures: dict[str, str] = {}
    run = score(paths, tmp_path / "scores.parquet", model, session, failures)
    assert (run.files, run.scored, run.failed) == (3 + len(unreadable), 1, 2 + len(unreadable))
    assert failures[str(listing.parent / "missing.wav")] == "no such file"
    assert failures[str(catalog / "cover.jpg")].startswith("not decodable as audio")
    if unreadable:
        assert failures["/proc/self/mem"] == "unreadable (Input/output error)"


def test_an_output_of_other_genres_or_in_use_is_refused_before_any_work(model, session, tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=output_schema(["a", "b"])), other)
    with pytest.raises(CatalogOutputError, match="are not this model's"):
        score(["/nowhere.wav"], other, model, session)

    busy = tmp_path / "busy.parquet"
    with output_lock(busy), pytest.raises(CatalogOutputError, match="another score-catalog"):
        score(["/nowhere.wav"], busy, model, session)
    assert not busy.exists()


def test_a_model_the_actors_cannot_load_ends_the_run_with_its_reason(session, tmp_path, catalog):
    broken = CatalogModel(ModelIdentity("broken", "1"), b"not a model archive", tuple(GENRES))
    output = tmp_path / "scores.parquet"
    with pytest.raises(CatalogError, match=r"^the Ray actors could not score: tarfile.ReadError"):
        score([str(catalog / "jazz.00001.wav")], output, broken, session)
    assert not output.exists() and not parts_folder(output).exists()


# --- the command, in a process of its own (it starts a Ray of its own) --------------------------


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    params = project_params({"genres": GENRES, "promote.model_name": MODEL_NAME}, validate=False)
    path.write_text(yaml.safe_dump(params))
    return path


def command(store: str, params: Path, *options: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "gtzan_mlops", "score-catalog", *options]
    argv += ["--params", str(params), "--set", "resources.catalog.actors=1"]
    env = clean_env(MLFLOW_TRACKING_URI=store)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def test_the_command_exits_0_when_all_are_scored_and_1_listing_the_failures(
    store, registered, params_file, catalog, tmp_path
):
    output = tmp_path / "scores.parquet"
    good = tmp_path / "good.txt"
    good.write_text(f"{catalog / 'jazz.00001.wav'}\n")
    done = command(store, params_file, str(good), "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == (
        f"score-catalog: 1 files, 1 scored, 0 skipped (already scored), 0 failed, by "
        f"{MODEL_NAME} version 1 on 1 actors -> {output}"
    )

    mixed = command(store, params_file, str(catalog), "--output", str(output))
    assert mixed.returncode == 1, mixed.stderr[-3000:]
    assert "1 skipped (already scored)" in mixed.stdout
    assert f"{catalog / 'notes.wav'}: FAILED: not decodable as audio" in mixed.stderr
    assert f"{catalog / 'huge.flac'}: FAILED: file of 3.0 MiB exceeds" in mixed.stderr
    assert "Traceback" not in mixed.stderr


def test_an_unreachable_cluster_is_one_line_and_exit_2_before_any_work(
    store, registered, params_file, catalog, tmp_path
):
    address = f"127.0.0.1:{free_port()}"
    output = tmp_path / "scores.parquet"
    started = time.monotonic()
    result = command(
        store, params_file, str(catalog), "--output", str(output),
        "--set", f"resources.ray.address={address}",
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gtzan-mlops score-catalog: "), lines
    assert f"no Ray cluster answers at {address}" in lines[0]
    assert time.monotonic() - started < 60
    assert not output.exists() and not parts_folder(output).exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["no-such-folder"], "no-such-folder: no such folder or list file"),
        (["--model", "models:/no-such-model@champion"], "cannot load the model models:/no-such"),
    ],
    ids=["no-catalog", "no-model"],
)
def test_usage_and_model_errors_exit_2(store, params_file, catalog, tmp_path, options, message):
    argv = [str(catalog), *options] if options[0].startswith("--") else options
    result = command(store, params_file, *argv, "--output", str(tmp_path / "o.parquet"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


# --- a file that kills the actor scoring it -----------------------------------------------------

CRASHING_MODEL = '''
import os
import types

import mlflow
import pandas as pd

GENRES = {genres!r}


class CrashingModel(mlflow.pyfunc.PythonModel):
    """Scores any bytes the same made-up way, and kills its process on bytes starting CRASH."""

    limits = types.SimpleNamespace(max_upload_mib=1.0)

    def predict(self, context, model_input, params=None):
        import base64

        data = base64.b64decode(model_input["audio_base64"].iloc[0])
        if data.startswith(b"CRASH"):
            os._exit(3)
        share = 1.0 / len(GENRES)
        row = {{"genre": GENRES[len(data) % len(GENRES)], "warning": None}}
        row.update({{f"prob_{{genre}}": share for genre in GENRES}})
        return pd.DataFrame([row])


mlflow.models.set_model(CrashingModel())
'''


@pytest.fixture(scope="module")
def crashing_model(store, tmp_path_factory):
    """A model logged from code whose process dies on some files, as a decoder's crash would."""
    from mlflow.models import infer_signature

    from gtzan_mlops.serving.catalog_scorer import model_classes, pack_model

    code = tmp_path_factory.mktemp("crashing") / "crashing_model.py"
    code.write_text(CRASHING_MODEL.format(genres=GENRES))
    answer = pd.DataFrame([{"genre": "jazz", **dict.fromkeys(PROBABILITIES, 0.1), "warning": ""}])
    signature = infer_signature(pd.DataFrame({BASE64_COLUMN: ["x"]}), answer)
    with mlflow.start_run(run_name="crashing"):
        info = mlflow.pyfunc.log_model(name="crashing", python_model=str(code), signature=signature)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(code.parent)))
    return CatalogModel(ModelIdentity("crashing", ""), pack_model(local), model_classes(local))


@pytest.mark.timeout(300)  # a hang fails rather than waits
def test_a_file_that_kills_its_actor_is_reported_and_the_others_scored(
    crashing_model, session, tmp_path
):
    folder = tmp_path / "catalog"
    folder.mkdir()
    for index in range(5):
        (folder / f"song{index}.wav").write_bytes(b"RIFF" + bytes(index))
    (folder / "song2.wav").write_bytes(b"CRASH")
    failures: dict[str, str] = {}
    started = time.monotonic()
    run = score(
        list_catalog(folder), tmp_path / "scores.parquet", crashing_model, session, failures
    )
    print(f"5 files, one crashing its actor: {time.monotonic() - started:.1f} s")
    assert (run.scored, run.failed) == (4, 1)
    assert failures == {str(folder / "song2.wav"): WORKER_DIED}
    table = pd.read_parquet(tmp_path / "scores.parquet")
    assert sorted(table["path"]) == sorted(list_catalog(folder))
