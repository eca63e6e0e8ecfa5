"""Compiled scanning of ratings lines in the strict shape almost every MovieLens line has.

A strict line is ``D<sep>D<sep>R<sep>T`` with an optional carriage return, where D is 1..10
digits no greater than 2**31 - 1, R is digits with an optional fraction (15 digits at most)
and T is 1..18 digits. Values read here are exactly what Arrow's conversions give for the
same text, so the careful path (:mod:`pipeline.ingest.parse`) only sees the other lines.
"""

from __future__ import annotations

import numba
import numpy as np

INT32_MAX = 2**31 - 1


@numba.njit(cache=True, nogil=True)
def count_lines(buf: np.ndarray) -> int:
    """Physical lines of a (n,) uint8 buffer: newlines, plus an unterminated last line."""
    lines = 0
    for i in range(buf.size):
        if buf[i] == 10:
            lines += 1
    if buf.size and buf[buf.size - 1] != 10:
        lines += 1
    return lines


@numba.njit(cache=True, nogil=True, inline="always")
def _digits(buf, i, n, limit):
    """Read at most `limit` decimal digits of `buf` from `i`: (value, digits read, next i)."""
    value = 0
    digits = 0
    while i < n and 48 <= buf[i] <= 57 and digits < limit:
        value = value * 10 + (buf[i] - 48)
        digits += 1
        i += 1
    return value, digits, i


@numba.njit(cache=True, nogil=True, inline="always")
def _separator(buf, i, n, sep, sep_len):
    """Skip `sep_len` copies of the byte `sep` from `i`: (all present, next i)."""
    matched = 0
    while matched < sep_len and i < n and buf[i] == sep:
        matched += 1
        i += 1
    return matched == sep_len, i


@numba.njit(cache=True, nogil=True)
def scan_strict(
    buf: np.ndarray,
    sep: int,
    sep_len: int,
    user_id: np.ndarray,
    movie_id: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    ok: np.ndarray,
    other_start: np.ndarray,
    other_end: np.ndarray,
) -> int:
    """Parse every strict line of `buf` into the per-line arrays; return how many lines were
    not strict.

    `buf` (n,) uint8; the separator is `sep_len` copies of the byte `sep`. Per-line outputs
    (n_lines,): `user_id` int32, `movie_id` int32, `rating` float64, `timestamp` int64 and
    `ok` bool, all written at the line's index. The k-th non-strict line spans
    ``buf[other_start[k]:other_end[k]]`` (without its newline and one carriage return).
    """
    powers = np.empty(16, dtype=np.float64)
    power = 1.0
    for k in range(16):
        powers[k] = power
        power *= 10.0
    n = buf.size
    i = 0
    line = 0
    others = 0
    while i < n:
        start = i
        strict = False
        # One pass over the fields; any departure from the strict shape breaks out.
        while True:
            user, digits, i = _digits(buf, i, n, 11)
            if digits == 0 or digits > 10 or user > INT32_MAX:
                break
            matched, i = _separator(buf, i, n, sep, sep_len)
            if not matched:
                break
            movie, digits, i = _digits(buf, i, n, 11)
            if digits == 0 or digits > 10 or movie > INT32_MAX:
                break
            matched, i = _separator(buf, i, n, sep, sep_len)
            if not matched:
                break
            mantissa, digits, i = _digits(buf, i, n, 16)
            if digits == 0:
                break
            fraction = 0
            if i < n and buf[i] == 46:
                tail, fraction, i = _digits(buf, i + 1, n, 16 - digits)
                if fraction == 0:
                    break
                mantissa = mantissa * np.int64(powers[fraction]) + tail
            if digits + fraction > 15:
                break
            matched, i = _separator(buf, i, n, sep, sep_len)
            if not matched:
                break
            stamp, digits, i = _digits(buf, i, n, 19)
            if digits == 0 or digits > 18:
                break
            if i < n and buf[i] == 13:
                i += 1
            if i < n and buf[i] != 10:
                break
            strict = True
            user_id[line] = user
            movie_id[line] = movie
            rating[line] = mantissa / powers[fraction]
            timestamp[line] = stamp
            break
        if strict:
            ok[line] = True
            i += 1
        else:
            ok[line] = False
            end = start
            while end < n and buf[end] != 10:
                end += 1
            i = end + 1
            if end > start and buf[end - 1] == 13:
                end -= 1
            other_start[others] = start
            other_end[others] = end
            others += 1
        line += 1
    return others
