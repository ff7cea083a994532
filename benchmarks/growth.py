"""Growth benchmark: how each stage's wall time and peak memory grow with the number of clips.

For every size N (--sizes, default 100 and 1,000 clips; a multiple of 10, N/10 per genre) a
throwaway project in a temporary folder (--workdir) holds only a params.yaml: the repository's,
with data.source=demo and data.demo.clips_per_genre=N/10 (the synthetic generator's 30 s clips).
The stages of dvc.yaml run there in dvc.yaml's order, each as its own command, as DVC would run
it: `python -m gtzan_mlops <cmd> --params <project>/params.yaml`, the train matrices expanded
from the params as DVC does (train@<family>-<feature set>), with the demo's own training
budgets. The project (13 GB of WAV at 10,000 clips) is deleted when its size is done.

Measured per stage (benchmarks/growth_measure.py): wall time (start of the command to its exit)
and peak memory, the largest sum over the stage's process tree (the command and all its
descendants: pool workers, fpcalc, the gcs_server, raylet and workers of a local Ray the stage
starts) of each process's RSS (and, in the JSON, of its PSS, which counts shared pages once),
sampled every 0.2 s (processes shorter than that can be missed); its CPU time, and how many cores
other work on the machine kept busy meanwhile (the machine's busy CPU time less the stage's and
this script's, over the wall time): a stage measured beside other work is slower.

resources.engine changes only the features and train stages: they run once per engine
(--engines, default local and ray, `--set resources.engine=<engine>`), the features stage's
per-clip cache and the Optuna studies emptied before each engine's run; the other stages do the
same work under either engine and run once (engine "any" in the table). The first engine's run
feeds the later stages. A stage that fails or passes --stage-timeout is recorded as such, the
stages that need its outputs as skipped.

At --large-size (default 10,000) only fetch, duplicates and split run: the stages that could
grow faster than linearly. The features stage is not run there: split, which reads only the
tables' track ids, genres and segment numbers, gets stand-in tables of the real shape (one row
per clip and per segment of the manifest's clips, the 57 feature columns filled with synthetic
random numbers), written by this script and not timed. The same happens at any size when
--stages selects split but not features.

Prints the Markdown tables of benchmarks/growth_report.py: per stage and size the measurements,
per stage the fit of time against clips, and the projection for FMA at full size.

    python benchmarks/growth.py --output growth.json          # 100, 1000; 10,000 for three stages
    python benchmarks/growth.py --sizes 40 80 --large-size 160 --engines local
    python benchmarks/growth.py --sizes 100 --stages fetch duplicates split --large-size 0
    python benchmarks/growth_report.py growth.json            # the tables again, from the JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import yaml
from growth_measure import Measurement, live_services, measure
from growth_report import ANY_ENGINE, print_report

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CLIP_BYTES = 30 * 22050 * 2 + 44  # one 30 s synthetic clip: 16-bit mono WAV at 22,050 Hz
LARGE_STAGES = ("fetch", "duplicates", "split")  # also run at --large-size
ENGINE_COMMANDS = ("features", "train")  # the commands whose work resources.engine places
STAND_IN_READERS = ("split",)  # stages that can run on stand-in feature tables


# --- the stages, from dvc.yaml -----------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml (a matrix stage expanded): its name, the `gtzan-mlops` arguments,
    and its data deps and outs as paths relative to the project."""

    name: str  # fetch, train@knn-handcrafted
    group: str  # the dvc.yaml key: fetch, train, train_candidates
    args: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]

    @property
    def uses_engine(self) -> bool:
        return self.args[0] in ENGINE_COMMANDS

    def needs(self, other: Stage) -> bool:
        """Whether this stage reads something `other` writes (a file, or in a folder of it)."""
        return any(
            dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
            for dep in self.deps
            for out in other.outs
        )


_VARIABLE = re.compile(r"\$\{([^}]+)\}")


def _lookup(name: str, params: dict[str, Any], item: dict[str, str]) -> Any:
    if name.startswith("item."):
        return item[name.removeprefix("item.")]
    value: Any = params
    for key in name.split("."):
        value = value[key]
    return value


def _fill(text: str, params: dict[str, Any], item: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda match: str(_lookup(match.group(1), params, item)), text)


def _paths(entries: list[Any], params: dict[str, Any], item: dict[str, str]) -> tuple[str, ...]:
    """dvc.yaml deps or outs (a path, or {path: options}), interpolated and normalised."""
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
    return tuple(os.path.normpath(_fill(name, params, item)) for name in names)


def pipeline_stages(params: dict[str, Any]) -> list[Stage]:
    """dvc.yaml's stages in its order, the matrices expanded from `params` (DVC's naming)."""
    definitions = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    stages = []
    for group, definition in definitions.items():
        matrix = {
            key: _lookup(_VARIABLE.fullmatch(values)[1], params, {})
            if isinstance(values, str)
            else values
            for key, values in definition.get("matrix", {}).items()
        }
        for combination in itertools.product(*matrix.values()):
            item = dict(zip(matrix, map(str, combination), strict=True))
            command = _fill(definition["cmd"], params, item).split()
            if command[0] != "gtzan-mlops":
                raise SystemExit(f"dvc.yaml: stage {group} runs {command[0]}, not gtzan-mlops")
            stages.append(
                Stage(
                    name=f"{group}@{'-'.join(item.values())}" if item else group,
                    group=group,
                    args=tuple(command[1:]),
                    deps=_paths(definition.get("deps", []), params, item),
                    outs=_paths(definition.get("outs", []), params, item),
                )
            )
    return stages


@dataclass(frozen=True)
class Plan:
    """The stages to run at one size, and whether split reads stand-in feature tables."""

    stages: list[Stage]
    stand_in_features: bool


def plan(stages: list[Stage], selected: set[str]) -> Plan:
    """The `selected` stages (by name or dvc.yaml key) and every stage they need, in order; the
    features stage is left out (stand-in tables instead) when only STAND_IN_READERS need it."""
    chosen = {stage.name for stage in stages if {stage.name, stage.group} & selected}
    needed = set(chosen)
    for index in reversed(range(len(stages))):
        if stages[index].name in needed:
            needed |= {other.name for other in stages[:index] if stages[index].needs(other)}
    features = next((stage for stage in stages if stage.group == "features"), None)
    readers = {
        stage.group
        for stage in stages
        if stage.name in needed and features and stage.needs(features)
    }
    stand_in = bool(features and features.name in needed - chosen)
    stand_in = stand_in and readers <= set(STAND_IN_READERS)
    if stand_in and features:
        needed.discard(features.name)
    return Plan([stage for stage in stages if stage.name in needed], stand_in)


# --- a throwaway project per size ----------------------------------------------------------------


def make_project(folder: Path, clips: int, params_text: str) -> Path:
    """`folder` with `params_text` (a params.yaml) set to `clips` synthetic demo clips."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params_text)
    live_services().set_params(
        folder / "params.yaml",
        {"data.source": "demo", "data.demo.clips_per_genre": clips // 10},
    )
    return folder


def write_stand_in_features(project: Path) -> int:
    """Hand-crafted clip and segment tables of the real shape for the manifest's usable clips,
    the features synthetic random numbers (split reads only the keys); returns the clips."""
    from gtzan_mlops.data.splits import feature_dir
    from gtzan_mlops.features.feature_sets import HANDCRAFTED, TABLES
    from gtzan_mlops.features.handcrafted import feature_names, segment_bounds, segment_samples
    from gtzan_mlops.settings.loading import load_settings, resolve_path

    settings = load_settings(project / "params.yaml")
    features = settings.features
    manifest = pd.read_csv(resolve_path(settings.paths.manifest, project), dtype={"track_id": str})
    manifest = manifest[manifest["status"] == "ok"]
    names = list(feature_names(features.n_mfcc))
    rng = np.random.default_rng(0)
    lengths = (manifest["duration_s"] * features.sample_rate).round().astype(int)
    counts = [len(segment_bounds(length, features)) for length in lengths]
    clips = pd.DataFrame({"track_id": manifest["track_id"], "genre": manifest["genre"]})
    clips["length"] = lengths.to_numpy()
    segments = clips.loc[clips.index.repeat(counts)].reset_index(drop=True)
    segments.insert(1, "segment", np.concatenate([np.arange(count) for count in counts]))
    segments["length"] = segment_samples(features)
    folder = feature_dir(settings, project)
    folder.mkdir(parents=True, exist_ok=True)
    for table, level in ((clips, "clip"), (segments, "segment")):
        values = rng.standard_normal((len(table), len(names)))
        table = pd.concat([table, pd.DataFrame(values, columns=names)], axis=1)
        table.to_csv(folder / TABLES[HANDCRAFTED][level], index=False)
    return len(clips)


def reset_engine_state(project: Path) -> None:
    """Empty the features stage's per-clip cache and the Optuna studies, so that the next
    engine's features and train stages do the work again instead of reusing the last ones."""
    from gtzan_mlops.settings.loading import load_settings, resolve_path
    from gtzan_mlops.tracking import OPTUNA_DIR

    settings = load_settings(project / "params.yaml")
    shutil.rmtree(resolve_path(settings.paths.features_cache, project), ignore_errors=True)
    shutil.rmtree(project / OPTUNA_DIR, ignore_errors=True)


# --- one size -----------------------------------------------------------------------------------


def run_size(
    clips: int,
    stages: list[Stage],
    selected: set[str],
    engines: list[str],
    workdir: Path,
    timeout_s: float | None,
    params_text: str,
    results: list[Measurement],
) -> None:
    """Every planned stage at `clips` clips in a new project (deleted afterwards), each stage's
    figures appended to `results` as it ends."""
    chosen = plan(stages, selected)
    folder = Path(tempfile.mkdtemp(prefix=f"growth-{clips}-", dir=workdir))
    project = make_project(folder, clips, params_text)
    print(f"\n{clips} clips in {project}: {', '.join(s.name for s in chosen.stages)}", flush=True)
    broken: list[Stage] = []  # failed, timed out or skipped: their outputs are missing

    def record(result: Measurement) -> None:
        results.append(result)
        print(
            f"  {result.stage:<34} {result.engine:<6} {result.status:<8} {result.wall_s:8.1f} s "
            f"{result.peak_rss_mib:7.0f} MiB  {result.note}",
            flush=True,
        )

    try:
        stand_ins_written = False
        for stage in chosen.stages:
            engine = engines[0] if stage.uses_engine else ANY_ENGINE
            missing = [other.name for other in broken if stage.needs(other)]
            if missing:
                broken.append(stage)
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                note = f"needs {missing[0]}{more}"
                record(Measurement(stage.name, stage.group, engine, clips, "skipped", note=note))
                continue
            stand_in = chosen.stand_in_features and stage.group in STAND_IN_READERS
            if stand_in and not stand_ins_written:
                print(f"  stand-in feature tables for {write_stand_in_features(project)} clips")
                stand_ins_written = True
            result = measure(stage, engine, clips, project, timeout_s)
            if stand_in:
                result.note = result.note or "stand-in feature tables"
            record(result)
            if result.status != "ok":
                broken.append(stage)
        # The later engines: the inputs are there from the first engine's run.
        for engine in engines[1:]:
            reset_engine_state(project)
            for stage in chosen.stages:
                if stage.uses_engine:
                    record(measure(stage, engine, clips, project, timeout_s))
    finally:
        shutil.rmtree(project, ignore_errors=True)


def check_disk(workdir: Path, clips: int) -> None:
    """Stop before a size whose clips would not fit (with a quarter to spare for the rest)."""
    needed = clips * DEMO_CLIP_BYTES * 1.25
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise SystemExit(
            f"{workdir}: {free / 2**30:.1f} GiB free, {clips} clips need about "
            f"{needed / 2**30:.1f} GiB: choose another --workdir or a smaller size"
        )


def machine() -> dict[str, Any]:
    import ray

    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="clips")
    parser.add_argument(
        "--large-size",
        type=int,
        default=10_000,
        help=f"clips for {', '.join(LARGE_STAGES)} (0: none)",
    )
    parser.add_argument(
        "--stages", nargs="+", default=None, help="dvc.yaml stage names or keys (default: all)"
    )
    parser.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local", "ray"])
    parser.add_argument("--output", type=Path, help="write the raw figures to this JSON file")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage")
    args = parser.parse_args()
    sizes = [(size, False) for size in args.sizes]
    if args.large_size:
        sizes.append((args.large_size, True))
    if any(size < 10 or size % 10 for size, _ in sizes):
        raise SystemExit("every size must be a multiple of 10 (the same clips in each genre)")

    params_text = (REPO_ROOT / "params.yaml").read_text()  # one snapshot for every size
    stages = pipeline_stages(yaml.safe_load(params_text))
    known = {stage.name for stage in stages} | {stage.group for stage in stages}
    selected = set(args.stages or known)
    if unknown := selected - known:
        raise SystemExit(f"unknown stages {sorted(unknown)}; dvc.yaml has {sorted(known)}")
    print(f"growth benchmark: {os.cpu_count()} cores, engines {', '.join(args.engines)}")
    started = time.perf_counter()
    results: list[Measurement] = []
    errors: list[str] = []  # a size that could not finish: the others' figures are kept
    try:
        for clips, large in sizes:
            chosen = selected & set(LARGE_STAGES) if large else selected
            if not chosen:
                continue
            check_disk(args.workdir, clips)
            try:
                run_size(
                    clips, stages, chosen, args.engines, args.workdir, args.stage_timeout,
                    params_text, results,
                )  # fmt: skip
            except Exception as error:  # reported; the next size runs
                errors.append(f"{clips} clips: {type(error).__name__}: {error}")
                print(f"  stopped: {errors[-1]}", flush=True)
    finally:  # also after Ctrl-C: what was measured is written and printed
        figures = {
            "command": " ".join(["python", "benchmarks/growth.py", *sys.argv[1:]]),
            "machine": machine(),
            "total_s": time.perf_counter() - started,
            "errors": errors,
            "measurements": [asdict(result) for result in results],
        }
        if args.output:
            args.output.write_text(json.dumps(figures, indent=2) + "\n")
        print_report(figures)


if __name__ == "__main__":
    main()
