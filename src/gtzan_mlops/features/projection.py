"""The clips' hand-crafted features projected on their first two principal components, after
standardisation: what the pca stage draws."""

from __future__ import annotations

import pandas as pd
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from gtzan_mlops.features.handcrafted import feature_names


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
