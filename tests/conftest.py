"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

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
