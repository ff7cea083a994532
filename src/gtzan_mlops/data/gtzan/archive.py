"""GTZAN's archive, genres.tar.gz: resumable, retried download from the mirrors, md5 check, and
extraction that refuses members writing outside the target folder, links and devices."""

from __future__ import annotations

import logging
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath

import requests
import urllib3
from tqdm import tqdm

from gtzan_mlops.console import progress_off
from gtzan_mlops.data.audio import AUDIO_EXTENSIONS
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import GtzanSource
from gtzan_mlops.tracking import file_digest

log = logging.getLogger(__name__)

ARCHIVE_NAME = "genres.tar.gz"  # the official archive's name, kept under this name in the cache
_CHUNK_BYTES = 1 << 20


class FetchError(RuntimeError):
    """The stage as a whole cannot produce the audio (download, checksum or archive failure)."""


class DownloadError(FetchError):
    """No mirror delivered the archive; the message lists each mirror and why."""


class ChecksumError(FetchError):
    """A file's md5 differs from the expected one."""


class UnsafeArchiveError(FetchError):
    """An archive member would write outside the target folder, or is a link or device."""


def verify_md5(path: Path, expected: str, label: str | None = None) -> None:
    """Raise ChecksumError naming `label` (default: the path) unless the md5 matches."""
    actual = file_digest(path, "md5")
    if actual != expected.lower():
        raise ChecksumError(f"{label or path}: md5 mismatch: expected {expected}, got {actual}")


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` would be unsafe, or None."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or PurePosixPath(name).is_absolute() or name[1:3] == ":/":
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path contains '..'"
    if member.issym() or member.islnk():
        return f"link to '{member.linkname}'"
    if member.isdev():
        return "device or FIFO"
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder"
    return None


def audio_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The archive's audio files under `genres/<genre>/`, after checking EVERY member is safe.

    Raises UnsafeArchiveError naming the first absolute, `..`, link or device member, before
    anything is extracted. Other files (the real archive's `.mf` lists) are left out.
    """
    selected = []
    try:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise FetchError(f"{archive}: not a readable tar archive ({error})") from error
    for member in members:
        problem = _member_problem(member)
        if problem:
            raise UnsafeArchiveError(
                f"{archive}: unsafe member '{member.name}' ({problem}); nothing was extracted"
            )
        parts = [part for part in PurePosixPath(member.name).parts if part != "."]
        if (
            member.isfile()
            and len(parts) == 3
            and parts[0] == "genres"
            and not parts[2].startswith(".")
            and PurePosixPath(parts[2]).suffix.lower() in AUDIO_EXTENSIONS
        ):
            selected.append(member)
    return selected


def extract_genres_archive(archive: Path, raw_dir: Path) -> int:
    """Extract the audio of a genres.tar.gz into `raw_dir/genres/<genre>/`; returns the count."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = audio_members(tar, archive)
            if not members:
                raise FetchError(f"{archive}: no audio files under genres/<genre>/ in it")
            # filter="data" is a second guard: tarfile itself refuses anything unsafe.
            tar.extractall(raw_dir, members=members, filter="data")
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(f"{archive}: unsafe member ({error})") from error
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise FetchError(f"{archive}: not a readable tar archive ({error})") from error
    log.info("extracted %d audio files from %s", len(members), archive)
    return len(members)


class _AttemptFailed(Exception):
    """One download attempt broke off in a way worth retrying (dropped, short, timed out, 5xx)."""


class _MirrorRefused(Exception):
    """The mirror answered with a client error (e.g. 404): retrying it cannot help."""


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes <start>-<end>/<total>` header."""
    if not header or not header.startswith("bytes "):
        return None
    first = header[len("bytes ") :].split("-", 1)[0]
    return int(first) if first.isdigit() else None


def _reason(error: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error in a few words ("timed out", "[Errno
    111] Connection refused"), not the nested reprs of every wrapper."""
    while True:
        nested = getattr(error, "reason", None)
        if not isinstance(nested, BaseException):
            nested = error.__cause__ or next(
                (arg for arg in error.args if isinstance(arg, BaseException)), None
            )
        if nested is None:
            break
        error = nested
    if isinstance(error, TimeoutError | urllib3.exceptions.TimeoutError | requests.Timeout):
        return "timed out"
    return str(error) or type(error).__name__


def _transfer(url: str, part: Path, timeout_s: float, show_progress: bool) -> None:
    """One attempt: append to `part` from where it ends (HTTP Range), or restart it on a 200."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        status = response.status_code
        if status == 416 and have:
            # The range starts at or past the end: complete already, or a stale longer .part.
            total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            part.unlink()
            raise _AttemptFailed(f"server refused to resume at byte {have} (HTTP 416)")
        if status >= 400:
            reason = f"HTTP {status} {response.reason}"
            if status < 500 and status not in (408, 429):
                raise _MirrorRefused(reason)
            raise _AttemptFailed(reason)
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _AttemptFailed(f"server resumed at byte {start}, not {have}; restarting")
            log.info("%s: resuming at byte %d (HTTP 206 Partial Content)", url, have)
            mode = "ab"
        else:
            if have:
                log.info("%s: server sent the whole file (HTTP %d); restarting at 0", url, status)
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length", "")
        expected_total = have + int(length) if length.isdigit() else None
        received = have
        progress = tqdm(
            total=expected_total,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=part.name.removesuffix(".part"),
            disable=progress_off(show_progress),
        )
        with open(part, mode) as handle, progress:
            try:
                # Raw bytes: a server labelling the .tar.gz `Content-Encoding: gzip` must not
                # have it unzipped on the way. read1 hands over what has arrived, so bytes
                # received before a timeout are written, not lost with a half-full buffer.
                while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=False):
                    handle.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
            except (urllib3.exceptions.HTTPError, requests.RequestException) as error:
                raise _AttemptFailed(
                    f"transfer broke off after {received} of {expected_total or '?'} bytes "
                    f"({_reason(error)})"
                ) from error
    if expected_total is not None and received < expected_total:
        raise _AttemptFailed(f"connection closed after {received} of {expected_total} bytes")


def download_file(
    url: str,
    target: Path,
    expected_md5: str,
    retries: int,
    timeout_s: float,
    retry_backoff_s: float,
    show_progress: bool = True,
) -> Path:
    """Download `url` to `target` through `<target>.part`, renamed only once its md5 matches.

    A broken transfer (dropped connection, short read, timeout, server error) is retried up to
    `retries` times, waiting `retry_backoff_s`, then twice as long each time, and resumes where
    it stopped when the server honours the Range header (206). A .part left by an interrupted
    run is resumed the same way. Raises DownloadError, or ChecksumError (the .part deleted).
    """
    part = target.with_name(f"{target.name}.part")
    errors: list[str] = []
    for attempt in range(retries + 1):
        if attempt:
            delay = retry_backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s: %s; retry %d of %d in %.2g s", url, errors[-1], attempt, retries, delay
            )
            time.sleep(delay)
        try:
            _transfer(url, part, timeout_s, show_progress)
            break
        except _MirrorRefused as error:
            raise DownloadError(f"{url}: {error}") from error
        except _AttemptFailed as error:
            errors.append(str(error))
        except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
            errors.append(_reason(error))
    else:
        raise DownloadError(f"{url}: failed after {retries + 1} attempts; last: {errors[-1]}")
    try:
        verify_md5(part, expected_md5, label=url)
    except ChecksumError:
        part.unlink()
        raise
    part.replace(target)
    log.info("downloaded %s to %s (md5 verified)", url, target)
    return target


def download_archive(gtzan: GtzanSource, root: Path, show_progress: bool) -> Path:
    """`genres.tar.gz` in `data.gtzan.download_dir`: the cached copy if its md5 matches, else
    downloaded from the first mirror that delivers it intact."""
    download_dir = resolve_path(gtzan.download_dir, root)
    target = download_dir / ARCHIVE_NAME
    if target.is_file():
        try:
            verify_md5(target, gtzan.md5)
            log.info("using the downloaded archive %s (md5 verified)", target)
            return target
        except ChecksumError as error:
            log.warning("%s; downloading it again", error)
            target.unlink()
    if not gtzan.mirrors:
        raise ConfigError("params.yaml: data.gtzan.mirrors is empty: nowhere to download from")
    download_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in gtzan.mirrors:
        try:
            return download_file(
                url,
                target,
                gtzan.md5,
                gtzan.retries,
                gtzan.timeout_s,
                gtzan.retry_backoff_s,
                show_progress,
            )
        except FetchError as error:
            log.warning("%s", error)
            failures.append(f"  {error}")
    raise DownloadError(
        f"could not download {ARCHIVE_NAME} from any mirror:\n" + "\n".join(failures)
    )
