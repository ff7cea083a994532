"""`gtzan-mlops report`: the source study's accuracy table, reproduced and honestly split.

The source study's models (each family at its published settings: `train.<family>.defaults`
completed by the fixed values of `train.<family>.space`, no tuning) are trained under several
protocols. Their test accuracies go into one table beside the published ones, so the cost of
leakage is visible at a glance:

- `published`: the source study's 30 s accuracies, as published (`report.published`);
- `clip_stratified`: the 30 s reference table (all GTZAN clips), whole clips split 70/30
  stratified by genre: the source study's protocol. Each seed draws the split and seeds the model;
- `artist_filtered`: the same table on the artist-filtered lists of Kereliuk, Sturm and Larsen
  (train on train + valid, test on test); the lists are fixed, the seeds only seed the model;
- `random_segments` (LEAKY): the 3 s segment table, segments split 70/30 at random, so segments
  of one song sit on both sides; segment accuracy. Only here to reproduce the usual numbers;
- `song_grouped`: the 3 s segment table, songs split 70/30; segment accuracy and song-vote
  accuracy (segment probabilities averaged per song, as the served model votes).

The protocols' tables and folds come from evaluation/protocols.py, the models from
models/reproduction.py and the Markdown from reports/reproduction.py. Models train on everything
that is not test: nothing is tuned, Keras networks train exactly `epochs` epochs and XGBoost
exactly `n_estimators` rounds. A protocol whose input is missing (no segment table, no listed
clip in the reference table, lists that cannot be read or downloaded) is skipped and its reason
printed and written into the report. The `report` settings choose the tables, the lists, the
families, the seeds and the output folder; `--set` changes one for a run (paths relative to the
repository root):

    gtzan-mlops report --set "report.families=[knn, svm]" --set "report.seeds=[0]"

Outputs in `report.output_dir` (reports/reproduction in params.yaml):
- `reproduction.csv`: tidy, one row per family, protocol and metric: family, protocol, split
  (its label; the leaky one says so), leaky, data, n_train, n_test (rows at the model's level:
  clips or segments), metric, mean, std (sample std over the seeds; empty with one seed),
  n_seeds;
- `reproduction.md`: what was run, the table (rows: families; columns: protocols, each naming
  its split and data; cells: test accuracy, mean ± std over the seeds) and the gaps between the
  protocols, computed from the table; then the feature-set comparison below;
- `feature_sets.csv`: what each feature set (handcrafted, musicnn, both) is worth on the
  pipeline's own clip tables (`report.feature_sets.features_dir`), logistic regression and an
  RBF SVM on the same repeated stratified k-fold folds (evaluation/comparison.py); skipped, with
  its reason, where the musicnn tables are missing.
Neither file holds a date or a timing: the same inputs and seeds give the same files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.evaluation import comparison
from gtzan_mlops.evaluation.protocols import ProtocolInputs, prepare
from gtzan_mlops.models.reproduction import StudyModels, run_protocols, versions
from gtzan_mlops.reports.reproduction import ReproductionPage, display_path, render_markdown
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import Settings

log = logging.getLogger(__name__)

CSV_FILE = "reproduction.csv"
FEATURE_SETS_FILE = "feature_sets.csv"
MARKDOWN_FILE = "reproduction.md"


@dataclass
class Report:
    """What the command wrote: the table, the Markdown, the protocols it skipped and why."""

    table: pd.DataFrame
    markdown: str
    skipped: dict[str, str]
    csv_path: Path
    markdown_path: Path


def run(settings: Settings, root: Path) -> Report:
    """Train and score the source study's models under every protocol whose inputs exist, and
    write the table, the feature-set comparison and the Markdown report."""
    inputs = ProtocolInputs.of(settings, root)
    models = StudyModels.of(settings.report, settings.train)
    protocols, skipped, sizes = prepare(inputs)
    for name, reason in skipped.items():
        log.warning("skipping %s: %s", name, reason)
    if not protocols:
        raise ConfigError(
            "no protocol can run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    table = run_protocols(protocols, models, settings.report.published, inputs)
    output_dir = resolve_path(settings.report.output_dir, root)
    folds = settings.report.feature_sets
    features_dir = resolve_path(folds.features_dir or settings.paths.features, root)
    sets_table, sets_lines = comparison.feature_set_section(
        features_dir, display_path(features_dir, root), inputs.n_mfcc, folds
    )
    lists_source = sizes.get("lists_source")
    page = ReproductionPage(
        table=table,
        protocols=[(protocol.protocol, protocol.header) for protocol in protocols],
        notes=[note for protocol in protocols for note in protocol.notes],
        skipped=skipped,
        sizes=sizes,
        families=list(models.families),
        hyperparameters=models.hyperparameters,
        published=bool(settings.report.published),
        seeds=list(inputs.seeds),
        versions=versions(),
        reference_table=display_path(inputs.reference_table, root),
        segments_table=display_path(inputs.segments_table, root),
        lists_source=display_path(Path(lists_source), root) if lists_source else None,
        output_dir=display_path(output_dir, root),
    )
    markdown = render_markdown(page)
    markdown += "\n".join(sets_lines) + ("\n" if sets_lines else "")
    output_dir.mkdir(parents=True, exist_ok=True)
    if sets_table is not None:
        sets_table.to_csv(output_dir / FEATURE_SETS_FILE, index=False)
    csv_path = output_dir / CSV_FILE
    markdown_path = output_dir / MARKDOWN_FILE
    table.to_csv(csv_path, index=False)
    markdown_path.write_text(markdown, encoding="utf-8")
    return Report(table, markdown, skipped, csv_path, markdown_path)


def describe(report: Report) -> str:
    skipped = [f"skipped {name}: {reason}" for name, reason in report.skipped.items()]
    return "\n".join([*skipped, f"wrote {report.csv_path} and {report.markdown_path}"])


def main(argv: list[str] | None = None) -> int:
    return stage_main("report", __doc__, run, argv, describe=describe)
