"""Rewrite the `src/` deps of every dvc.yaml stage from the code: the stage's own module and the
files of the compute sub-packages it imports (gtzan_mlops.tracking.compute_closure).

    .venv/bin/python tools/stage_deps.py

tests/code/test_code_shape.py fails when dvc.yaml and the code disagree; this writes the list
that test expects, keeping every comment and every other line of dvc.yaml as it is.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gtzan_mlops import cli, tracking

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
SRC_DEP = re.compile(r"^      - src/")


def stage_dependencies(command: str) -> list[str]:
    """dvc.yaml's src deps of a stage running `gtzan-mlops <command>`."""
    module = cli.COMMANDS[command][0].removeprefix("gtzan_mlops.")
    loaded = cli.LOADED_BY_PATH.get(command, ())
    return [f"src/gtzan_mlops/{file}" for file in tracking.compute_closure(module, *loaded)]


def rewrite(text: str) -> str:
    lines, out, command = text.split("\n"), [], None
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := re.match(r"^    cmd: gtzan-mlops (\w+)", line):
            command = match[1]
        if SRC_DEP.match(line) and command is not None:
            while index < len(lines) and SRC_DEP.match(lines[index]):
                index += 1
            out += [f"      - {dep}" for dep in stage_dependencies(command)]
            continue
        out.append(line)
        index += 1
    return "\n".join(out)


def main() -> int:
    before = DVC_YAML.read_text(encoding="utf-8")
    after = rewrite(before)
    DVC_YAML.write_text(after, encoding="utf-8")
    print("dvc.yaml: src deps " + ("rewritten" if after != before else "already match the code"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
