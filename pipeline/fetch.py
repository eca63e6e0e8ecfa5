"""Download a GroupLens MovieLens archive, verify its published MD5 and extract it safely.

The archive ``NAME.zip`` and its checksum ``NAME.zip.md5`` are read from the base URL (the
GroupLens site by default, or a mirror given by argument or ``MFPIPE_FETCH_BASE_URL``). The
archive is streamed to a temporary file beside the destination while its MD5 is computed,
compared with the published one, then extracted into a staging folder and renamed into
place. The archive's single top-level folder (``ml-25m/``, ``ml-10M100K/``) is dropped, so
the destination holds ``ratings.csv`` (or ``ratings.dat``, ``u.data``) directly, like the
output of ``mfpipe synth``.

Members with absolute paths, drive letters, ``..`` components, symbolic links or anything
that is neither a regular file nor a folder are refused, and the whole archive with them.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError
from pipeline.publish import check_destination, publishing

logger = logging.getLogger(__name__)

DATASETS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small", "ml-latest")
DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
BASE_URL_ENV = "MFPIPE_FETCH_BASE_URL"
BLOCK = 1 << 20
TIMEOUT_SECONDS = 60.0
_MD5 = re.compile(r"[0-9a-fA-F]{32}")


def archive_url(name: str, base_url: str | None = None) -> str:
    """The URL of ``NAME.zip`` under `base_url`, else $MFPIPE_FETCH_BASE_URL, else GroupLens."""
    if name not in DATASETS:
        raise PipelineError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme not in ("http", "https", "file"):
        raise PipelineError(f"base URL {base!r} must start with http://, https:// or file://")
    return f"{base.rstrip('/')}/{name}.zip"


def _open(url: str, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise PipelineError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise PipelineError(f"cannot download {url}: {exc.reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise PipelineError(f"cannot download {url}: {exc!r}") from None


def published_md5(url: str, timeout: float = TIMEOUT_SECONDS) -> str:
    """The hex MD5 published at `url` + ``.md5`` (``md5sum`` format or the bare digest)."""
    md5_url = f"{url}.md5"
    with _open(md5_url, timeout) as response:
        try:
            text = response.read(4096).decode("ascii", errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            raise PipelineError(f"cannot download {md5_url}: {exc!r}") from None
    fields = text.split()
    if not fields or not _MD5.fullmatch(fields[0]):
        raise PipelineError(f"{md5_url} does not hold an MD5 digest (got {text[:60]!r})")
    return fields[0].lower()


def download(url: str, target: Path, timeout: float = TIMEOUT_SECONDS) -> str:
    """Stream `url` into `target` in 1 MiB blocks, logging progress; return its hex MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    began = time.perf_counter()
    with _open(url, timeout) as response, target.open("wb") as handle:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        logger.info(
            "downloading %s (%s)", url, f"{total / 2**20:.1f} MiB" if total else "size unknown"
        )
        # Progress every tenth of the archive, or every 32 MiB when the size is unknown.
        step = max(total // 10, BLOCK) if total else 32 * BLOCK
        received, next_report = 0, step
        while True:
            try:
                block = response.read(BLOCK)
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                raise PipelineError(f"download of {url} broke off: {exc!r}") from None
            if not block:
                break
            handle.write(block)
            digest.update(block)
            received += len(block)
            if received >= next_report:
                share = f" ({received / total:.0%})" if total else ""
                logger.info("downloaded %.1f MiB%s", received / 2**20, share)
                next_report += step
    if total is not None and received != total:
        raise PipelineError(f"download of {url} broke off after {received:,} of {total:,} bytes")
    logger.info(
        "downloaded %s MiB in %.1f s", f"{received / 2**20:.1f}", time.perf_counter() - began
    )
    return digest.hexdigest()


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why `info` may not be extracted, or None when it is a plain relative file or folder."""
    name = info.filename
    if not name or "\0" in name:
        return "has an empty or invalid name"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "climbs out of the folder with '..'"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    # Many archivers store permission bits without a file type; only a stated type counts.
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a regular file or folder"
    return None


def _relative_names(archive: str, infos: list[zipfile.ZipInfo]) -> list[PurePosixPath]:
    """Member paths with the archive's single top-level folder (if any) removed."""
    for info in infos:
        problem = _member_problem(info)
        if problem:
            raise PipelineError(
                f"{archive}: refusing the archive: member {info.filename!r} {problem}"
            )
    paths = [PurePosixPath(info.filename.replace("\\", "/")) for info in infos]
    tops = {path.parts[0] for path in paths if path.parts}
    single_folder = len(tops) == 1 and all(
        len(path.parts) > 1 or info.is_dir() for path, info in zip(paths, infos, strict=True)
    )
    if single_folder:
        return [PurePosixPath(*path.parts[1:]) for path in paths]
    return paths


def extract(archive: Path, dest: Path, label: str | None = None) -> int:
    """Extract the zip `archive` into the existing empty folder `dest`; return the file count.

    Refuses the whole archive (one-line `PipelineError` naming the member) when any member is
    unsafe; a corrupt archive or a member failing its CRC check is reported the same way.
    """
    label = label or str(archive)
    root = dest.resolve()
    files = 0
    try:
        with zipfile.ZipFile(archive) as zipped:
            infos = zipped.infolist()
            needed = sum(info.file_size for info in infos)
            free = shutil.disk_usage(root).free
            if needed > free:
                raise PipelineError(
                    f"{label}: extracting needs {needed:,} bytes but {dest.parent} has "
                    f"{free:,} bytes free"
                )
            for info, relative in zip(infos, _relative_names(label, infos), strict=True):
                if not relative.parts:
                    continue
                target = root.joinpath(*relative.parts)
                if not target.resolve().is_relative_to(root):
                    raise PipelineError(
                        f"{label}: refusing the archive: member {info.filename!r} lands "
                        f"outside {dest}"
                    )
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(info) as source, target.open("xb") as sink:
                    shutil.copyfileobj(source, sink, BLOCK)
                files += 1
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise PipelineError(f"{label}: not a valid zip archive: {exc}") from None
    except FileExistsError as exc:
        raise PipelineError(
            f"{label}: refusing the archive: duplicate member {exc.filename}"
        ) from None
    if not files:
        raise PipelineError(f"{label}: the archive holds no files")
    return files


def fetch(
    name: str,
    dest: Path,
    *,
    base_url: str | None = None,
    overwrite: bool = False,
    timeout: float = TIMEOUT_SECONDS,
) -> Path:
    """Download, verify and extract dataset `name` into `dest`, published atomically."""
    url = archive_url(name, base_url)
    dest = Path(dest)
    check_destination(dest, overwrite)
    began = time.perf_counter()
    expected = published_md5(url, timeout)
    dest.parent.mkdir(parents=True, exist_ok=True)
    archive = dest.parent / f".{dest.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}.zip"
    try:
        actual = download(url, archive, timeout)
        if actual != expected:
            raise PipelineError(
                f"checksum mismatch for {url}: MD5 {actual}, published {expected}; nothing was kept"
            )
        logger.info("MD5 %s matches %s.md5", actual, url)
        with publishing(dest, overwrite=overwrite) as staging:
            files = extract(archive, staging, label=url)
    finally:
        archive.unlink(missing_ok=True)
    logger.info(
        "fetched %s: %d files into %s in %.1f s", name, files, dest, time.perf_counter() - began
    )
    return dest
