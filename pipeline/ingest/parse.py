"""Reading ratings files in byte blocks and parsing them into validated columns.

A block is the run of lines whose first byte lies in ``[start, end)``, so blocks split a file
at line boundaries without coordination. Each block is parsed by Arrow's CSV reader with
strict types (the fast path); a block that Arrow refuses, or that holds bytes the fast path
cannot judge, goes through the careful path, which classifies every line with vectorised
string kernels. Both paths accept exactly the same lines, then the same value checks apply.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline.errors import PipelineError
from pipeline.ingest.layouts import RATINGS_FIELDS, Layout

logger = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
READ_AHEAD = 1 << 20
# Separator standing in for "::" so that Arrow's single-byte CSV reader can split .dat lines.
DAT_SEPARATOR = b"\x1f"

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
    fast: bool = True

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
    to its newline (or the end of the file) even past `end`.
    """
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            data = f.read(end - start + 1)
            first = data.find(b"\n", 0, end - start)
            if first < 0:
                return b""
            data = data[first + 1 :]
        else:
            data = f.read(end)
        if not data or data.endswith(b"\n"):
            return data
        tail = []
        while chunk := f.read(READ_AHEAD):
            cut = chunk.find(b"\n")
            if cut >= 0:
                tail.append(chunk[: cut + 1])
                break
            tail.append(chunk)
        return data + b"".join(tail)


def parse_block(
    data: bytes, layout: Layout, *, name: str, first: bool, force_careful: bool = False
) -> ParsedBlock:
    """Parse and validate the lines of one block.

    With `first`, a UTF-8 byte-order mark is stripped and the header line (if the layout has
    one) is checked and counted. A wrong header raises PipelineError naming `name`.
    `force_careful` skips the fast path (tests use it to check both paths agree).
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
    # Without carriage returns Arrow makes exactly one row per line (it reports any other
    # line, blank or not, as an error), so the newline count is only needed with them.
    counted = b"\r" in data or force_careful
    n_lines = _count_lines(data) if counted else None
    columns: dict[str, np.ndarray]
    table = None if force_careful else _parse_fast(data, layout, n_lines)
    if n_lines is None:
        n_lines = table.num_rows if table is not None else _count_lines(data)
    if table is not None:
        columns = {key: table.column(key).to_numpy() for key in RATINGS_FIELDS}
        lines_of_rows = None
        rejects: dict[int, str] = {}
    else:
        columns, lines_of_rows, rejects = _parse_careful(data, layout)
    bad, value_reasons = check_values(columns, layout)
    if bad.any():
        bad_rows = np.flatnonzero(bad)
        bad_lines = bad_rows if lines_of_rows is None else lines_of_rows[bad_rows]
        rejects.update(zip(bad_lines.tolist(), value_reasons, strict=True))
        keep = ~bad
        columns = {key: values[keep] for key, values in columns.items()}
    parsed = ParsedBlock(
        user_id=columns["user_id"].astype(np.int32, copy=False),
        movie_id=columns["movie_id"].astype(np.int32, copy=False),
        rating=columns["rating"].astype(np.float32),
        timestamp=columns["timestamp"].astype(np.int64, copy=False),
        lines=header_lines + n_lines,
        header_lines=header_lines,
        fast=table is not None,
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


def _count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _empty_columns() -> dict[str, np.ndarray]:
    return {key: np.empty(0, dtype=typ.to_pandas_dtype()) for key, typ in FIELD_TYPES.items()}


def _parse_fast(data: bytes, layout: Layout, n_lines: int | None) -> pa.Table | None:
    """All lines parsed by Arrow with strict types, or None when any line needs a closer look.

    Arrow reads hexadecimal integers ("0x1F") and treats a lone carriage return as a line
    break; blocks with an "x" or with a row count other than `n_lines` (when given) go the
    careful way.
    """
    if not data:
        return pa.table({key: pa.array([], typ) for key, typ in FIELD_TYPES.items()})
    if b"x" in data or b"X" in data:
        return None
    delimiter = layout.separator
    if delimiter == "::":
        if DAT_SEPARATOR in data:
            return None
        data = data.replace(b"::", DAT_SEPARATOR)
        delimiter = DAT_SEPARATOR.decode()
    try:
        table = pcsv.read_csv(
            pa.py_buffer(data),
            read_options=pcsv.ReadOptions(column_names=list(RATINGS_FIELDS), use_threads=False),
            parse_options=pcsv.ParseOptions(
                delimiter=delimiter,
                quote_char=False,
                escape_char=False,
                newlines_in_values=False,
                ignore_empty_lines=False,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types=FIELD_TYPES,
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        return None
    if n_lines is not None and table.num_rows != n_lines:
        return None
    return table.combine_chunks()


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


def _parse_careful(
    data: bytes, layout: Layout
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """Classify every line with vectorised kernels.

    Returns the columns of the lines that parsed (values not yet range-checked), the 0-based
    line index of each of those rows, (n,) int64, and {line index: reason} of the rest.
    """
    starts, ends = line_bounds(data)
    n_lines = len(starts)
    rejects: dict[int, str] = {}
    if n_lines == 0:
        return _empty_columns(), np.empty(0, dtype=np.int64), rejects
    arr = np.frombuffer(data, dtype=np.uint8)
    non_ascii = np.logical_or.reduceat(arr >= 0x80, starts)
    blank = ~np.logical_or.reduceat(~_WHITESPACE[arr], starts)
    for index in np.flatnonzero(blank).tolist():
        rejects[index] = "blank line"
    for index in np.flatnonzero(non_ascii & ~blank).tolist():
        rejects[index] = explain_non_ascii(data[starts[index] : ends[index]], layout)
    candidates = np.flatnonzero(~blank & ~non_ascii)

    lines = _lines_array(arr, starts, ends).take(pa.array(candidates)).cast(pa.string())
    parts = pc.split_pattern(lines, pattern=layout.separator)
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


def _lines_array(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.BinaryArray:
    """The lines as one Arrow binary array, built by dropping the line terminators."""
    next_starts = np.append(starts[1:], len(arr))
    dropped = next_starts - ends
    keep = np.ones(len(arr), dtype=bool)
    for extra in range(int(dropped.max(initial=0))):
        positions = ends[dropped > extra] + extra
        keep[positions] = False
    compact = arr[keep]
    offsets = np.empty(len(starts) + 1, dtype=np.int64)
    offsets[0] = 0
    np.cumsum(ends - starts, out=offsets[1:])
    if offsets[-1] != len(compact):
        raise AssertionError("line terminators miscounted")
    return pa.BinaryArray.from_buffers(
        pa.binary(),
        len(starts),
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(compact)],
    )


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
