"""Movie metadata: u.item (ml-100k), movies.dat (ml-1m, ml-10m) and movies.csv.

Movie files are small (tens of thousands of lines), so they are parsed line by line on one
worker; this keeps exact physical line numbers for quoted CSV titles.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.dataset import MOVIES_SCHEMA
from pipeline.errors import PipelineError
from pipeline.ingest.layouts import ML100K, ML100K_GENRES, MLCSV, Layout
from pipeline.ingest.parse import BOM

NO_GENRES = "(no genres listed)"
INT32_MAX = 2**31 - 1
_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:\s*[-–]\s*\d{0,4})?\)\s*$")
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass
class ParsedMovies:
    """Accepted movies (MOVIES_SCHEMA, sorted by movie_id) and the line accounting."""

    table: pa.Table
    lines: int
    header_lines: int
    accepted: int
    duplicates_dropped: int
    reject_lines: list[int] = field(default_factory=list)
    reject_text: list[str] = field(default_factory=list)
    reject_reason: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.reject_lines)


class _Reject(Exception):
    """A malformed movie line; the message is the reason."""


def split_title(title: str) -> tuple[str, int | None]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", 1995)``; no trailing year -> (title, None)."""
    match = _YEAR.match(title)
    if match is None:
        return title.strip(), None
    return match.group("title").strip(), int(match.group("year"))


def parse_genre_names(data: bytes, name: str) -> list[str]:
    """Genre names of ml-100k's u.genre (``name|index`` lines), in index order."""
    names: dict[int, str] = {}
    for number, raw in enumerate(data.removeprefix(BOM).split(b"\n"), start=1):
        line = raw.removesuffix(b"\r").decode("latin-1")
        if not line.strip():
            continue
        genre, sep, index = line.rpartition("|")
        if not sep or not _INTEGER.fullmatch(index.strip()):
            raise PipelineError(f"{name} line {number}: expected 'genre|index', found {line!r}")
        names[int(index)] = genre
    if sorted(names) != list(range(len(names))):
        raise PipelineError(f"{name}: genre indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def _movie_id(token: str) -> int:
    text = token.strip()
    if not text:
        raise _Reject("movie_id missing")
    if not _INTEGER.fullmatch(text):
        raise _Reject(f"movie_id not an integer: {token!r}")
    value = int(text)
    if value <= 0:
        raise _Reject(f"movie_id {value} is not positive")
    if value > INT32_MAX:
        raise _Reject(f"movie_id {value} out of int32 range")
    return value


def _fields(line: str, layout: Layout) -> list[str]:
    if layout == MLCSV:
        try:
            return next(csv.reader([line], strict=True))
        except csv.Error as exc:
            raise _Reject(f"malformed CSV: {exc}") from None
    return line.split("|" if layout == ML100K else "::")


def _parse_line(
    line: str, layout: Layout, genre_names: list[str]
) -> tuple[int, str, int | None, list[str]]:
    fields = _fields(line, layout)
    if layout == ML100K:
        expected = 5 + len(genre_names)
        if len(fields) != expected:
            raise _Reject(f"expected {expected} fields, found {len(fields)}")
        flags = fields[5:]
        for genre, flag in zip(genre_names, flags, strict=True):
            if flag.strip() not in ("0", "1"):
                raise _Reject(f"genre flag {genre!r} not 0 or 1: {flag!r}")
        genres = [g for g, flag in zip(genre_names, flags, strict=True) if flag.strip() == "1"]
    else:
        if len(fields) != 3:
            raise _Reject(f"expected 3 fields, found {len(fields)}")
        text = fields[2].strip()
        genres = [] if text in ("", NO_GENRES) else text.split("|")
    movie_id = _movie_id(fields[0])
    if not fields[1].strip():
        raise _Reject("title missing")
    title, year = split_title(fields[1])
    return movie_id, title, year, genres


def parse_movies(
    data: bytes, layout: Layout, *, name: str, genre_names: list[str] | None = None
) -> ParsedMovies:
    """Parse a movies file of `layout`; malformed lines become rejects, a repeated movie_id
    keeps its later line. A wrong CSV header raises PipelineError."""
    genre_names = list(genre_names or ML100K_GENRES)
    raw_lines = data.removeprefix(BOM).split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    header_lines = 0
    if layout.movies_header is not None and raw_lines:
        header = raw_lines[0].removesuffix(b"\r").decode(layout.encoding, errors="replace")
        if header != layout.movies_header:
            raise PipelineError(
                f"{name} line 1: expected the header {layout.movies_header!r}, "
                f"found {header[:80]!r}"
            )
        header_lines = 1
    rows: dict[int, tuple[str, int | None, list[str]]] = {}
    parsed = ParsedMovies(MOVIES_SCHEMA.empty_table(), len(raw_lines), header_lines, 0, 0)
    for number, raw in enumerate(raw_lines[header_lines:], start=header_lines + 1):
        raw = raw.removesuffix(b"\r")
        try:
            try:
                line = raw.decode(layout.encoding)
            except UnicodeDecodeError:
                raise _Reject(f"invalid {layout.encoding.upper()}") from None
            if not line.strip():
                raise _Reject("blank line")
            movie_id, title, year, genres = _parse_line(line, layout, genre_names)
        except _Reject as reject:
            parsed.reject_lines.append(number)
            parsed.reject_text.append(raw.decode(layout.encoding, errors="replace"))
            parsed.reject_reason.append(str(reject))
            continue
        parsed.accepted += 1
        if movie_id in rows:
            parsed.duplicates_dropped += 1
        rows[movie_id] = (title, year, genres)
    ids = sorted(rows)
    parsed.table = pa.Table.from_pydict(
        {
            "movie_id": ids,
            "title": [rows[i][0] for i in ids],
            "year": [rows[i][1] for i in ids],
            "genres": [rows[i][2] for i in ids],
        },
        schema=MOVIES_SCHEMA,
    )
    return parsed
