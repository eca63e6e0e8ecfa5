"""Reading ratings files in byte blocks and parsing them into validated columns.

A block is the run of lines whose first byte lies in ``[start, end)``, so blocks split a file
at line boundaries without coordination. A compiled scan (:mod:`pipeline.ingest.scan`) reads
the lines in the strict common shape; the few other lines go through the careful path, which
classifies them with vectorised Arrow string kernels and either accepts them (e.g. padded
fields) or rejects them with a reason. Both paths give the same values for the lines they
both accept; the same range checks then apply to every row.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import PipelineError
from pipeline.ingest.layouts import RATINGS_FIELDS, Layout
from pipeline.ingest.scan import count_lines, scan_strict

logger = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
READ_AHEAD = 64 * 1024

# Syntax filters of the careful path; Arrow's cast then settles the rest (overflow). The float
# pattern admits everything Arrow reads as a float64, so the cast stays the judge.
INT_PATTERN = r"^-?[0-9]+$"
FLOAT_PATTERN = r"(?i)^[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)(e[+-]?[0-9]+)?|nan|inf|infinity)$"
FIELD_TYPES = {
    "user_id": pa.int32(),
    "movie_id": pa.int32(),
    "rating": pa.float64(),
    "timestamp": pa.int64(),
}
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 13, 32]] = True


@dataclass
class ParsedBlock:
    """The accepted ratings and the rejected lines of one block.

    Columns are (n,) arrays in file order: `user_id` int32, `movie_id` int32, `rating`
    float32, `timestamp` int64. Rejects are parallel lists; `reject_lines` holds line numbers
    counted from 1 at the first line of the block. `lines` counts every physical line of the
    block, so ``lines == header_lines + accepted + rejected``.
    """

    user_id: np.ndarray
    movie_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    lines: int
    header_lines: int = 0
    reject_lines: list[int] = field(default_factory=list)
    reject_text: list[str] = field(default_factory=list)
    reject_reason: list[str] = field(default_factory=list)
    strict_lines: int = 0

    @property
    def accepted(self) -> int:
        return len(self.user_id)

    @property
    def rejected(self) -> int:
        return len(self.reject_lines)


def plan_blocks(size: int, block_size: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of about `block_size` bytes covering a `size`-byte file."""
    if size <= 0:
        return []
    n_blocks = max(1, -(-size // block_size))
    edges = np.linspace(0, size, n_blocks + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges.tolist())]


def read_block(path: Path, start: int, end: int) -> bytes:
    """The bytes of the lines of `path` whose first byte lies in ``[start, end)``.

    A line starts at offset 0 or right after a newline; the last line of the block is read
    to its newline (or the end of the file) even past `end`. One read of the exact range.
    """
    with open(path, "rb") as f:
        begin = _line_start(f, start)
        if begin >= end:
            return b""
        stop = _line_start(f, end)
        f.seek(begin)
        return f.read(stop - begin)


def _line_start(f: BinaryIO, position: int) -> int:
    """The first line start at or after `position` (the file size when there is none)."""
    if position == 0:
        return 0
    f.seek(position - 1)
    offset = position - 1
    while chunk := f.read(READ_AHEAD):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return offset + newline + 1
        offset += len(chunk)
    return offset


def parse_block(
    data: bytes, layout: Layout, *, name: str, first: bool, force_careful: bool = False
) -> ParsedBlock:
    """Parse and validate the lines of one block.

    With `first`, a UTF-8 byte-order mark is stripped and the header line (if the layout has
    one) is checked and counted. A wrong header raises PipelineError naming `name`.
    `force_careful` sends every line through the careful path (tests use it to check that
    both paths agree).
    """
    header_lines = 0
    if first:
        data = data.removeprefix(BOM)
        if layout.header is not None:
            line, _, data = data.partition(b"\n")
            header = line.removesuffix(b"\r").decode(layout.encoding, errors="replace")
            if header != layout.header:
                raise PipelineError(
                    f"{name} line 1: expected the header {layout.header!r}, found {header[:80]!r}"
                )
            header_lines = 1
    arr = np.frombuffer(data, dtype=np.uint8)
    n_lines = count_lines(arr)
    columns = {key: np.empty(n_lines, typ.to_pandas_dtype()) for key, typ in FIELD_TYPES.items()}
    ok = np.zeros(n_lines, dtype=bool)
    if force_careful:
        other_start, other_end = line_bounds(data)
        n_other = n_lines
    else:
        # Only the first n_other entries are written, so untouched pages cost no memory.
        other_start = np.empty(n_lines, dtype=np.int64)
        other_end = np.empty(n_lines, dtype=np.int64)
        separator = layout.separator.encode()
        n_other = scan_strict(
            arr,
            separator[0],
            len(separator),
            columns["user_id"],
            columns["movie_id"],
            columns["rating"],
            columns["timestamp"],
            ok,
            other_start,
            other_end,
        )
    rejects: dict[int, str] = {}
    if n_other:
        other_lines = np.flatnonzero(~ok)
        lines = lines_array(arr, other_start[:n_other], other_end[:n_other])
        values, rows, reasons = _parse_careful(lines, layout)
        accepted_lines = other_lines[rows]
        for key, column in columns.items():
            column[accepted_lines] = values[key]
        ok[accepted_lines] = True
        rejects = {int(other_lines[row]): reason for row, reason in reasons.items()}
    if len(rejects) == n_lines:
        line_of_row = np.empty(0, dtype=np.int64)
        columns = {key: column[:0] for key, column in columns.items()}
    elif rejects:
        line_of_row = np.flatnonzero(ok)
        columns = {key: column[ok] for key, column in columns.items()}
    else:
        line_of_row = None
    bad, value_reasons = check_values(columns, layout)
    if bad.any():
        bad_rows = np.flatnonzero(bad)
        bad_lines = bad_rows if line_of_row is None else line_of_row[bad_rows]
        rejects.update(zip(bad_lines.tolist(), value_reasons, strict=True))
        columns = {key: column[~bad] for key, column in columns.items()}
    parsed = ParsedBlock(
        user_id=columns["user_id"],
        movie_id=columns["movie_id"],
        rating=columns["rating"].astype(np.float32),
        timestamp=columns["timestamp"],
        lines=header_lines + n_lines,
        header_lines=header_lines,
        strict_lines=n_lines - n_other,
    )
    if rejects:
        starts, ends = line_bounds(data)
        for index in sorted(rejects):
            raw = data[starts[index] : ends[index]]
            parsed.reject_lines.append(header_lines + index + 1)
            parsed.reject_text.append(raw.decode(layout.encoding, errors="replace"))
            parsed.reject_reason.append(rejects[index])
    if parsed.lines != parsed.header_lines + parsed.accepted + parsed.rejected:
        raise PipelineError(f"{name}: internal error, a block lost lines in parsing")
    return parsed


def line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every physical line of `data`, (n_lines,) int64 byte offsets; a line
    is ``data[start:end]`` without its newline and without one carriage return before it."""
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    unterminated = bool(len(arr)) and arr[-1] != 10
    n_lines = len(newlines) + int(unterminated)
    starts = np.zeros(n_lines, dtype=np.int64)
    starts[1:] = newlines[: n_lines - 1] + 1
    ends = np.empty(n_lines, dtype=np.int64)
    ends[: len(newlines)] = newlines
    if unterminated:
        ends[-1] = len(arr)
    if n_lines:
        has_cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13)
        ends -= has_cr
    return starts, ends


def lines_array(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.BinaryArray:
    """The byte ranges ``arr[starts[k]:ends[k]]`` (ascending, disjoint) as one binary array."""
    marks = np.zeros(len(arr) + 1, dtype=np.int8)
    marks[starts] += 1
    marks[ends] -= 1
    keep = np.cumsum(marks[:-1], dtype=np.int8).view(bool)
    compact = arr[keep]
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=offsets[1:])
    if offsets[-1] != len(compact):
        raise AssertionError("line ranges overlap")
    return pa.BinaryArray.from_buffers(
        pa.binary(),
        len(starts),
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(compact)],
    )


def _per_line_any(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Whether each line has a true flag; `flags` (n_bytes,) bool over the concatenated lines,
    `offsets` (n_lines + 1,) int."""
    lengths = np.diff(offsets)
    result = np.zeros(len(lengths), dtype=bool)
    filled = lengths > 0
    if filled.any():
        result[filled] = np.logical_or.reduceat(flags, offsets[:-1][filled])
    return result


def _parse_careful(
    lines: pa.BinaryArray, layout: Layout
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """Classify lines with vectorised kernels.

    Returns the columns of the lines that parsed (values not yet range-checked), the index in
    `lines` of each of those rows, (n,) int64, and {index in `lines`: reason} of the rest.
    """
    n_lines = len(lines)
    data = np.frombuffer(lines.buffers()[2] or b"", dtype=np.uint8)
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[: n_lines + 1]
    non_ascii = _per_line_any(data >= 0x80, offsets)
    blank = ~_per_line_any(~_WHITESPACE[data], offsets)
    rejects: dict[int, str] = {}
    for index in np.flatnonzero(blank).tolist():
        rejects[index] = "blank line"
    for index in np.flatnonzero(non_ascii & ~blank).tolist():
        rejects[index] = explain_non_ascii(lines[index].as_py(), layout)
    candidates = np.flatnonzero(~blank & ~non_ascii)

    text = lines.take(pa.array(candidates)).cast(pa.string())
    parts = pc.split_pattern(text, pattern=layout.separator)
    n_fields = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    for index, count in zip(
        candidates[n_fields != 4].tolist(), n_fields[n_fields != 4].tolist(), strict=True
    ):
        rejects[index] = f"expected 4 fields, found {count}"
    rows = candidates[n_fields == 4]
    flat = pc.list_flatten(parts.filter(pa.array(n_fields == 4)))
    ok = np.ones(len(rows), dtype=bool)
    columns: dict[str, np.ndarray] = {}
    for position, key in enumerate(RATINGS_FIELDS):
        tokens = flat.take(pa.array(np.arange(position, len(flat), 4)))
        values, reasons = _convert_tokens(tokens, key)
        for row, reason in reasons.items():
            if ok[row]:
                ok[row] = False
                rejects[int(rows[row])] = reason
        columns[key] = values
    columns = {key: values[ok] for key, values in columns.items()}
    return columns, rows[ok], rejects


def _convert_tokens(tokens: pa.Array, key: str) -> tuple[np.ndarray, dict[int, str]]:
    """Convert one field of every row; (values, {row: reason}) with 0 at rejected rows."""
    typ = FIELD_TYPES[key]
    trimmed = pc.utf8_trim(tokens, characters=" \t")
    pattern = FLOAT_PATTERN if key == "rating" else INT_PATTERN
    syntax_ok = pc.match_substring_regex(trimmed, pattern).to_numpy(zero_copy_only=False)
    reasons: dict[int, str] = {}
    for row in np.flatnonzero(~syntax_ok).tolist():
        reasons[row] = _token_reason(key, tokens[row].as_py())
    cleaned = pc.if_else(pa.array(syntax_ok), trimmed, pa.scalar("0"))
    for row in _cast_failures(cleaned, typ):
        if key == "rating":
            reasons[row] = _token_reason(key, tokens[row].as_py())
        else:
            reasons[row] = f"{key} {trimmed[row].as_py()} out of {typ} range"
    if reasons:
        mask = np.zeros(len(tokens), dtype=bool)
        mask[list(reasons)] = True
        cleaned = pc.if_else(pa.array(mask), pa.scalar("0"), cleaned)
    return pc.cast(cleaned, typ).to_numpy(zero_copy_only=False), reasons


def _cast_failures(values: pa.Array, typ: pa.DataType, offset: int = 0) -> list[int]:
    """Rows of `values` that Arrow cannot cast to `typ`, found by bisection."""
    try:
        pc.cast(values, typ)
        return []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(values) == 1:
            return [offset]
    half = len(values) // 2
    return _cast_failures(values.slice(0, half), typ, offset) + _cast_failures(
        values.slice(half), typ, offset + half
    )


def _token_reason(key: str, token: str) -> str:
    if token.strip(" \t") == "":
        return f"{key} missing"
    kind = "a number" if key == "rating" else "an integer"
    return f"{key} not {kind}: {token!r}"


def explain_non_ascii(raw: bytes, layout: Layout) -> str:
    """The reason a line with non-ASCII bytes is rejected (no valid ratings line has any)."""
    try:
        text = raw.decode(layout.encoding)
    except UnicodeDecodeError:
        return f"invalid {layout.encoding.upper()}"
    fields = text.split(layout.separator)
    if len(fields) != 4:
        return f"expected 4 fields, found {len(fields)}"
    for key, token in zip(RATINGS_FIELDS, fields, strict=True):
        if not token.isascii():
            return _token_reason(key, token)
    raise AssertionError("a line with non-ASCII bytes has only ASCII fields")


def check_values(columns: dict[str, np.ndarray], layout: Layout) -> tuple[np.ndarray, list[str]]:
    """Range checks on parsed rows: (bad (n,) bool, a reason per bad row in order).

    Ids must be positive, ratings finite and on the layout's scale (min..max in steps of
    step), timestamps non-negative.
    """
    user, movie = columns["user_id"], columns["movie_id"]
    rating, timestamp = columns["rating"], columns["timestamp"]
    low, high, step = layout.rating_scale
    finite = np.isfinite(rating)
    with np.errstate(invalid="ignore"):
        outside = finite & ((rating < low) | (rating > high))
        steps = (rating - low) / step
        off_step = finite & ~outside & (np.abs(steps - np.rint(steps)) > 1e-6)
    bad = (user <= 0) | (movie <= 0) | ~finite | outside | off_step | (timestamp < 0)
    reasons = []
    for row in np.flatnonzero(bad).tolist():
        if user[row] <= 0:
            reasons.append(f"user_id {user[row]} is not positive")
        elif movie[row] <= 0:
            reasons.append(f"movie_id {movie[row]} is not positive")
        elif not finite[row]:
            reasons.append(f"rating {rating[row]} is not finite")
        elif outside[row]:
            reasons.append(f"rating {rating[row]} outside {low}..{high}")
        elif off_step[row]:
            reasons.append(
                f"rating {rating[row]} is not on the {low}..{high} scale in steps of {step}"
            )
        else:
            reasons.append(f"timestamp {timestamp[row]} is negative")
    return bad, reasons
