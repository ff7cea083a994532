"""The MLflow UI as a user sees it, in headless Chromium: the documented command (`make mlflow-ui`)
serves the project's store; the runs page lists the stage runs with the nested Optuna trials
folded under each training run and, unfolded, right under it; the compare view shows two training
runs' shared metric, each value in its run's column; the registered model's page shows the
`champion` alias. Used by tests/integration/test_pipeline_e2e.py on the store its pipeline made;
screenshots go to test-artifacts/mlflow_ui_*.png."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from live_services import chromium_page, mlflow_server

PAGE_TIMEOUT_MS = 60_000  # a 2-core CI machine renders the React app slowly
# Logged by every training run, and first among their metrics, so the compare view shows it
# without scrolling: rows scrolled into view there were read beside other rows' values.
SHARED_METRIC = "best_valid_accuracy"


def documented_ui_options(repo_root: Path, project: Path) -> list[str]:
    """The options of the README's UI command, `make mlflow-ui`, as make expands them in
    `project` (a dry run), without --host/--port: the test binds a free port itself. Checks that
    the command serves the project's own store and binds 127.0.0.1 only."""
    # -n: print the commands only; -o: the virtualenv counts as installed (not set up here).
    make = ["make", "-f", str(repo_root / "Makefile"), "-n", "-s", "-o", ".venv/.installed"]
    result = subprocess.run(
        [*make, "mlflow-ui"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("mlflow ui")]
    assert len(commands) == 1, f"`make mlflow-ui` should run one `mlflow ui`:\n{result.stdout}"
    argv = shlex.split(commands[0])
    options, values = argv[2:], {}
    for flag in ("--backend-store-uri", "--host", "--port"):
        assert flag in options, f"`make mlflow-ui` lacks {flag}: {commands[0]}"
        values[flag] = options[options.index(flag) + 1]
    assert values["--host"] == "127.0.0.1", commands[0]
    assert values["--backend-store-uri"] == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    for flag in ("--host", "--port"):
        at = options.index(flag)
        del options[at : at + 2]
    return options


def link(page, name: str):
    return page.get_by_role("link", name=name, exact=True)


def run_row(page, name: str):
    """The runs table row of the run called `name`."""
    return page.get_by_role("row").filter(has=link(page, name))


def fold_button(page, name: str):
    """The button that unfolds (or folds) the nested runs of run `name`, beside its name."""
    row = run_row(page, name)
    return row.get_by_role("gridcell").filter(has=link(page, name)).get_by_role("button")


def close_assistant(page) -> None:
    """Fold away the MLflow Assistant side panel (open by default), which hides half the page."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def names_top_to_bottom(page, names: list[str]) -> list[tuple[str, float, float]]:
    """(name, x, y) of each run's name link in the runs table, from top to bottom."""
    placed = []
    for name in names:
        target = link(page, name)
        assert target.count() == 1, f"{name}: {target.count()} links in the runs table"
        box = target.bounding_box()
        assert box is not None, f"{name} is not rendered"
        placed.append((name, box["x"], box["y"]))
    return sorted(placed, key=lambda item: item[2])


def metric_row_values(page, metric: str) -> list[dict]:
    """The compare view's values of `metric`: the cells on the metric name's line, right of it,
    left to right (text, left: where each starts)."""
    label = page.get_by_role("link", name=metric, exact=True)
    label.scroll_into_view_if_needed()
    box = label.bounding_box()
    assert box is not None, f"{metric} is not rendered in the compare view"
    centre = box["y"] + box["height"] / 2
    cells = page.locator("[role=grid] [role=rowgroup] > div").evaluate_all(
        """cells => cells.map(cell => {
            const r = cell.getBoundingClientRect();
            return {text: cell.innerText.trim(), top: r.top, bottom: r.bottom, left: r.left};
        })"""
    )
    return [
        cell
        for cell in sorted(cells, key=lambda cell: cell["left"])
        if cell["top"] <= centre <= cell["bottom"] and cell["left"] > box["x"] + box["width"]
    ]


@dataclass(frozen=True)
class Expected:
    """What the UI must show, read from the stages' outputs and the store (not from the UI)."""

    experiment: str
    split_label: str
    parents: dict[str, str]  # family -> its training run's name
    trials: dict[str, list[str]]  # family -> names of its nested trial runs
    shared: dict[str, float]  # family -> SHARED_METRIC of its training run
    model_name: str
    champion: str  # the version the alias points at

    @property
    def families(self) -> list[str]:
        return list(self.parents)

    @classmethod
    def of(cls, project: Path, families: list[str]) -> Expected:
        """From the train records of two of the project's families on the hand-crafted features,
        and the MLflow store those records name."""
        import mlflow

        records = {
            family: json.loads((project / "data/train" / f"{family}-handcrafted.json").read_text())
            for family in families
        }
        split_label = records[families[0]]["split"]["label"]
        client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
        params = yaml.safe_load((project / "params.yaml").read_text())
        model_name = params["promote"]["model_name"]
        trials = {}
        for family in families:
            parent = records[family]["run_id"]
            nested = client.search_runs(
                [client.get_run(parent).info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            )
            trials[family] = sorted(run.data.tags["mlflow.runName"] for run in nested)
            assert trials[family], f"{family}: its training run has no nested trial runs"
        return cls(
            experiment=params["mlflow"]["experiment_name"],
            split_label=split_label,
            parents={
                family: f"train-{family} [handcrafted features, {split_label} split]"
                for family in families
            },
            trials=trials,
            shared={
                family: client.get_run(records[family]["run_id"]).data.metrics[SHARED_METRIC]
                for family in families
            },
            model_name=model_name,
            champion=client.get_model_version_by_alias(model_name, "champion").version,
        )


def check_runs_page(page, url: str, expected: Expected, shots: dict[str, Path]) -> None:
    """Home -> the experiment -> its training runs: the stage runs are listed with their
    trials folded; unfolded, each training run has its trials, and only those, right under it,
    indented."""
    parents, trials, families = expected.parents, expected.trials, expected.families
    page.goto(f"{url}/")
    link(page, expected.experiment).click()
    link(page, "Training runs").click()
    close_assistant(page)
    link(page, parents[families[0]]).wait_for()
    for name in parents.values():
        assert link(page, name).is_visible(), f"stage run {name} is not listed"
    # An evaluate run per pipeline run on that split (a store may hold several): the latest.
    assert link(page, f"evaluate [{expected.split_label}]").first.is_visible(), "no evaluate run"
    for family in families:
        assert link(page, trials[family][0]).count() == 0, "trials should be folded"
    page.screenshot(path=shots["runs"])

    for family in families:
        fold_button(page, parents[family]).click()
        link(page, trials[family][-1]).wait_for()
    names = [name for family in families for name in (parents[family], *trials[family])]
    order = names_top_to_bottom(page, names)
    page.screenshot(path=shots["nested"])
    for family in families:
        at = [name for name, _, _ in order].index(parents[family])
        parent_x = order[at][1]
        below = order[at + 1 : at + 1 + len(trials[family])]
        assert sorted(name for name, _, _ in below) == trials[family], (
            f"the rows under {parents[family]} are {below}"
        )
        assert all(x > parent_x for _, x, _ in below), "trials are not indented"


def check_compare_view(page, expected: Expected, shots: dict[str, Path]) -> None:
    """On the runs page: select both training runs, compare them; the compare view shows the
    shared metric with each run's own value in its column."""
    parents, families = expected.parents, expected.families
    # Folded again first: selecting an unfolded run selects its trials too.
    for family in families:
        fold_button(page, parents[family]).click()
        link(page, expected.trials[family][-1]).wait_for(state="detached")
    for family in families:
        run_row(page, parents[family]).get_by_role("checkbox").first.check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("Comparing 2 Runs").wait_for()
    columns = {}  # where each run's column starts: its name in the run details
    for family in families:
        name = page.get_by_text(parents[family], exact=True)
        assert name.count() == 1 and name.is_visible(), f"{parents[family]} is not compared"
        columns[family] = name.bounding_box()["x"]
    # The plots and the parameters folded away: names and metrics on one screenshot.
    for section in ("Visualizations", "Parameters"):
        page.get_by_text(section, exact=True).click()
    values = metric_row_values(page, SHARED_METRIC)
    page.screenshot(path=shots["compare"])
    assert len(values) == 2, f"{SHARED_METRIC} values in the compare view: {values}"
    for family in families:
        # The value in this run's column: the cell starting nearest to its name.
        cell = min(values, key=lambda cell: abs(cell["left"] - columns[family]))
        assert abs(cell["left"] - columns[family]) < 40, (values, columns)
        logged = expected.shared[family]
        assert math.isclose(float(cell["text"]), logged, rel_tol=1e-2, abs_tol=1e-3), (
            f"{parents[family]}: {SHARED_METRIC} shown as {cell['text']}, logged {logged}"
        )


def check_model_page(page, url: str, expected: Expected, shots: dict[str, Path]) -> None:
    """The registered model's page: the champion version's Aliases cell is `@ champion`."""
    page.goto(f"{url}/#/models/{expected.model_name}")
    version = page.get_by_role("row").filter(has=link(page, f"Version {expected.champion}"))
    version.wait_for()
    headers = page.get_by_role("columnheader").all_inner_texts()
    cells = version.get_by_role("cell").all_inner_texts()
    page.screenshot(path=shots["model"])
    aliases = cells[headers.index("Aliases")].replace("\xa0", " ")
    assert aliases == "@ champion", f"version {expected.champion} aliases: {aliases!r}"


def check_ui(page, url: str, expected: Expected, artifacts_dir: Path) -> None:
    """The four checks, each with its screenshot; a failure leaves mlflow_ui_failure.png."""
    shots = {
        name: artifacts_dir / f"mlflow_ui_{name}.png"
        for name in ("runs", "nested", "compare", "model", "failure")
    }
    for shot in shots.values():
        shot.unlink(missing_ok=True)
    # Onboarding pop-overs ("Detect Issues in Your Traces ... Got it") come and go on their own
    # and block clicks while shown: dismissed whenever one is in the way.
    page.add_locator_handler(
        page.get_by_role("button", name="Got it", exact=True), lambda button: button.click()
    )
    try:
        check_runs_page(page, url, expected, shots)
        check_compare_view(page, expected, shots)
        check_model_page(page, url, expected, shots)
    except BaseException:
        page.screenshot(path=shots["failure"])
        raise
    for name in ("runs", "nested", "compare", "model"):
        assert shots[name].stat().st_size > 10_000, f"{shots[name]} looks empty"


def show_ui(
    repo_root: Path,
    project: Path,
    env: dict[str, str],
    tmp_path: Path,
    artifacts_dir: Path,
    families: list[str],
) -> None:
    """`make mlflow-ui`'s command on `project`'s store, checked in headless Chromium: the training
    runs of `families` (two, each with its nested trials), their comparison and the champion."""
    expected = Expected.of(project, families)
    options = documented_ui_options(repo_root, project)
    with (
        chromium_page(tmp_path, PAGE_TIMEOUT_MS) as page,
        mlflow_server("ui", options, tmp_path / "mlflow-ui.log", env=env) as url,
    ):
        check_ui(page, url, expected, artifacts_dir)
