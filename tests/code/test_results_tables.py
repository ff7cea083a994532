"""The results tables of the README and docs/results.md are the committed reports' tables
(tools/results_tables.py): a number typed by hand, or a report committed without its tables,
fails here; and the committed models report is what the evaluate stage renders from its CSV."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import results_tables  # noqa: E402

from gtzan_mlops.evaluation.models_table import models_markdown  # noqa: E402

REAL_CLIP_RUN = REPO_ROOT / "docs" / "results" / "gtzan_mini"


def test_the_committed_tables_match_their_sources():
    assert results_tables.drifted() == [], "run: python tools/results_tables.py"
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "results_tables.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_document_quotes_at_least_one_source():
    for name in results_tables.DOCUMENTS:
        assert results_tables.BLOCK.search((REPO_ROOT / name).read_text()), name


def _copy(tmp_path: Path) -> Path:
    for name in (*results_tables.DOCUMENTS, "docs/results/gtzan_mini/models.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "reports/reproduction").mkdir(parents=True)
    shutil.copy(
        REPO_ROOT / "reports/reproduction/reproduction.md", tmp_path / "reports/reproduction"
    )
    return tmp_path


def test_a_number_typed_by_hand_is_found_and_rewritten(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    original = readme.read_text()
    edited = original.replace(
        "| **fnn-both** (winner) | yes | 0.867", "| **fnn-both** (winner) | yes | 0.999"
    )
    assert edited != original
    readme.write_text(edited)
    assert results_tables.drifted(root) == ["README.md"]
    readme.write_text(results_tables.render(readme, root))
    assert readme.read_text() == original and results_tables.drifted(root) == []


def test_a_new_source_table_reaches_every_block_that_quotes_it(tmp_path):
    root = _copy(tmp_path)
    source = root / "docs/results/gtzan_mini/models.md"
    source.write_text(source.read_text().replace("| 20 |", "| 21 |"))
    assert sorted(results_tables.drifted(root)) == ["README.md", "docs/results.md"]
    for name in results_tables.DOCUMENTS:
        assert "| 21 |" in results_tables.render(root / name, root)


def test_a_block_quoting_a_missing_or_tableless_source_names_both_files(tmp_path):
    root = _copy(tmp_path)
    (root / "reports/reproduction/reproduction.md").unlink()
    with pytest.raises(
        results_tables.TableError, match=r"docs/results.md.*reproduction.md: no such"
    ):
        results_tables.render(root / "docs/results.md", root)
    (root / "reports/reproduction/reproduction.md").write_text("# no table here\n")
    with pytest.raises(results_tables.TableError, match="holds no Markdown table"):
        results_tables.render(root / "docs/results.md", root)


def test_the_committed_models_report_is_what_evaluate_renders_from_its_csv():
    metrics = json.loads((REAL_CLIP_RUN / "evaluate_metrics.json").read_text())
    lock = yaml.safe_load((REAL_CLIP_RUN / "dvc.lock").read_text())
    level = lock["stages"]["evaluate"]["params"]["params.yaml"]["uncertainty"]["level"]
    summary = {"split": metrics["split"], "selection": metrics["selection"]}
    table = pd.read_csv(REAL_CLIP_RUN / "models.csv")
    rendered = models_markdown(table, {**summary, "uncertainty_level": level})
    assert rendered == (REAL_CLIP_RUN / "models.md").read_text()
