"""The `pca` stage: a 2-D PCA scatter of the standardised 30 s features, coloured by genre.

Writes the projected points as DVC plot data (`dvc plots show` draws them with the scatter
template) and the same scatter as a PNG, plus the explained variance of the two components.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from gtzan_mlops import tracking
from gtzan_mlops.cli import stage_main
from gtzan_mlops.features.handcrafted import feature_names
from gtzan_mlops.settings.loading import resolve_path


def project(features: pd.DataFrame, n_mfcc: int, seed: int) -> tuple[pd.DataFrame, list[float]]:
    """Track id, genre and the first two principal components of each clip; explained ratios."""
    if len(features) < 2:
        raise ValueError(f"PCA needs at least 2 clips, got {len(features)}")
    values = StandardScaler().fit_transform(features[list(feature_names(n_mfcc))])
    pca = PCA(n_components=2, random_state=seed)
    components = pca.fit_transform(values)
    points = pd.DataFrame(
        {
            "track_id": features["track_id"],
            "genre": features["genre"],
            "pc1": components[:, 0],
            "pc2": components[:, 1],
        }
    )
    return points, [float(ratio) for ratio in pca.explained_variance_ratio_]


def scatter_png(
    points: pd.DataFrame, explained: list[float], genres: list[str], path: Path
) -> None:
    # A bare Figure renders without pyplot's global state or a display backend.
    figure = Figure(figsize=(8, 6), dpi=100)
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    for index, genre in enumerate(genres):
        chosen = points[points["genre"] == genre]
        axes.scatter(chosen["pc1"], chosen["pc2"], s=18, color=colours(index % 10), label=genre)
    axes.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    axes.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
    axes.set_title(f"PCA of the 30 s features ({len(points)} clips)")
    axes.legend(loc="best", fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)


def run(params: dict[str, Any], root: Path) -> dict[str, Any]:
    seed = int(params["pca"]["seed"])
    table = resolve_path(params["paths"]["features"], root) / "features_30_sec.csv"
    output_dir = resolve_path(params["paths"]["pca"], root)
    features = pd.read_csv(table)
    points, explained = project(features, int(params["features"]["n_mfcc"]), seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    points.to_csv(output_dir / "pca_30_sec.csv", index=False)
    scatter_png(points, explained, list(params["genres"]), output_dir / "pca_30_sec.png")
    summary = {"clips": len(points), "explained_variance_ratio": explained}
    (output_dir / "pca_30_sec.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracking.use_store(root)
    tracking.log_stage_run(
        root,
        tracking.experiment_name(params),
        stage="pca",
        run_name="pca [30 s features]",
        params={"seed": seed, "clips": len(points)},
        metrics={"pc1_explained": explained[0], "pc2_explained": explained[1]},
        artifacts=[output_dir / "pca_30_sec.png", output_dir / "pca_30_sec.csv"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("pca", __doc__, run, argv, errors=(ValueError,))
