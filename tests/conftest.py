"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# `make test` runs the suite on two pytest-xdist workers, a file at a time on one worker, in the
# collected order (-n 2 --dist loadfile --no-loadscope-reorder). The longest files come first:
# the end-to-end pipeline (10 of the 17 serial minutes) starts at once on one worker while the
# other works through the rest, longest first, so that whatever is left at the end is short.
LONGEST_FIRST = [
    "integration/test_pipeline_e2e.py",
    "code/test_extract.py",
    "code/test_train.py",
    "model/test_serving.py",
    "model/test_musicnn.py",
    "integration/test_scale_out.py",
    "integration/test_object_storage.py",
    "data/test_features.py",
    "integration/test_mlproject.py",
]

# Nothing in the suite may phone home or wait on a network it does not have.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repository: real GTZAN clips, the reference table, the split lists."""
    path = REPO_ROOT.parent / "shared"
    if not (path / "data").is_dir():
        pytest.fail(f"{path}: shared data folder missing (it must sit beside the repository)")
    return path


@pytest.fixture(scope="session")
def gtzan_mini(shared_dir: Path) -> Path:
    """Folder holding genres/<genre>/<genre>.000NN.wav: 70 real clips."""
    return shared_dir / "data" / "gtzan_mini"


@pytest.fixture(scope="session")
def reference_table(shared_dir: Path) -> Path:
    return shared_dir / "data" / "gtzan_reference" / "features_30_sec.csv"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files worth reading after a run (reports, screenshots)."""
    path = REPO_ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, the files of LONGEST_FIRST first (in that order), then the others as
    collected; tests keep their order within a file. A serial run keeps the collected order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}

    def place(item: pytest.Item) -> int:
        try:
            return rank.get(item.path.relative_to(TESTS).as_posix(), len(rank))
        except ValueError:  # a test outside tests/
            return len(rank)

    items.sort(key=place)  # stable
