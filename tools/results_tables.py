"""Write the results tables of the README and the docs from the committed reports they quote.

A generated table sits between two comment lines that name its source, a committed report a
stage wrote from its metrics (the evaluate stage's `models.md`, the report command's
`reproduction.md`):

    <!-- table from docs/results/gtzan_mini/models.md (tools/results_tables.py) -->
    | model | ... |
    <!-- end of table -->

The block receives the first Markdown table of its source. Typing a number into the block by hand
is undone by the next run; `--check` (run by tests/code/test_results_tables.py) lists the blocks
that differ from their source and exits 1, so a report committed without its tables, or a table
edited by hand, fails the tests.

    python tools/results_tables.py            # rewrite the blocks
    python tools/results_tables.py --check    # exit 1 if any block has drifted
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/results.md")  # the files holding generated tables
END = "<!-- end of table -->"
BLOCK = re.compile(
    r"^<!-- table from (?P<source>\S+) \(tools/results_tables\.py\) -->\n"
    r"(?P<body>.*?)"
    r"^" + re.escape(END) + "$",
    re.MULTILINE | re.DOTALL,
)


class TableError(Exception):
    """A block whose source is missing or holds no table."""


def first_table(source: Path) -> str:
    """The first Markdown table of `source` (its consecutive lines starting with '|')."""
    if not source.is_file():
        raise TableError(f"{source}: no such file")
    lines = source.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise TableError(f"{source}: holds no Markdown table")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def render(document: Path, root: Path) -> str:
    """`document`'s text with every block's body replaced by its source's table."""
    text = document.read_text(encoding="utf-8")

    def replace(match: re.Match[str]) -> str:
        try:
            table = first_table(root / match["source"])
        except TableError as error:
            raise TableError(f"{document}: the table block quotes {error}") from None
        opening = match[0].split("\n", 1)[0]
        return f"{opening}\n{table}{END}"

    return BLOCK.sub(replace, text)


def drifted(root: Path = REPO_ROOT, documents: tuple[str, ...] = DOCUMENTS) -> list[str]:
    """The documents whose generated tables differ from their sources."""
    return [name for name in documents if render(root / name, root) != (root / name).read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    args = parser.parse_args()
    try:
        stale = drifted()
        if args.check:
            for name in stale:
                print(f"{name}: a results table differs from its source; run {__file__}")
            return 1 if stale else 0
        for name in stale:
            (REPO_ROOT / name).write_text(render(REPO_ROOT / name, REPO_ROOT), encoding="utf-8")
            print(f"{name}: tables rewritten")
        return 0
    except TableError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
