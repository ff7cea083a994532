"""What the package prints into a log that is not a terminal: no progress-bar frames."""

from __future__ import annotations

import os
import subprocess
import sys

DOWNLOAD = """
import gtzan_mlops  # sets the defaults, as every command does first
import mlflow, pathlib, sys
folder = pathlib.Path(sys.argv[1])
mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
experiment = mlflow.create_experiment("quiet", artifact_location=(folder / "artifacts").as_uri())
(folder / "a.txt").write_text("x" * 1000)
with mlflow.start_run(experiment_id=experiment) as run:
    mlflow.log_artifact(str(folder / "a.txt"))
mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(folder / "out"))
print(os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"])
""".replace("import mlflow", "import os, mlflow")


def test_mlflow_downloads_draw_no_progress_bar_into_a_log(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    assert result.stdout.strip() == "false"
    assert "Downloading artifacts" not in result.stderr, result.stderr[-500:]
    assert (tmp_path / "out" / "a.txt").is_file()
