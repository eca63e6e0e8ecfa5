"""Block reading and line validation of the ingest stage, without a cluster."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.ingest.layouts import ML1M, ML10M, ML100K, MLCSV, Layout, sniff_layout
from pipeline.ingest.movies import parse_genre_names, parse_movies, split_title
from pipeline.ingest.parse import parse_block, plan_blocks, read_block

GOOD_100K = [
    f"{u}\t{m}\t{r}\t{t}" for u, m, r, t in [(1, 2, 3, 100), (2, 3, 4, 200), (3, 1, 5, 300)]
]


def parse(lines: list[bytes | str], layout: Layout = ML100K, careful: bool = False):
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    return parse_block(data, layout, name="f", first=True, force_careful=careful)


# One bad line per class: (layout, line, reason). The line goes between good lines.
BAD_LINES = [
    (ML100K, "4\t5\t3", "expected 4 fields, found 3"),
    (ML100K, "4\t5\t3\t1\t9", "expected 4 fields, found 5"),
    (ML100K, "4\tabc\t3\t1", "movie_id not an integer: 'abc'"),
    (ML100K, "abc\t5\t3\t1", "user_id not an integer: 'abc'"),
    (ML100K, "4\t5\t\t1", "rating missing"),
    (ML100K, "4\t5\tfour\t1", "rating not a number: 'four'"),
    (ML100K, "4\t5\t3\tyesterday", "timestamp not an integer: 'yesterday'"),
    (ML100K, "4\t5\tnan\t1", "rating nan is not finite"),
    (ML100K, "4\t5\tinf\t1", "rating inf is not finite"),
    (ML100K, "4\t5\t7\t1", "rating 7.0 outside 1.0..5.0"),
    (ML100K, "4\t5\t0\t1", "rating 0.0 outside 1.0..5.0"),
    (ML100K, "4\t5\t4.5\t1", "rating 4.5 is not on the 1.0..5.0 scale in steps of 1.0"),
    (MLCSV, "4,5,4.25,1", "rating 4.25 is not on the 0.5..5.0 scale in steps of 0.5"),
    (MLCSV, "4,5,5.5,1", "rating 5.5 outside 0.5..5.0"),
    (ML10M, "4::5::0.0::1", "rating 0.0 outside 0.5..5.0"),
    (ML1M, "4::5::3.5::1", "rating 3.5 is not on the 1.0..5.0 scale in steps of 1.0"),
    (ML100K, "0\t5\t3\t1", "user_id 0 is not positive"),
    (ML100K, "-4\t5\t3\t1", "user_id -4 is not positive"),
    (ML100K, "4\t0\t3\t1", "movie_id 0 is not positive"),
    (ML100K, "2147483648\t5\t3\t1", "user_id 2147483648 out of int32 range"),
    (ML100K, "4\t99999999999\t3\t1", "movie_id 99999999999 out of int32 range"),
    (ML100K, "4\t5\t3\t-1", "timestamp -1 is negative"),
    (ML100K, "4\t5\t3\t99999999999999999999", "timestamp 99999999999999999999 out of int64 range"),
    (ML100K, "", "blank line"),
    (ML100K, "  \t ", "blank line"),
    (ML100K, "4\t0x1F\t3\t1", "movie_id not an integer: '0x1F'"),
    (ML100K, "+4\t5\t3\t1", "user_id not an integer: '+4'"),
    (MLCSV, '"4",5,3.0,1', "user_id not an integer: '\"4\"'"),
    (MLCSV, "4,5,3.0,1\r5", "timestamp not an integer: '1\\r5'"),
    (MLCSV, b"4,5,\xff3.0,1", "invalid UTF-8"),
    (MLCSV, "4,é,3.0,1", "movie_id not an integer: 'é'"),
    (ML1M, "4::5::3", "expected 4 fields, found 3"),
    (ML1M, "4::5::3::1:", "timestamp not an integer: '1:'"),
    (ML1M, "4\x1f5\x1f3\x1f1", "expected 4 fields, found 1"),
    (ML10M, "4:5::6::3.5::1", "user_id not an integer: '4:5'"),
]


def good_lines(layout: Layout) -> list[str]:
    sep = layout.separator
    return [line.replace("\t", sep) for line in GOOD_100K]


@pytest.mark.parametrize("careful", [False, True], ids=["auto", "careful"])
@pytest.mark.parametrize(("layout", "line", "reason"), BAD_LINES)
def test_each_bad_line_becomes_an_accounted_reject(layout, line, reason, careful):
    head = [layout.header] if layout.header else []
    good = good_lines(layout)
    parsed = parse([*head, good[0], good[1], line, good[2]], layout, careful)
    bad_number = len(head) + 3
    assert parsed.reject_lines == [bad_number]
    assert parsed.reject_reason == [reason]
    raw = line if isinstance(line, str) else line.decode(layout.encoding, errors="replace")
    assert parsed.reject_text == [raw.split("\r5")[0] + ("\r5" if "\r5" in raw else "")]
    assert parsed.accepted == 3
    assert parsed.lines == len(head) + 4 == parsed.header_lines + parsed.accepted + parsed.rejected
    assert parsed.user_id.tolist() == [1, 2, 3]


def test_crlf_bom_and_spaces_are_accepted():
    data = b"\xef\xbb\xbfuserId,movieId,rating,timestamp\r\n1,2,3.5,7\r\n 2 , 3,4.0 ,8\r\n"
    for careful in (False, True):
        parsed = parse_block(data, MLCSV, name="f", first=True, force_careful=careful)
        assert parsed.rejected == 0
        assert parsed.header_lines == 1 and parsed.lines == 3
        assert parsed.user_id.tolist() == [1, 2]
        assert parsed.rating.tolist() == [3.5, 4.0]
        assert parsed.rating.dtype == np.float32 and parsed.timestamp.dtype == np.int64


def test_wrong_csv_header_is_one_line_error():
    with pytest.raises(PipelineError, match=r"^f line 1: expected the header") as info:
        parse(["userId,movieId,stars,timestamp", "1,2,3.0,4"], MLCSV)
    assert "\n" not in str(info.value)


def test_only_unusual_lines_leave_the_strict_scan():
    assert parse(GOOD_100K).strict_lines == 3
    parsed = parse([*GOOD_100K, "1\t2\tx\t4", " 5\t6\t1\t2", "7\t8\t2.0\t3\r"])
    assert parsed.strict_lines == 4
    assert parsed.user_id.tolist() == [1, 2, 3, 5, 7]
    assert parsed.reject_lines == [4]


def test_read_block_splits_at_line_boundaries(tmp_path, rng):
    lines = [f"{i}\t{i % 7 + 1}\t{i % 5 + 1}\t{i * 11}" for i in range(1, 400)]
    path = tmp_path / "u.data"
    path.write_text("\n".join(lines) + "\n")
    data = path.read_bytes()
    for block_size in (1, 7, 23, 64, 1000, len(data)):
        blocks = plan_blocks(len(data), block_size)
        assert blocks[0][0] == 0 and blocks[-1][1] == len(data)
        pieces = [read_block(path, start, end) for start, end in blocks]
        assert b"".join(pieces) == data
        assert all(p == b"" or p.endswith(b"\n") for p in pieces)
    # A file without a final newline keeps its last line.
    path.write_bytes(data[:-1])
    assert b"".join(read_block(path, s, e) for s, e in plan_blocks(len(data) - 1, 50)) == data[:-1]


def test_layout_sniffing():
    assert sniff_layout(b"userId,movieId,rating,timestamp\r\n", "f") == MLCSV
    assert sniff_layout(b"1::2::3::4", "f") == ML1M
    assert sniff_layout(b"1::2::3.5::4", "f") == ML10M
    assert sniff_layout(b"1\t2\t3\t4", "f") == ML100K
    with pytest.raises(PipelineError, match="unknown ratings format"):
        sniff_layout(b"hello world", "f")


def test_split_title():
    assert split_title("Toy Story (1995)") == ("Toy Story", 1995)
    assert split_title("Usual Suspects, The (1995) ") == ("Usual Suspects, The", 1995)
    assert split_title("Babylon 5 (1994–1998)") == ("Babylon 5", 1994)
    assert split_title("unknown") == ("unknown", None)
    assert split_title("City of God (Cidade de Deus) (2002)") == (
        "City of God (Cidade de Deus)",
        2002,
    )


def test_movies_csv_quotes_genres_and_rejects():
    data = (
        b"movieId,title,genres\n"
        b'1,"Usual Suspects, The (1995)",Crime|Thriller\n'
        b"2,Nothing (2003),(no genres listed)\n"
        b"x,Broken (2000),Drama\n"
        b'3,"Open (2001),Drama\n'
        b"\n"
        b"2,Nothing Again (2004),Comedy\n"
    )
    parsed = parse_movies(data, MLCSV, name="movies.csv")
    assert parsed.table.to_pylist() == [
        {
            "movie_id": 1,
            "title": "Usual Suspects, The",
            "year": 1995,
            "genres": ["Crime", "Thriller"],
        },
        {"movie_id": 2, "title": "Nothing Again", "year": 2004, "genres": ["Comedy"]},
    ]
    assert parsed.reject_lines == [4, 5, 6]
    assert parsed.reject_reason[0] == "movie_id not an integer: 'x'"
    assert parsed.reject_reason[1].startswith("malformed CSV")
    assert parsed.reject_reason[2] == "blank line"
    assert (parsed.lines, parsed.header_lines, parsed.accepted, parsed.duplicates_dropped) == (
        7,
        1,
        3,
        1,
    )


def test_movies_u_item_uses_genre_names_and_latin1():
    names = parse_genre_names(b"Other|0\nAction|1\n\n", "u.genre")
    data = "7|Caf\xe9 (1990)|01-Jan-1990||http://x|0|1\n8|unknown||||1|0\n9|Bad|x||u|2|0\n"
    parsed = parse_movies(data.encode("latin-1"), ML100K, name="u.item", genre_names=names)
    assert parsed.table.to_pylist() == [
        {"movie_id": 7, "title": "Café", "year": 1990, "genres": ["Action"]},
        {"movie_id": 8, "title": "unknown", "year": None, "genres": ["Other"]},
    ]
    assert parsed.reject_reason == ["genre flag 'Other' not 0 or 1: '2'"]


# --- property: random mixes of good and bad lines against a plain Python reference ---

GOOD_TOKENS = st.tuples(
    st.integers(1, 12), st.integers(1, 9), st.integers(1, 10), st.integers(0, 2_000_000_000)
)
BAD_VARIANTS = [
    "{u}\t{m}\t{r}",
    "{u}\t{m}\t{r}\t{t}\t1",
    "{u}\tabc\t{r}\t{t}",
    "{u}\t{m}\t\t{t}",
    "{u}\t{m}\tnan\t{t}",
    "{u}\t{m}\t-inf\t{t}",
    "{u}\t{m}\t9\t{t}",
    "{u}\t{m}\t2.5\t{t}",
    "0\t{m}\t{r}\t{t}",
    "{u}\t-{m}\t{r}\t{t}",
    "{u}\t4294967296\t{r}\t{t}",
    "{u}\t{m}\t{r}\t-5",
    "",
    " ",
    "{u}\t{m}\t{r}\t{t}<FF>",
    "{u}\t0x{m}\t{r}\t{t}",
]
LINE = st.one_of(
    GOOD_TOKENS.map(lambda x: ("good", x, st.none())),
    st.tuples(st.sampled_from(BAD_VARIANTS), GOOD_TOKENS).map(lambda x: ("bad", x[1], x[0])),
)

INT_RE = re.compile(r"[ \t]*-?[0-9]+[ \t]*")
FLOAT_RE = re.compile(
    r"[ \t]*[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|nan|inf)[ \t]*", re.I
)


def reference_parse(data: bytes, low: float, high: float, step: float):
    """Accepted (user, movie, rating, timestamp) rows and rejected line numbers of a
    headerless tab-separated file, written from the rules in the docs, line by line."""
    accepted, rejected = [], []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            rejected.append(number)
            continue
        fields = text.split("\t")
        if text.strip(" \t\r") == "" or len(fields) != 4:
            rejected.append(number)
            continue
        u, m, r, t = fields
        if not (INT_RE.fullmatch(u) and INT_RE.fullmatch(m) and INT_RE.fullmatch(t)):
            rejected.append(number)
            continue
        if not FLOAT_RE.fullmatch(r):
            rejected.append(number)
            continue
        u, m, t, r = int(u), int(m), int(t), float(r)
        ok = 0 < u < 2**31 and 0 < m < 2**31 and 0 <= t < 2**63 and math.isfinite(r)
        ok = ok and low <= r <= high and ((r - low) / step).is_integer()
        if ok:
            accepted.append((u, m, r, t))
        else:
            rejected.append(number)
    return accepted, rejected


def render(lines) -> bytes:
    """File bytes from generated lines; ``<FF>`` in a template stands for an invalid byte."""
    out = []
    for kind, (u, m, r, t), template in lines:
        stars = (r + 1) // 2
        text = (
            f"{u}\t{m}\t{stars}\t{t}" if kind == "good" else template.format(u=u, m=m, r=stars, t=t)
        )
        out.append(text.encode().replace(b"<FF>", b"\xff"))
    return b"\n".join(out) + b"\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, min_size=1, max_size=40), st.booleans())
def test_block_parser_matches_reference(lines, careful):
    data = render(lines)
    expected, expected_rejects = reference_parse(data, 1.0, 5.0, 1.0)
    parsed = parse_block(data, ML100K, name="f", first=True, force_careful=careful)
    got = list(
        zip(
            parsed.user_id.tolist(),
            parsed.movie_id.tolist(),
            parsed.rating.tolist(),
            parsed.timestamp.tolist(),
            strict=True,
        )
    )
    assert got == expected
    assert parsed.reject_lines == expected_rejects
    assert parsed.lines == len(lines) == parsed.accepted + parsed.rejected


TRICKY_LINES = [
    "1\t2\t3.\t4",
    "1\t2\t.5\t4",
    "01\t02\t3\t4",
    "1\t2\t3.0000000000000001\t4",
    "1\t2\t1.00000000000000000\t4",
    "2147483647\t1\t1\t1",
    "12345678901\t1\t1\t1",
    "1\t2\t1\t999999999999999999",
    "1\t2\t1\t1000000000000000000",
    "1\t2\t1\t9999999999999999999",
    "1\t2\t1e0\t4",
    "1\t2\t1\t4\r",
    "1\t2\t1\t4\r\r",
    "1\t2\t1\t4\t",
    "\t1\t2\t1\t4",
]


def outcome(data: bytes, layout: Layout, careful: bool):
    parsed = parse_block(data, layout, name="f", first=False, force_careful=careful)
    columns = (parsed.user_id, parsed.movie_id, parsed.rating, parsed.timestamp)
    rows = list(zip(*(c.tolist() for c in columns), strict=True))
    return rows, parsed.reject_lines, parsed.reject_reason


def test_strict_scan_and_careful_path_agree_on_tricky_lines():
    data = "\n".join(TRICKY_LINES).encode()
    rows, reject_lines, _ = outcome(data, ML100K, careful=False)
    assert outcome(data, ML100K, careful=True) == outcome(data, ML100K, careful=False)
    assert reject_lines == [2, 7, 10, 13, 14, 15]
    assert (1, 2, 1.0, 1_000_000_000_000_000_000) in rows and (1, 2, 3.0, 4) in rows


TOKEN = st.from_regex(r"[ 0-9.\-+eE]{0,12}", fullmatch=True) | st.integers(0, 10**12).map(str)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(TOKEN, min_size=3, max_size=5), min_size=1, max_size=12),
    st.sampled_from([ML100K, ML1M, MLCSV]),
    st.booleans(),
)
def test_strict_scan_and_careful_path_agree(rows, layout, crlf):
    end = "\r\n" if crlf else "\n"
    data = "".join(layout.separator.join(tokens) + end for tokens in rows).encode()
    assert outcome(data, layout, careful=False) == outcome(data, layout, careful=True)
