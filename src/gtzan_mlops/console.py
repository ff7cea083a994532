"""What the commands draw on the terminal, and only there."""

from __future__ import annotations


def progress_off(show_progress: bool) -> bool | None:
    """tqdm's `disable`: None draws bars on a terminal only, never into a log (dvc repro's)."""
    return None if show_progress else True
