"""The growth benchmark's own logic (benchmarks/growth.py, growth_report.py): the stages it reads
from dvc.yaml, what it runs for a selection, how it measures a process tree, and its fits."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import growth  # noqa: E402
import growth_measure  # noqa: E402
import growth_report  # noqa: E402

from gtzan_mlops.features.handcrafted import FEATURE_NAMES  # noqa: E402
from gtzan_mlops.settings.loading import read_params  # noqa: E402

PARAMS_TEXT = (BENCHMARKS.parent / "params.yaml").read_text()


@pytest.fixture(scope="module")
def stages(repo_root):
    return growth.pipeline_stages(read_params(repo_root / "params.yaml"))


def test_the_stages_are_dvc_yamls_with_the_matrices_expanded_from_the_params(stages, repo_root):
    params = read_params(repo_root / "params.yaml")
    names = [stage.name for stage in stages]
    trained = [f"train@{f}-{s}" for f in params["train"]["families"] for s in ["handcrafted"]]
    candidates = [
        f"train_candidates@{f}-{s}"
        for f in params["evaluate"]["candidates"]
        for s in params["train"]["candidate_feature_sets"]
    ]
    assert names == [
        "fetch", "duplicates", "features", "pca", "split", *trained, *candidates, "evaluate",
        "promote",
    ]  # fmt: skip
    by_name = {stage.name: stage for stage in stages}
    assert by_name["train@knn-handcrafted"].args == (
        "train", "--family", "knn", "--features", "handcrafted",
    )  # fmt: skip
    assert {stage.name for stage in stages if stage.uses_engine} == {
        "features", *trained, *candidates
    }  # fmt: skip
    split = by_name["split"]
    assert [other.name for other in stages if split.needs(other)] == ["duplicates", "features"]


def test_a_selection_runs_what_it_needs_and_split_alone_gets_stand_in_tables(stages):
    large = growth.plan(stages, {"fetch", "duplicates", "split"})
    assert [stage.name for stage in large.stages] == ["fetch", "duplicates", "split"]
    assert large.stand_in_features
    alone = growth.plan(stages, {"split"})
    assert [stage.name for stage in alone.stages] == ["fetch", "duplicates", "split"]
    trained = growth.plan(stages, {"train@knn-handcrafted"})
    assert [stage.name for stage in trained.stages] == [
        "fetch", "duplicates", "features", "split", "train@knn-handcrafted"
    ]  # fmt: skip
    assert not trained.stand_in_features
    everything = growth.plan(stages, {"promote"})
    assert [stage.name for stage in everything.stages] == [
        stage.name for stage in stages if stage.name != "pca"
    ]


def test_stand_in_tables_have_a_row_per_usable_clip_and_segment(tmp_path):
    project = growth.make_project(tmp_path / "project", 20, PARAMS_TEXT)
    manifest = pd.DataFrame(
        {
            "path": ["a.wav", "b.wav", "c.wav", "d.wav"],
            "genre": ["blues", "rock", "jazz", "pop"],
            "track_id": ["a", "b", "c", "d"],
            "duration_s": [30.0, 30.0, 10.0, 30.0],
            "status": ["ok", "ok", "ok", "silent"],
        }
    )
    (project / "data").mkdir()
    manifest.to_csv(project / "data" / "manifest.csv", index=False)
    assert growth.write_stand_in_features(project) == 3
    clips = pd.read_csv(project / "data/features/features_30_sec.csv")
    segments = pd.read_csv(project / "data/features/features_3_sec.csv")
    assert list(clips["track_id"]) == ["a", "b", "c"]
    assert segments.groupby("track_id").size().to_dict() == {"a": 10, "b": 10, "c": 3}
    assert list(segments["segment"][:10]) == list(range(10))
    for table in (clips, segments):  # the real tables' columns, after the keys
        assert list(table.columns[-len(FEATURE_NAMES) :]) == list(FEATURE_NAMES)
        assert table[list(FEATURE_NAMES)].notna().all().all()


def test_the_memory_of_a_process_tree_counts_its_descendants():
    # The parent holds little; its child holds 200 MiB for a second.
    child = "b = bytearray(200 * 2**20); import time; time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    process = subprocess.Popen([sys.executable, "-c", parent])
    with growth_measure.TreeMemory(process.pid) as memory:
        process.wait(timeout=30)
    assert memory.most_processes >= 2
    assert memory.peak_rss >= 200 * 2**20
    assert memory.peak_pss >= 200 * 2**20


def test_a_failing_stage_is_recorded_with_its_message(tmp_path, stages):
    project = growth.make_project(tmp_path / "project", 20, PARAMS_TEXT)
    growth_measure.live_services().set_params(project / "params.yaml", {"data.source": "nowhere"})
    result = growth_measure.measure(stages[0], growth_report.ANY_ENGINE, 20, project, timeout_s=120)
    assert result.status == "failed"
    assert "data.source" in result.note and result.log_tail
    assert result.wall_s > 0 and result.peak_rss_mib > 0 and result.cpu_s > 0
    assert result.other_cores >= 0


def _points(seconds_of) -> dict[int, dict]:
    return {n: {"wall_s": seconds_of(n), "peak_rss_mib": 100 + n / 10} for n in (100, 1000, 10000)}


def test_a_linear_stage_fits_exactly_and_a_quadratic_one_shows_its_exponent():
    linear = growth_report.fit(_points(lambda n: 5 + 0.5 * n))
    assert linear["a"] == pytest.approx(5) and linear["b"] == pytest.approx(0.5)
    assert linear["r2"] == pytest.approx(1) and linear["mib_b"] == pytest.approx(0.1)
    assert 0.9 < linear["exponent"] <= 1 and linear["last_exponent"] == pytest.approx(1, abs=0.01)
    quadratic = growth_report.fit(_points(lambda n: 1e-4 * n**2))
    assert quadratic["last_exponent"] == pytest.approx(2) and quadratic["r2"] < 1
    two_sizes = growth_report.fit({n: p for n, p in _points(lambda n: n).items() if n < 10000})
    assert math.isnan(two_sizes["r2"])
    assert growth_report.fit({100: {"wall_s": 1.0, "peak_rss_mib": 1.0}}) is None


def test_the_projection_divides_only_the_spread_stages_by_the_nodes():
    found = {
        ("features", "ray"): growth_report.fit(_points(lambda n: 10 + 1.0 * n)),
        ("duplicates", "any"): growth_report.fit(_points(lambda n: 2 + 0.1 * n)),
        ("split", "any"): growth_report.fit(_points(lambda n: 3 - 1e-6 * n)),
    }
    table = growth_report.projection(found, cores=2).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table[2:]}
    tracks = growth_report.FMA_TRACKS
    assert rows["features"][2:5] == [
        growth_report.duration(10 + tracks / nodes) for nodes in growth_report.NODE_COUNTS
    ]
    assert (
        rows["duplicates"][2] == rows["duplicates"][4] == growth_report.duration(2 + 0.1 * tracks)
    )
    assert rows["split"][2] == growth_report.duration(3)  # no growth measured: its fixed cost
    assert "no growth measured" in rows["split"][-1]


def test_parts_of_one_run_merge_and_parts_from_two_machines_are_refused():
    def part(command: str, clips: int, cores: int = 2) -> dict:
        measurement = {"stage": "fetch", "clips": clips, "status": "ok", "wall_s": 1.0}
        machine = {"cores": cores, "memory_gib": 23.5}
        return {"command": command, "machine": machine, "total_s": 10.0, "errors": [],
                "measurements": [measurement]}  # fmt: skip

    merged = growth_report.merge([part("a", 100), part("b", 1000)])
    assert merged["total_s"] == 20.0 and merged["command"] == "a`; `b"
    assert [m["clips"] for m in merged["measurements"]] == [100, 1000]
    with pytest.raises(SystemExit, match="different machines"):
        growth_report.merge([part("a", 100), part("b", 1000, cores=4)])
