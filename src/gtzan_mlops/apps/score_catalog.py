"""`gtzan-mlops score-catalog FOLDER_OR_LIST --output scores.parquet`: the genre of every audio
file of a catalog, with a registered model, on Ray.

A folder's audio files (any depth), or the files a list file names one per line, are scored
by a pool of model-holding actors (resources.catalog: actors, batch_size) through Ray Data, on
the cluster at resources.ray.address or on a Ray started for the run (null). The output holds,
per file, its path, size, mtime, content sha256, genre, the probability of each genre, the
model's name and version, and the reason it failed if it did; a rerun skips the files that
model version has already scored (serving/catalog.py). Exits 0 when every file is scored, 1
when some failed (listed on stderr), 2 on a usage, model, output or cluster error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gtzan_mlops.cli import (
    EXIT_INPUT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_model_arguments,
    command_parser,
    model_command,
    model_load_failure,
)
from gtzan_mlops.cluster import ClusterError, ray_session
from gtzan_mlops.serving.catalog import CatalogError, fetch_model, list_catalog, score_catalog
from gtzan_mlops.serving.catalog_store import CatalogOutputError
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.tracking import use_store

NAME = "score-catalog"


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        NAME,
        "Classify every audio file of a folder or list file with a registered model on Ray, "
        "into a Parquet file of scores; a rerun skips the files done.",
    )
    parser.add_argument(
        "catalog",
        type=Path,
        help="a folder (its audio files, any depth) or a text file listing one path per line",
    )
    parser.add_argument("--output", type=Path, required=True, help="the scores (Parquet)")
    add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def fail(message: object) -> int:
        print(f"gtzan-mlops {NAME}: {message}", file=sys.stderr)
        return EXIT_USAGE

    def report(path: str, reason: str) -> None:
        print(f"{path}: FAILED: {reason}", file=sys.stderr)

    try:
        model_uri, settings, root = model_command(args, reads_settings=True)
        paths = list_catalog(args.catalog)
    except (ConfigError, CatalogError) as error:
        return fail(error)
    assert settings is not None  # read: reads_settings
    if not paths:
        return fail(f"{args.catalog}: no audio files to score")
    use_store(root)
    try:
        model = fetch_model(model_uri)
    except CatalogError as error:
        return fail(error)
    except Exception as error:  # any loading failure ends the command with its reason
        print(model_load_failure(NAME, model_uri, error), file=sys.stderr)
        return EXIT_USAGE
    try:
        with ray_session(settings.resources.ray.address, purpose=NAME) as session:
            run = score_catalog(
                paths, args.output, model, settings.resources.catalog, session, report
            )
    except (ClusterError, CatalogOutputError, CatalogError) as error:
        return fail(error)
    version = f" version {run.model.version}" if run.model.version else ""
    print(
        f"{NAME}: {run.files} files, {run.scored} scored, {run.skipped} skipped (already "
        f"scored), {run.failed} failed, by {run.model.name}{version} on {run.actors} actors "
        f"-> {run.output}"
    )
    return EXIT_INPUT_FAILED if run.failed else EXIT_OK
