"""The tables of the growth benchmark (benchmarks/growth.py), from its raw figures.

1. measurements: per stage, engine and size the wall time, the peak memory (summed RSS of the
   stage's process tree) and the wall time per clip;
2. fits, per stage and engine over the sizes measured: least squares time = a + b * clips, its
   R^2, the exponent of a log-log fit over all sizes and the one between the two largest sizes
   (linear growth: ~1; a fixed start-up cost pulls both below 1 at small sizes, growth faster
   than linear shows as an exponent above 1 between the largest sizes), and the memory's slope;
3. the projection for FMA at full size (FMA_TRACKS tracks) on N nodes like this machine, from
   each fit: a + b * tracks for a stage that runs on one machine, a + b * tracks / N for the
   features stage spread over a Ray cluster.

The train stages are one row each in the measurements; the fits and the projection sum each
dvc.yaml matrix (train@*, train_candidates@*) into one row.

    python benchmarks/growth_report.py growth.json
    python benchmarks/growth_report.py growth-100.json growth-1000.json   # parts of one run
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from gtzan_mlops.reports.markdown import table

ANY_ENGINE = "any"  # a stage resources.engine does not change, measured once
FMA_TRACKS = 106_574  # FMA's full set (fma_full untrimmed; fma_large the same tracks as 30 s clips)
NODE_COUNTS = (1, 4, 16)
SPREAD_GROUPS = ("features",)  # stages whose clips the Ray engine spreads over the nodes
MATRIX_GROUPS = ("train", "train_candidates")  # summed into one row in the fits


def markdown(header: list[str], rows: list[list[Any]], align: str) -> str:
    return "\n".join(table(header, rows, align))


def duration(seconds: float) -> str:
    """Seconds, minutes or hours, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measurements_table(measurements: list[dict[str, Any]]) -> str:
    """A row per run; `other` is how many cores other work on the machine kept busy on average
    while the stage ran (it slows the stage down)."""
    rows = []
    for m in measurements:
        note = m["note"] if m["status"] == "ok" else f"{m['status'].upper()}: {m['note']}"
        if m["status"] == "skipped":
            rows.append([m["stage"], m["engine"], m["clips"], "", "", "", "", note])
            continue
        rows.append(
            [
                m["stage"], m["engine"], m["clips"], f"{m['wall_s']:.1f}",
                f"{m['peak_rss_mib']:.0f}", f"{m['wall_s'] / m['clips']:.3f}",
                f"{m['other_cores']:.1f}", note,
            ]
        )  # fmt: skip
    header = ["stage", "engine", "clips", "wall s", "peak MiB", "s per clip", "other", "note"]
    return markdown(header, rows, "llrrrrr")


def series(measurements: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict]]:
    """(row name, engine) -> clips -> {wall_s, peak_rss_mib} of the successful runs; a dvc.yaml
    matrix summed into one row per size (only where every one of its stages succeeded)."""
    rows: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    matrix: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for m in measurements:
        if m["group"] in MATRIX_GROUPS:
            matrix[(m["group"], m["engine"], m["clips"])].append(m)
        elif m["status"] == "ok":
            rows[(m["stage"], m["engine"])][m["clips"]] = m
    for (group, engine, clips), members in matrix.items():
        if all(m["status"] == "ok" for m in members):
            name = f"{group}@* ({len(members)} stage{'s' * (len(members) > 1)})"
            rows[(name, engine)][clips] = {
                "wall_s": sum(m["wall_s"] for m in members),
                "peak_rss_mib": max(m["peak_rss_mib"] for m in members),
            }
    return rows


def fit(points: dict[int, dict]) -> dict[str, float] | None:
    """Least squares time = a + b * clips (and memory), R^2, log-log exponents; None under two
    sizes."""
    if len(points) < 2:
        return None
    clips = np.array(sorted(points), dtype=float)
    seconds = np.array([points[int(n)]["wall_s"] for n in clips])
    memory = np.array([points[int(n)]["peak_rss_mib"] for n in clips])
    slope, intercept = np.polyfit(clips, seconds, 1)
    residual = float(np.sum((seconds - (intercept + slope * clips)) ** 2))
    total = float(np.sum((seconds - seconds.mean()) ** 2))
    exponent = float(np.polyfit(np.log(clips), np.log(seconds), 1)[0])
    last = math.log(seconds[-1] / seconds[-2]) / math.log(clips[-1] / clips[-2])
    memory_slope, memory_intercept = np.polyfit(clips, memory, 1)
    return {
        "sizes": len(clips),
        "a": float(intercept),
        "b": float(slope),
        "r2": 1 - residual / total if len(clips) > 2 and total > 0 else math.nan,
        "exponent": exponent,
        "last_exponent": last,
        "mib_a": float(memory_intercept),
        "mib_b": float(memory_slope),
        "mib_max": float(memory.max()),
        "clips": [int(n) for n in clips],
    }


def fits(measurements: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    found = {key: fit(points) for key, points in series(measurements).items()}
    return {key: value for key, value in found.items() if value is not None}


def fits_table(found: dict[tuple[str, str], dict[str, float]]) -> str:
    rows = [
        [
            name, engine, "/".join(map(str, f["clips"])), f"{f['a']:.1f}", f"{f['b']:.4f}",
            "n/a (2 sizes)" if math.isnan(f["r2"]) else f"{f['r2']:.4f}",
            f"{f['exponent']:.2f}", f"{f['last_exponent']:.2f}", f"{f['mib_b'] * 1000:.0f}",
        ]
        for (name, engine), f in found.items()
    ]  # fmt: skip
    header = [
        "stage", "engine", "clips", "a (s)", "b (s per clip)", "R^2", "exponent (all sizes)",
        "exponent (two largest)", "MiB per 1,000 clips",
    ]  # fmt: skip
    return markdown(header, rows, "llrrrrrrr")


def projection(found: dict[tuple[str, str], dict[str, float]], cores: int) -> str:
    """The FMA table: per stage its engine's fit (ray's where measured), the time on each of
    NODE_COUNTS nodes, the peak memory of a node."""
    by_name: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (name, engine), f in found.items():
        by_name[name][engine] = f
    rows, totals = [], dict.fromkeys(NODE_COUNTS, 0.0)
    for name, engines in by_name.items():
        spread = name in SPREAD_GROUPS
        engine = "ray" if "ray" in engines else next(iter(engines))
        f = engines[engine]
        if spread and engine != "ray":
            note = f"spread over the nodes by Ray; from the {engine} engine's per-clip cost"
        elif spread:
            note = "spread over the nodes by Ray"
        elif name.split("@")[0] in MATRIX_GROUPS:
            note = "not by clips: trials, each on all the data, in resources.train.workers tasks"
        else:
            note = "runs on one machine"
        if f["b"] <= 0:
            note += "; no growth measured: its fixed cost"
        # A slope below 0 is noise around a fixed cost, not a stage that gets faster.
        per_clip, mib_per_clip = max(f["b"], 0.0), max(f["mib_b"], 0.0)
        times = {n: f["a"] + per_clip * FMA_TRACKS / (n if spread else 1) for n in NODE_COUNTS}
        nodes = NODE_COUNTS[-1] if spread else 1
        memory = max(f["mib_a"] + mib_per_clip * FMA_TRACKS / nodes, f["mib_max"])
        for n in NODE_COUNTS:
            totals[n] += times[n]
        rows.append(
            [name, engine, *(duration(times[n]) for n in NODE_COUNTS), f"{memory:,.0f}", note]
        )
    rows.append(["total", "", *(duration(totals[n]) for n in NODE_COUNTS), "", "in sequence"])
    header = [
        "stage", "fit of", *(f"{n} node{'s' * (n > 1)} ({n * cores} cores)" for n in NODE_COUNTS),
        f"peak MiB (a node of {NODE_COUNTS[-1]} for spread stages)", "how it scales",
    ]  # fmt: skip
    return markdown(header, rows, "llrrrr")


def print_report(figures: dict[str, Any]) -> None:
    """The three tables of a run's figures, as Markdown."""
    measurements, machine = figures["measurements"], figures["machine"]
    print(f"\n`{figures['command']}`\n")
    print(f"{machine['cores']} cores, {machine['memory_gib']} GiB, Python {machine['python']},")
    print(f"Ray {machine['ray']}; {duration(figures['total_s'])} in all. Engine `{ANY_ENGINE}`:")
    print("a stage resources.engine does not change, run once.")
    others = [m["other_cores"] for m in measurements if m["status"] != "skipped"]
    if others:
        print(
            f"Column `other`: cores kept busy by other work meanwhile ({max(others):.1f} at most)."
        )
    print()
    for error in figures.get("errors", []):
        print(f"STOPPED at {error}\n")
    print(measurements_table(measurements))
    found = fits(measurements)
    fitted = {name for name, _ in found}
    unfitted = list(dict.fromkeys(name for name, _ in series(measurements) if name not in fitted))
    if unfitted:
        print(f"\nNot fitted (fewer than two sizes succeeded): {', '.join(unfitted)}.")
    if not found:
        return
    print("\nFit of wall time against clips, time = a + b * clips (least squares):\n")
    print(fits_table(found))
    table = projection(found, machine["cores"])
    print(f"\nProjection for FMA at full size, {FMA_TRACKS:,} tracks as 30 s clips, a + b * tracks")
    print("(spread stages: a + b * tracks / nodes), on nodes like this machine:\n")
    print(table)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures from the JSON of several `growth.py` runs on one machine (a long run
    split by size, each part written when it ends): their commands joined, times summed."""
    machines = {json.dumps(part["machine"], sort_keys=True) for part in parts}
    if len(machines) > 1:
        raise SystemExit("the parts were measured on different machines: report them apart")
    return {
        "command": "`; `".join(part["command"] for part in parts),
        "machine": parts[0]["machine"],
        "total_s": sum(part["total_s"] for part in parts),
        "errors": [error for part in parts for error in part.get("errors", [])],
        "measurements": [m for part in parts for m in part["measurements"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "figures", type=Path, nargs="+", help="the JSON of `growth.py --output` (one or more runs)"
    )
    parts = [json.loads(path.read_text()) for path in parser.parse_args().figures]
    print_report(merge(parts))


if __name__ == "__main__":
    main()
