"""A request's songs, checked cheaply before any is decoded: the table, each row's source (base64
bytes, or a path inside the server's `audio_root` and nowhere else), its size and its header."""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from gtzan_mlops.data.audio import AudioHeader, probe_audio
from gtzan_mlops.serving.limits import decode_limits
from gtzan_mlops.serving.spec import BASE64_COLUMN, INPUT_COLUMNS, PATH_COLUMN
from gtzan_mlops.settings.schema import ServedConfig

_PATH_REFUSAL = (
    f"{PATH_COLUMN}: no readable regular audio file at this path under the server's audio folder"
)


@dataclass
class Row:
    """One request row after the cheap checks: how to open its audio and what it declares."""

    name: str
    open: Callable[[], BinaryIO]
    header: AudioHeader


def request_rows(model_input: Any, config: ServedConfig) -> list[dict[str, Any]]:
    """The rows of a request (one song each, a dict of INPUT_COLUMNS) once the table is within
    the limits; ValueError with the reason otherwise."""
    if not isinstance(model_input, pd.DataFrame):
        raise ValueError(
            f"expected a table with a column {PATH_COLUMN} or {BASE64_COLUMN}, got "
            f"{type(model_input).__name__}"
        )
    if not set(INPUT_COLUMNS) & set(model_input.columns):
        raise ValueError(
            f"the input has no {PATH_COLUMN} or {BASE64_COLUMN} column (one of them per row, "
            "one row per song)"
        )
    if model_input.empty:
        raise ValueError("the input holds no songs (0 rows)")
    if len(model_input) > config.max_rows:
        raise ValueError(
            f"{len(model_input)} rows exceed the limit of {config.max_rows} songs per request"
        )
    if BASE64_COLUMN in model_input.columns:
        encoded = model_input[BASE64_COLUMN].map(lambda v: len(v) if isinstance(v, str) else 0)
        total_mib = int(encoded.sum()) * 3 / 4 / 2**20
        if total_mib > config.max_request_mib:
            raise ValueError(
                f"the request's audio, about {total_mib:.1f} MiB, exceeds the limit of "
                f"{config.max_request_mib:g} MiB per request"
            )
    return model_input.reindex(columns=list(INPUT_COLUMNS)).to_dict("records")


def check_row(row: dict[str, Any], index: int, config: ServedConfig, segment_seconds: float) -> Row:
    """The cheap checks of one row: its source, size and header, before any decoding; a
    ValueError (or AudioError) names the row's file and the problem."""
    max_bytes = int(config.max_upload_mib * 2**20)
    path, encoded = row.get(PATH_COLUMN), row.get(BASE64_COLUMN)
    has_path, has_bytes = _present(path), _present(encoded)
    if has_path == has_bytes:
        raise ValueError(
            f"give exactly one of {PATH_COLUMN} or {BASE64_COLUMN} "
            f"({'both' if has_path else 'neither'} given)"
        )
    if has_path:
        if not config.allow_audio_path or config.audio_root is None:
            raise ValueError(
                f"{PATH_COLUMN} is switched off on this server; send the file as {BASE64_COLUMN}"
            )
        if not isinstance(path, str):
            raise ValueError(f"{PATH_COLUMN} must be a string")
        name, root = path, config.audio_root  # the client's own words, never the real path

        def opener() -> BinaryIO:
            try:
                return open_under_root(path, root, max_bytes)
            except ValueError as error:
                refusal = str(error) == _PATH_REFUSAL
                raise ValueError(str(error) if refusal else f"{path}: {error}") from None
    else:
        name = f"{BASE64_COLUMN}[{index}]"
        try:
            data = decode_base64_audio(encoded, max_bytes)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None

        def opener() -> BinaryIO:
            return io.BytesIO(data)

    with opener() as handle:
        header = probe_audio(handle, name, decode_limits(config))
    shortest = max(config.min_duration_s, segment_seconds)
    if header.duration_s < shortest:
        raise ValueError(
            f"{name}: {header.duration_s:.2f} s of audio is shorter than "
            + (
                f"one {segment_seconds:g} s segment"
                if shortest == segment_seconds
                else f"min_duration_s {config.min_duration_s:g} s"
            )
        )
    return Row(name, opener, header)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def decode_base64_audio(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string (line breaks and a `data:...;base64,` prefix allowed)."""
    if not isinstance(text, str):
        raise ValueError(f"{BASE64_COLUMN} must be a string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    compact = "".join(text.split())
    # Checked before decoding, so an oversized body is refused without a second copy in memory.
    if len(compact) * 3 // 4 > max_bytes:
        raise ValueError(
            f"upload of about {len(compact) * 3 / 4 / 2**20:.1f} MiB exceeds the limit of "
            f"{max_bytes / 2**20:g} MiB"
        )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{BASE64_COLUMN} is not valid base64 ({error})") from error


def open_under_root(text: str, root: str, max_bytes: int) -> BinaryIO:
    """An open file of `text` (absolute, or relative to `root`) if its real path, symlinks
    resolved, is a regular file under `root`; else ValueError with one message for every
    refusal (missing, outside, unreadable, not a regular file), so that nothing outside the
    root can be probed. No `~` expansion. Files larger than `max_bytes` are refused too."""
    base = Path(os.path.realpath(root))
    try:
        real = Path(os.path.realpath(base / text, strict=True))
        if not real.is_relative_to(base):
            raise ValueError(_PATH_REFUSAL)
        # O_NONBLOCK: a FIFO swapped in after the check must not hang the open; O_NOFOLLOW: nor
        # may a symlink.
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except (OSError, ValueError):
        raise ValueError(_PATH_REFUSAL) from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise ValueError(_PATH_REFUSAL)
    if info.st_size > max_bytes:
        os.close(descriptor)
        raise ValueError(
            f"file of {info.st_size / 2**20:.1f} MiB exceeds the limit of {max_bytes / 2**20:g} MiB"
        )
    return os.fdopen(descriptor, "rb")
