"""Resolving SOURCE (a folder, a single file, a .zip or a .gz) into the files to read."""

from __future__ import annotations

import gzip
import hashlib
import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import PipelineError
from pipeline.ingest.layouts import (
    ML100K,
    Layout,
    dat_layout,
    layout_for_ratings_name,
    sniff_layout,
)

logger = logging.getLogger(__name__)

SNIFF_BYTES = 64 * 1024
COPY_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class SourceFile:
    """One input file. `name` identifies it in messages and rejects (the path, or
    ``archive.zip:member``); `path` is the plain file the workers read, which for a
    compressed source is a decompressed copy in the scratch folder."""

    role: str
    name: str
    origin: Path
    member: str | None
    compression: str | None
    path: Path

    def manifest_entry(self, n_bytes: int, sha256: str) -> dict:
        return {
            "path": str(self.origin),
            "member": self.member,
            "role": self.role,
            "compression": self.compression,
            "bytes": n_bytes,
            "sha256": sha256,
        }


@dataclass(frozen=True)
class Sources:
    """The ratings file of a source, with its movie metadata and ml-100k genre names."""

    layout: Layout
    ratings: SourceFile
    movies: SourceFile | None = None
    genres: SourceFile | None = None

    def files(self) -> list[SourceFile]:
        return [f for f in (self.ratings, self.movies, self.genres) if f is not None]


def resolve(source: Path, scratch: Path) -> Sources:
    """Find the files to ingest in `source`; compressed ones get a path under `scratch`.

    Reads only names, archive listings and at most the first 64 KiB of a file to tell
    layouts apart. Raises PipelineError for a missing source or an unknown format.
    """
    source = Path(source)
    if not source.exists():
        raise PipelineError(f"{source}: no such file or folder")
    if source.is_dir():
        return _resolve_folder(source, scratch)
    if source.stat().st_size == 0:
        raise PipelineError(f"{source}: file is empty")
    if source.suffix.lower() == ".zip":
        return _resolve_zip(source, scratch)
    if source.suffix.lower() == ".gz":
        inner = source.name[: -len(".gz")]
        layout = layout_for_ratings_name(inner) or _sniff_gzip(source)
        if inner == "ratings.dat":
            layout = dat_layout(set(), source.parent.name, _gzip_head(source))
        return Sources(layout, _gzip_file("ratings", source, scratch))
    layout = layout_for_ratings_name(source.name)
    head = _head(source)
    if source.name == "ratings.dat":
        layout = dat_layout(set(), source.parent.name, head)
    if layout is None:
        layout = sniff_layout(head.split(b"\n", 1)[0], str(source))
    return Sources(layout, _plain("ratings", source))


def _plain(role: str, path: Path) -> SourceFile:
    return SourceFile(role, str(path), path, None, None, path)


def _gzip_file(role: str, path: Path, scratch: Path) -> SourceFile:
    return SourceFile(role, str(path), path, None, "gzip", scratch / path.name[: -len(".gz")])


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def _gzip_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path}: not a readable gzip file ({exc})") from None


def _sniff_gzip(path: Path) -> Layout:
    return sniff_layout(_gzip_head(path).split(b"\n", 1)[0], str(path))


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _resolve_folder(folder: Path, scratch: Path) -> Sources:
    found = _resolve_folder_files(folder, scratch)
    if found is not None:
        return found
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subfolders) == 1:
        found = _resolve_folder_files(subfolders[0], scratch)
        if found is not None:
            return found
    raise PipelineError(
        f"{folder}: unknown format; no u.data, ratings.dat or ratings.csv in this folder"
    )


def _resolve_folder_files(folder: Path, scratch: Path) -> Sources | None:
    def as_source(role: str, path: Path | None) -> SourceFile | None:
        if path is None:
            return None
        if path.suffix == ".gz":
            return _gzip_file(role, path, scratch)
        return _plain(role, path)

    names = {p.name.removesuffix(".gz") for p in folder.iterdir() if p.is_file()}
    if "u.data" in names:
        layout = ML100K
        ratings = _find(folder, "u.data")
    elif "ratings.csv" in names:
        ratings = _find(folder, "ratings.csv")
        layout = layout_for_ratings_name("ratings.csv")
    elif "ratings.dat" in names:
        ratings = _find(folder, "ratings.dat")
        assert ratings is not None
        head = _gzip_head(ratings) if ratings.suffix == ".gz" else _head(ratings)
        layout = dat_layout(names, folder.name, head)
    else:
        return None
    assert ratings is not None and layout is not None
    if ratings.stat().st_size == 0:
        raise PipelineError(f"{ratings}: file is empty")
    movies = _find(folder, layout.movies_name) if layout.movies_name else None
    genres = _find(folder, "u.genre") if layout == ML100K else None
    return Sources(
        layout,
        as_source("ratings", ratings),  # type: ignore[arg-type]
        as_source("movies", movies),
        as_source("genres", genres),
    )


def _resolve_zip(archive: Path, scratch: Path) -> Sources:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            by_name = {i.filename: i for i in infos}
            candidates = sorted(
                (i.filename for i in infos if _zip_ratings_name(i.filename)),
                key=lambda n: (n.count("/"), n),
            )
            if not candidates:
                raise PipelineError(
                    f"{archive}: unknown format; the archive has no u.data, ratings.dat or "
                    "ratings.csv"
                )
            ratings_member = candidates[0]
            folder, _, base = ratings_member.rpartition("/")
            prefix = f"{folder}/" if folder else ""
            siblings = {n[len(prefix) :] for n in by_name if n.startswith(prefix)}
            siblings = {n for n in siblings if "/" not in n}
            if base == "ratings.dat":
                with zf.open(ratings_member) as f:
                    head = f.read(SNIFF_BYTES)
                layout = dat_layout(siblings, folder or archive.stem, head)
            else:
                layout = layout_for_ratings_name(base)
                assert layout is not None
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{archive}: not a readable zip archive ({exc})") from None

    def member(role: str, name: str | None) -> SourceFile | None:
        if name is None or f"{prefix}{name}" not in by_name:
            return None
        full = f"{prefix}{name}"
        return SourceFile(role, f"{archive}:{full}", archive, full, "zip", scratch / name)

    ratings = member("ratings", base)
    assert ratings is not None
    if by_name[ratings_member].file_size == 0:
        raise PipelineError(f"{ratings.name}: file is empty")
    return Sources(
        layout,
        ratings,
        member("movies", layout.movies_name),
        member("genres", "u.genre" if layout == ML100K else None),
    )


def _zip_ratings_name(member: str) -> bool:
    base = member.rpartition("/")[2]
    return base in ("u.data", "ratings.dat", "ratings.csv")


class _Tally:
    """Size, sha256 and physical line count of a byte stream fed in chunks."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.newlines = 0
        self.last = b""

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        self.newlines += chunk.count(b"\n")
        self.last = chunk[-1:]

    def result(self) -> tuple[int, str, int]:
        unterminated = 1 if self.size and self.last != b"\n" else 0
        return self.size, self.digest.hexdigest(), self.newlines + unterminated


def unpack(file: SourceFile) -> tuple[int, str, int]:
    """Decompress `file` (streaming) to ``file.path``; return (bytes, sha256 hex, lines) of
    the decompressed content, as :func:`checksum` does for a plain file.

    Runs on a worker. A corrupt archive or gzip stream raises PipelineError.
    """
    tally = _Tally()
    file.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _open_compressed(file) as src, open(file.path, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                tally.update(chunk)
                out.write(chunk)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{file.name}: cannot decompress ({exc})") from None
    if tally.size == 0:
        raise PipelineError(f"{file.name}: file is empty")
    return tally.result()


def _open_compressed(file: SourceFile) -> BinaryIO:
    if file.compression == "gzip":
        return gzip.open(file.origin, "rb")  # type: ignore[return-value]
    if file.compression == "zip":
        assert file.member is not None
        return zipfile.ZipFile(file.origin).open(file.member)
    raise ValueError(f"not a compressed source: {file.name}")


def checksum(file: SourceFile) -> tuple[int, str, int]:
    """(bytes, sha256 hex, physical lines) of the plain file ``file.path``; runs on a worker.

    The line count (newlines, plus one for an unterminated last line) is measured here
    independently of the parser, to check the row accounting.
    """
    tally = _Tally()
    with open(file.path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            tally.update(chunk)
    return tally.result()
