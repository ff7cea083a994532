"""The `pca` stage: a 2-D PCA scatter of the standardised 30 s features, coloured by genre.

Writes the projected points as DVC plot data (`dvc plots show` draws them with the scatter
template) and the same scatter as a PNG, plus the explained variance of the two components.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops import tracking
from gtzan_mlops.cli import stage_main
from gtzan_mlops.features.projection import project
from gtzan_mlops.reports.plots import pca_scatter_png
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Settings


def run(settings: Settings, root: Path) -> dict[str, Any]:
    seed = settings.pca.seed
    table = resolve_path(settings.paths.features, root) / "features_30_sec.csv"
    output_dir = resolve_path(settings.paths.pca, root)
    features = pd.read_csv(table)
    points, explained = project(features, settings.features.n_mfcc, seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    points.to_csv(output_dir / "pca_30_sec.csv", index=False)
    pca_scatter_png(points, explained, list(settings.genres), output_dir / "pca_30_sec.png")
    summary = {"clips": len(points), "explained_variance_ratio": explained}
    (output_dir / "pca_30_sec.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracking.use_store(root)
    tracking.log_stage_run(
        root,
        settings.mlflow.experiment_name,
        stage="pca",
        run_name="pca [30 s features]",
        params={"seed": seed, "clips": len(points)},
        metrics={"pc1_explained": explained[0], "pc2_explained": explained[1]},
        artifacts=[output_dir / "pca_30_sec.png", output_dir / "pca_30_sec.csv"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("pca", __doc__, run, argv, errors=(ValueError,))
