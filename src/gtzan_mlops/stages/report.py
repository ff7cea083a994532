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

The protocols' tables and folds come from protocols.py. Models train on everything that is not
test: nothing is tuned, Keras networks train exactly `epochs` epochs and XGBoost exactly
`n_estimators` rounds. A protocol whose input is missing (no segment table, no listed clip in the
reference table, lists that cannot be read or downloaded) is skipped and its reason printed and
written into the report.

Outputs in `report.output_dir` (default reports/reproduction):
- `reproduction.csv`: tidy, one row per family, protocol and metric: family, protocol, split
  (its label; the leaky one says so), leaky, data, n_train, n_test (rows at the model's level:
  clips or segments), metric, mean, std (sample std over the seeds; empty with one seed),
  n_seeds;
- `reproduction.md`: what was run, the table (rows: families; columns: protocols, each naming
  its split and data; cells: test accuracy, mean ± std over the seeds) and the gaps between the
  protocols, computed from the table; then the feature-set comparison below;
- `feature_sets.csv`: what each feature set (handcrafted, musicnn, both) is worth on the
  pipeline's own clip tables (`report.feature_sets.features_dir`), logistic regression and an
  RBF SVM on the same repeated stratified k-fold folds (comparison.py); skipped, with its
  reason, where the musicnn tables are missing.
Neither file holds a date or a timing: the same inputs and seeds give the same files.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data import split_strategies
from gtzan_mlops.evaluation import comparison
from gtzan_mlops.evaluation.comparison import ComparisonSettings
from gtzan_mlops.evaluation.protocols import Fold, ProtocolData, ProtocolSettings, prepare
from gtzan_mlops.evaluation.scoring import score_classifier
from gtzan_mlops.features.handcrafted import feature_names
from gtzan_mlops.models import zoo
from gtzan_mlops.reports import markdown
from gtzan_mlops.settings.loading import ConfigError, resolve_path

log = logging.getLogger(__name__)

CSV_FILE = "reproduction.csv"
FEATURE_SETS_FILE = "feature_sets.csv"
MARKDOWN_FILE = "reproduction.md"
COLUMNS = (
    "family",
    "protocol",
    "split",
    "leaky",
    "data",
    "n_train",
    "n_test",
    "metric",
    "mean",
    "std",
    "n_seeds",
)
PUBLISHED = "published"
PUBLISHED_SPLIT = "source study's 70/30 clip split, as published"
DECIMALS = 6  # of mean and std in the CSV

FAMILY_NAMES = {
    "naive_bayes": "Naive Bayes",
    "sgd": "SGD",
    "knn": "KNN",
    "decision_tree": "Decision tree",
    "random_forest": "Random forest",
    "svm": "SVM",
    "logistic_regression": "Logistic regression",
    "mlp": "Neural net (sklearn MLP)",
    "fnn": "FNN",
    "fnn_simple": "FNN simple",
    "xgboost": "XGBoost",
}

# Metrics recorded per protocol (names of evaluate's metrics without the `test_` prefix). For a
# clip model a song is a clip, and a random segment split has every song on both sides, so song
# metrics are only recorded where they say something: song-grouped segments.
PROTOCOL_METRICS = {
    "clip_stratified": ("accuracy", "macro_f1"),
    "artist_filtered": ("accuracy", "macro_f1"),
    "random_segments": ("accuracy", "macro_f1"),
    "song_grouped": ("accuracy", "macro_f1", "song_accuracy", "song_macro_f1"),
}


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSettings:
    """The `report` section of params.yaml, with the paths resolved and CLI overrides applied."""

    data: ProtocolSettings  # the tables, the lists and how the protocols split them
    families: list[str]
    output_dir: Path
    published: dict[str, float]
    hyperparameters: dict[str, dict[str, Any]]  # per family: the source study's settings
    features_dir: Path  # the tables of the feature-set comparison
    comparison: ComparisonSettings

    @classmethod
    def from_params(cls, params: dict[str, Any], root: Path) -> ReportSettings:
        stage, train = params["report"], params["train"]
        features_dir = params["paths"]["features"]
        filtered = params["split"]["artist_filtered"]
        lists_dir = stage["lists_dir"] or filtered["lists_dir"]
        families = stage["families"] or train["families"]
        if isinstance(families, str):
            families = [families]
        families = list(dict.fromkeys(str(family) for family in families))
        unknown = [family for family in families if family not in zoo.FAMILIES]
        if unknown:
            raise ConfigError(
                f"report.families: unknown {unknown}; known: {', '.join(zoo.FAMILIES)}"
            )
        hyperparameters = {}
        for family in families:
            if family not in train:
                raise ConfigError(f"params.yaml: missing setting 'train.{family}'")
            own = train[family]
            hyperparameters[family] = {**zoo.fixed(own["space"]), **own["defaults"]}
        seeds = stage["seeds"]
        seeds = [int(seeds)] if isinstance(seeds, int | str) else [int(seed) for seed in seeds]
        if not seeds:
            raise ConfigError("report.seeds must name at least one seed")
        test_size = float(stage["test_size"])
        if not 0 < test_size < 1:
            raise ConfigError(f"report.test_size must be in (0, 1), got {test_size}")
        published = {str(k): float(v) for k, v in stage["published"].items()}
        sets = stage["feature_sets"]
        data = ProtocolSettings(
            reference_table=resolve_path(
                stage["reference_table"] or f"{features_dir}/features_30_sec.csv", root
            ),
            segments_table=resolve_path(
                stage["segments_table"] or f"{features_dir}/features_3_sec.csv", root
            ),
            lists_dir=resolve_path(lists_dir, root) if lists_dir else None,
            download={
                "url": filtered["url"],
                "download_dir": resolve_path(filtered["download_dir"], root),
                "timeout_s": float(filtered["timeout_s"]),
                "sha256": filtered["sha256"],
            },
            seeds=list(dict.fromkeys(seeds)),
            test_size=test_size,
            classes=[str(genre) for genre in params["genres"]],
            n_mfcc=int(params["features"]["n_mfcc"]),
        )
        return cls(
            data=data,
            families=families,
            output_dir=resolve_path(stage["output_dir"], root),
            published=published,
            hyperparameters=hyperparameters,
            features_dir=resolve_path(sets["features_dir"] or features_dir, root),
            comparison=ComparisonSettings(sets["n_splits"], sets["n_repeats"], sets["seed"]),
        )


# --- training and scoring -------------------------------------------------------------------


def score_fold(
    family: str, fold: Fold, protocol: ProtocolData, settings: ReportSettings
) -> dict[str, float]:
    """Train `family` at the source study's settings on the fold's train rows; its test metrics
    (evaluate's metrics without the `test_` prefix)."""
    columns = list(feature_names(settings.data.n_mfcc))
    index = {genre: number for number, genre in enumerate(settings.data.classes)}
    train = (fold.train[columns], fold.train["genre"].map(index).to_numpy())
    result = zoo.fit_family(
        family, settings.hyperparameters[family], train, len(settings.data.classes), fold.seed
    )
    evaluation = score_classifier(
        result.model, protocol.level, settings.data.classes, columns, fold.test, family
    )
    if zoo.flavor_of(family) == "keras":
        import keras

        keras.backend.clear_session()  # free the network's graph state before the next one
    return {
        metric: float(evaluation.metrics[f"test_{metric}"])
        for metric in PROTOCOL_METRICS[protocol.protocol]
    }


def _count(values: list[int]) -> int:
    return int(values[0]) if len(set(values)) == 1 else round(float(np.mean(values)))


def run_protocols(protocols: list[ProtocolData], settings: ReportSettings) -> pd.DataFrame:
    """The tidy table: published rows, then every protocol's metrics per family."""
    rows = []
    for family in settings.families:
        if family in settings.published:
            rows.append(
                {
                    "family": family,
                    "protocol": PUBLISHED,
                    "split": PUBLISHED_SPLIT,
                    "leaky": False,
                    "data": "30 s clips (source study)",
                    "n_train": None,
                    "n_test": None,
                    "metric": "accuracy",
                    "mean": settings.published[family],
                    "std": None,
                    "n_seeds": None,
                }
            )
        for protocol in protocols:
            strategy = split_strategies.STRATEGIES[protocol.protocol]
            values: dict[str, list[float]] = {}
            for fold in protocol.folds:
                started = time.perf_counter()
                scores = score_fold(family, fold, protocol, settings)
                log.info(
                    "%s, %s, seed %d: accuracy %.4f (%.1f s)",
                    family,
                    strategy.label,
                    fold.seed,
                    scores["accuracy"],
                    time.perf_counter() - started,
                )
                for metric, value in scores.items():
                    values.setdefault(metric, []).append(value)
            for metric, scores in values.items():
                rows.append(
                    {
                        "family": family,
                        "protocol": protocol.protocol,
                        "split": strategy.label,
                        "leaky": strategy.leaky,
                        "data": protocol.data,
                        "n_train": _count([len(fold.train) for fold in protocol.folds]),
                        "n_test": _count([len(fold.test) for fold in protocol.folds]),
                        "metric": metric,
                        "mean": round(float(np.mean(scores)), DECIMALS),
                        "std": round(float(np.std(scores, ddof=1)), DECIMALS)
                        if len(scores) > 1
                        else None,
                        "n_seeds": len(scores),
                    }
                )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("n_train", "n_test", "n_seeds"):
        table[column] = table[column].astype("Int64")
    table["std"] = table["std"].astype(float)
    return table


# --- the markdown ---------------------------------------------------------------------------


def display_path(path: Path, root: Path) -> str:
    """A path relative to the repository root, `../shared/...` for the folder beside it, so the
    report reads the same on every machine (the command ran from the root)."""
    return os.path.relpath(path.resolve(), root.resolve())


def cell(table: pd.DataFrame, family: str, protocol: str, metric: str = "accuracy") -> str:
    chosen = table[
        (table["family"] == family) & (table["protocol"] == protocol) & (table["metric"] == metric)
    ]
    if chosen.empty:
        return "—"
    mean, std = float(chosen["mean"].iloc[0]), chosen["std"].iloc[0]
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {float(std):.3f}"


def markdown_table(
    table: pd.DataFrame, protocols: list[ProtocolData], settings: ReportSettings
) -> list[str]:
    columns: list[tuple[str, str, str]] = []  # (header, protocol, metric)
    if settings.published:
        columns.append(("published (source study, 30 s, 70/30)", PUBLISHED, "accuracy"))
    for protocol in protocols:
        if protocol.protocol == "song_grouped":
            columns.append((f"{protocol.header}: segments", protocol.protocol, "accuracy"))
            columns.append((f"{protocol.header}: song vote", protocol.protocol, "song_accuracy"))
        else:
            columns.append((protocol.header, protocol.protocol, "accuracy"))
    rows = [
        [FAMILY_NAMES.get(family, family)]
        + [cell(table, family, protocol, metric) for _, protocol, metric in columns]
        for family in settings.families
    ]
    header = ["Model", *(name for name, _, _ in columns)]
    return markdown.table(header, rows, align="l" + "r" * len(columns))


def paired_gaps(
    table: pd.DataFrame, high: tuple[str, str], low: tuple[str, str]
) -> dict[str, float]:
    """Per family: mean of `high` (protocol, metric) minus mean of `low`, where both exist."""
    values = table.set_index(["protocol", "metric", "family"])["mean"]
    gaps = {}
    for family in table["family"].unique():
        try:
            gaps[str(family)] = float(values.loc[(*high, family)] - values.loc[(*low, family)])
        except KeyError:
            continue
    return gaps


def describe_gap(gaps: dict[str, float], what: str) -> str:
    """`what` (a clause naming the two sides) with the average, smallest and largest gap."""
    mean = float(np.mean(list(gaps.values())))
    least = min(gaps, key=lambda family: (gaps[family], family))
    most = max(gaps, key=lambda family: (gaps[family], family))
    name = FAMILY_NAMES.get
    return (
        f"{what}: {mean:+.3f} accuracy on average over {len(gaps)} models "
        f"(from {gaps[least]:+.3f}, {name(least, least)}, to {gaps[most]:+.3f}, "
        f"{name(most, most)})."
    )


def gap_paragraph(table: pd.DataFrame) -> list[str]:
    """The gaps between protocols, computed from the table (positive: the first is higher)."""
    sentences = []
    leak = paired_gaps(table, ("random_segments", "accuracy"), ("song_grouped", "accuracy"))
    if leak:
        sentences.append(
            describe_gap(
                leak,
                "Random segments (LEAKY) minus song-grouped, segment accuracy on the same 3 s "
                "table",
            )
        )
    vote = paired_gaps(table, ("random_segments", "accuracy"), ("song_grouped", "song_accuracy"))
    if vote:
        sentences.append(
            describe_gap(vote, "Random segments (LEAKY) minus song-grouped song-vote accuracy")
        )
    artist = paired_gaps(table, ("clip_stratified", "accuracy"), ("artist_filtered", "accuracy"))
    if artist:
        sentences.append(
            describe_gap(artist, "Clip-stratified minus artist-filtered, 30 s reference table")
        )
    reproduced = paired_gaps(table, ("clip_stratified", "accuracy"), (PUBLISHED, "accuracy"))
    if reproduced:
        sentences.append(
            describe_gap(reproduced, "Clip-stratified (this reproduction) minus published")
            + f" Mean absolute difference: {np.mean(np.abs(list(reproduced.values()))):.3f}."
        )
    if not sentences:
        return []
    return [
        "## Gaps between protocols",
        "",
        " ".join(sentences)
        + " A positive gap is what the first split gains over the second; between a leaky and "
        "an honest split, it is accuracy that comes from recognising songs (or artists) seen in "
        "training, not genres.",
    ]


def command_line(settings: ReportSettings, root: Path, lists_source: str | None) -> str:
    parts = [
        "gtzan-mlops report",
        f"--reference-table {display_path(settings.data.reference_table, root)}",
        f"--segments-table {display_path(settings.data.segments_table, root)}",
    ]
    if lists_source:
        parts.append(f"--lists-dir {display_path(Path(lists_source), root)}")
    parts += [
        "--families " + " ".join(settings.families),
        "--seeds " + " ".join(map(str, settings.data.seeds)),
        f"--output-dir {display_path(settings.output_dir, root)}",
    ]
    return " ".join(parts)


def render_markdown(
    table: pd.DataFrame,
    protocols: list[ProtocolData],
    skipped: dict[str, str],
    sizes: dict[str, Any],
    settings: ReportSettings,
    root: Path,
) -> str:
    lists_source = sizes.get("lists_source")
    seeds = ", ".join(map(str, settings.data.seeds))
    reference = display_path(settings.data.reference_table, root)
    segments = display_path(settings.data.segments_table, root)
    lines = [
        "# Reproduction of the source study's accuracies, under honest splits",
        "",
        f"Written by `{command_line(settings, root, lists_source)}`.",
        "",
        "- Models: each family at the source study's settings (`train.<family>.defaults` with the "
        "fixed values of `train.<family>.space`, no tuning), trained on everything that is not "
        "test: Keras networks for exactly `epochs` epochs, XGBoost for exactly `n_estimators` "
        "rounds (no early stopping).",
        f"- Reference table (30 s columns): `{reference}`, "
        + (f"{sizes['clips']} clips." if "clips" in sizes else "not found."),
        f"- Segment table (3 s columns): `{segments}`, "
        + (
            f"{sizes['segment_clips']} clips ({sizes['segments']} segments). The segment "
            "columns come from this table, not from the reference table: their clip count is "
            "this table's."
            if "segments" in sizes
            else "not found."
        ),
    ]
    if lists_source:
        lines.append(f"- Artist-filtered lists: `{display_path(Path(lists_source), root)}`.")
    lines += [
        f"- Seeds: {seeds}. Each seed draws the split and seeds the model; the artist-filtered "
        "lists are fixed, so there the seeds only seed the model.",
        "- Cells: test accuracy, mean ± sample standard deviation over the seeds (the song-vote "
        "column: segment probabilities averaged per test song). The random-segment split is "
        "LEAKY: segments of one song are in train and test.",
        "- Versions: " + ", ".join(zoo.installed_requirements(VERSIONED)) + ".",
        "",
        *markdown_table(table, protocols, settings),
        "",
    ]
    gaps = gap_paragraph(table)
    if gaps:
        lines += [*gaps, ""]
    notes = [note for protocol in protocols for note in protocol.notes]
    if notes or skipped:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in notes]
        lines += [f"- Skipped `{name}`: {reason}" for name, reason in skipped.items()]
        lines.append("")
    lines += [
        "## Model settings",
        "",
        "As passed to the model (`{**fixed values of the space, **defaults}`); "
        + ", ".join(f"`{name}`" for name in UNUSED_WITHOUT_VALIDATION)
        + " are left out: without a validation set they do nothing.",
        "",
    ]
    lines += [
        f"- {FAMILY_NAMES.get(family, family)} (`{family}`): "
        + ", ".join(
            f"{name}={value}"
            for name, value in sorted(values.items())
            if name not in UNUSED_WITHOUT_VALIDATION
        )
        for family, values in settings.hyperparameters.items()
    ]
    return "\n".join(lines) + "\n"


# Early-stopping settings of Keras and XGBoost: inert here (no validation rows).
UNUSED_WITHOUT_VALIDATION = ("patience", "early_stopping_rounds")
VERSIONED = ("scikit-learn", ("xgboost-cpu", "xgboost"), ("tensorflow-cpu", "tensorflow"), "keras")


# --- the command ----------------------------------------------------------------------------


@dataclass
class Report:
    table: pd.DataFrame
    markdown: str
    skipped: dict[str, str]
    csv_path: Path
    markdown_path: Path


def run(params: dict[str, Any], root: Path) -> Report:
    settings = ReportSettings.from_params(params, root)
    protocols, skipped, sizes = prepare(settings.data)
    for name, reason in skipped.items():
        log.warning("skipping %s: %s", name, reason)
    if not protocols:
        raise ConfigError(
            "no protocol can run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    table = run_protocols(protocols, settings)
    sets_table, sets_lines = feature_set_section(settings, root)
    markdown = render_markdown(table, protocols, skipped, sizes, settings, root)
    markdown += "\n".join(sets_lines) + ("\n" if sets_lines else "")
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    if sets_table is not None:
        sets_table.to_csv(settings.output_dir / FEATURE_SETS_FILE, index=False)
    csv_path = settings.output_dir / CSV_FILE
    markdown_path = settings.output_dir / MARKDOWN_FILE
    table.to_csv(csv_path, index=False)
    markdown_path.write_text(markdown, encoding="utf-8")
    return Report(table, markdown, skipped, csv_path, markdown_path)


def feature_set_section(
    settings: ReportSettings, root: Path
) -> tuple[pd.DataFrame | None, list[str]]:
    """The feature-set comparison and its Markdown section; where it cannot run (tables
    missing, fewer clips of a genre than folds), the section says why and no table is
    returned."""
    from gtzan_mlops.features.feature_sets import FeatureSetError

    heading = ["## Feature sets: hand-crafted, musicnn, both", ""]
    try:
        table = comparison.compare_feature_sets(
            settings.features_dir, settings.data.n_mfcc, settings.comparison
        )
    except (FileNotFoundError, FeatureSetError, comparison.ComparisonError) as error:
        log.warning("skipping the feature-set comparison: %s", error)
        return None, [*heading, f"Skipped: {error}", ""]
    folds = settings.comparison
    lines = [
        *heading,
        f"Clip-level vectors of `{display_path(settings.features_dir, root)}` "
        f"({int(table['clips'].iloc[0])} clips): the 57 hand-crafted features of the whole clip, "
        "the mean MSD_musicnn embedding of its 3 s segments, or both side by side. Test "
        f"accuracy, mean ± std over the {int(table['folds'].iloc[0])} folds of "
        f"RepeatedStratifiedKFold(n_splits={folds.n_splits}, n_repeats={folds.n_repeats}, "
        f"random_state={folds.seed}), the same folds for every cell, the scaler fitted inside "
        f"each fold. Split `{comparison.SPLIT_LABEL}`: whole clips, so no song is on both "
        "sides, but artists are not kept apart.",
        "",
        *comparison.markdown_table(table),
        "",
    ]
    return table, lines


def _names(values: list[str]) -> list[str]:
    """`a b,c` -> [a, b, c]: families given space- or comma-separated."""
    return [name for value in values for name in value.split(",") if name]


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference-table",
        default=None,
        help="30 s table of all GTZAN clips (default: report.reference_table, else "
        "paths.features/features_30_sec.csv)",
    )
    parser.add_argument(
        "--segments-table",
        default=None,
        help="3 s segment table (default: report.segments_table, else "
        "paths.features/features_3_sec.csv)",
    )
    parser.add_argument(
        "--lists-dir",
        default=None,
        help="folder with {train,valid,test}_filtered.txt (default: report.lists_dir, else "
        "split.artist_filtered.lists_dir, else downloaded)",
    )
    parser.add_argument(
        "--families", nargs="+", default=None, help="families to run (default: train.families)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="seeds (default: report.seeds)"
    )
    parser.add_argument("--output-dir", default=None, help="default: report.output_dir")


def run_command(params: dict[str, Any], root: Path, args: argparse.Namespace) -> Report:
    """`run` with the command line's options over the `report` section. Paths on the command
    line are relative to the working directory; in params.yaml, to the repository root."""
    overrides = {
        "reference_table": _absolute(args.reference_table),
        "segments_table": _absolute(args.segments_table),
        "lists_dir": _absolute(args.lists_dir),
        "families": _names(args.families) if args.families else None,
        "seeds": args.seeds,
        "output_dir": _absolute(args.output_dir),
    }
    stage = {
        **params["report"],
        **{key: value for key, value in overrides.items() if value is not None},
    }
    return run({**params, "report": stage}, root)


def describe(report: Report) -> str:
    skipped = [f"skipped {name}: {reason}" for name, reason in report.skipped.items()]
    return "\n".join([*skipped, f"wrote {report.csv_path} and {report.markdown_path}"])


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "report", __doc__, run_command, argv, describe=describe, arguments=add_arguments
    )
