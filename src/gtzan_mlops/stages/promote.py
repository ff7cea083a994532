"""The `promote` stage: register the evaluated winner and move the `champion` alias if it earns it.

The winner of the evaluate stage (`reports/evaluate/evaluation.json`, chosen without the test
set) is logged as the serving model (the serving package: a pyfunc that takes raw audio) and
registered as a new version of `promote.model_name`. Then both it and the current champion are
played the audio files of the current test clips, exactly as `mlflow models serve` would be, and
the rule of promotion/rule.py decides: the challenger must pass the behavioural gate (its genre
unchanged on quieter, later, resampled and MP3 copies of the test clips), the champion must not
have trained on those clips, and the challenger must beat it on them by the paired song-level
difference. Because both are scored on audio, a champion trained on other data, split or
features is compared on the same clips as the challenger: no feature table needs to match.

Every version is tagged with what it is and what it was trained on: data source, number and
digest of its training clips (the list itself, by the sha256 of their decoded samples, is the
run's `training_clips.csv`), split, selection rule and score, the served test scores with their
intervals, the behavioural fractions and the decision. The decision and its evidence go to
`reports/promote/promotion.json` (the key numbers to the DVC metrics file
`metrics/promotion.json`). Registry stages (deprecated) are never used: only aliases and tags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gtzan_mlops.cli import stage_main
from gtzan_mlops.evaluation.records import (
    EVALUATION_FILE,
    load_family_record,
    record_feature_set,
    record_model,
    stale_reason,
)
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.evaluation.test_data import load_test_data
from gtzan_mlops.features import feature_sets
from gtzan_mlops.promotion.challenger import serving_feature_settings
from gtzan_mlops.promotion.registry import (
    PromotionSettings,
    RunContext,
    data_source,
    key_metrics,
    promote_winner,
)
from gtzan_mlops.promotion.served_evaluation import load_split_clips
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Settings


def run(settings: Settings, root: Path) -> dict[str, Any]:
    """The stage: promote the evaluated winner, write the decision and its key metrics."""
    from gtzan_mlops import tracking

    paths = settings.paths
    evaluate_path = resolve_path(paths.evaluate_reports, root) / EVALUATION_FILE
    records_dir = resolve_path(paths.train_records, root)
    output = resolve_path(paths.promote_reports, root) / "promotion.json"
    metrics_path = resolve_path(paths.metrics, root) / "promotion.json"
    try:
        evaluation = json.loads(evaluate_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise EvaluationError(f"{evaluate_path}: no such file (run the evaluate stage)") from error
    record = load_family_record(records_dir / f"{evaluation['winner']}.json")
    if "selection" not in record:
        raise EvaluationError(
            f"{records_dir / evaluation['winner']}.json has no selection score (trained by an "
            "older version of the train stage); rerun the pipeline"
        )
    weights = musicnn_sha256 = None
    if feature_sets.uses_musicnn(record_feature_set(record)):
        from gtzan_mlops.features.musicnn import weights_digest

        weights = feature_sets.ExtractionSettings.of(settings, root).musicnn_weights
        musicnn_sha256 = weights_digest(weights)
    feature_settings = serving_feature_settings(
        settings.features,
        record,
        resolve_path(paths.features, root),
        musicnn_sha256,
    )
    data = load_test_data(paths, root)
    stale = stale_reason(record, data)
    if stale:
        # Its tags would name the current data while its scores came from other data.
        raise EvaluationError(
            f"{record_model(record)}: {stale} than the current one; rerun train and evaluate"
        )
    clips = load_split_clips(paths, root)
    tracking.use_store(root)
    summary = promote_winner(
        evaluation,
        record,
        data,
        clips,
        feature_settings,
        PromotionSettings.of(settings, weights),
        RunContext(data_source(settings.data), tracking.git_commit(root)),
    )
    for path, content in ((output, summary), (metrics_path, key_metrics(summary))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    return summary


def describe(summary: dict[str, Any]) -> str:
    if not summary["registered"]:
        verdict = "nothing new to register"
    elif summary["promoted"]:
        verdict = "promoted to champion"
    else:
        verdict = "registered, not promoted"
    return (
        f"{summary['model_name']} version {summary['version']} ({summary['model']}): "
        f"{verdict}: {summary['reason']}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("promote", __doc__, run, argv, errors=(EvaluationError,), describe=describe)
