"""`mfpipe fetch` against a real HTTP server on 127.0.0.1 serving archives built here."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import shutil
import socket
import stat
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from pipeline import fetch
from pipeline.cli import main

# A fake archive with the ml-latest-small layout (made-up rows, not MovieLens data).
FILES = {
    "ratings.csv": "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,10,3.5,964982931\n",
    "movies.csv": 'movieId,title,genres\n10,"Fake Film, The (1999)",Drama\n',
    "README.txt": "fake archive for tests\n",
}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of a threaded HTTP server on an ephemeral port."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(_QuietHandler, directory=str(served))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/datasets", served
        httpd.shutdown()
        thread.join()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def _zip(
    members: dict[str, str | bytes],
    symlinks: dict[str, str] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def _publish(served: Path, name: str, data: bytes, md5: str | None = None) -> None:
    folder = served / "datasets"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.zip").write_bytes(data)
    digest = md5 or hashlib.md5(data).hexdigest()
    (folder / f"{name}.zip.md5").write_text(f"{digest}  {name}.zip\n")


def _good_archive(top: str = "ml-latest-small/") -> bytes:
    return _zip({top: b"", **{f"{top}{name}": text for name, text in FILES.items()}})


def _fails_cleanly(capsys: pytest.CaptureFixture[str], work: Path, argv: list[str]) -> str:
    """Run the CLI expecting exit 2, one stderr line, and nothing left in `work`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err
    assert err.startswith("mfpipe fetch: error: "), err
    assert list(work.iterdir()) == []
    return err


def _fails_cleanly_keep(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting exit 2 and one stderr line; `work` may keep what it had."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_good_path(
    server: tuple[str, Path],
    work: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, served = server
    _publish(served, "ml-latest-small", _good_archive())
    dest = work / "ml-latest-small"
    with caplog.at_level(logging.INFO, logger="pipeline.fetch"):
        assert main(["fetch", "ml-latest-small", "--to", str(dest), "--base-url", base]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    for name, text in FILES.items():
        assert (dest / name).read_text() == text
    assert [p.name for p in work.iterdir()] == ["ml-latest-small"]
    movies = pd.read_csv(dest / "movies.csv")
    assert movies["title"].tolist() == ["Fake Film, The (1999)"]
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("downloading http://127.0.0.1:") for m in messages)
    assert any(m.startswith("MD5 ") and "matches" in m for m in messages)


def test_base_url_from_environment_and_overwrite(
    server: tuple[str, Path],
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, served = server
    # An archive without a top-level folder is extracted as is.
    _publish(served, "ml-1m", _zip({"ratings.dat": "1::10::5::978300760\n"}))
    monkeypatch.setenv(fetch.BASE_URL_ENV, base + "/")
    dest = work / "data"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    err = _fails_cleanly_keep(capsys, ["fetch", "ml-1m", "--to", str(dest)])
    assert "already exists; pass --overwrite" in err
    assert (dest / "stale.txt").exists()
    assert main(["fetch", "ml-1m", "--to", str(dest), "--overwrite"]) == 0
    assert [p.name for p in dest.iterdir()] == ["ratings.dat"]
    assert [p.name for p in work.iterdir()] == ["data"]


def test_checksum_mismatch(
    server: tuple[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, served = server
    _publish(served, "ml-100k", _good_archive("ml-100k/"), md5="0" * 32)
    argv = ["fetch", "ml-100k", "--to", str(work / "d"), "--base-url", base]
    err = _fails_cleanly(capsys, work, argv)
    assert "checksum mismatch" in err
    assert "0" * 32 in err


@pytest.mark.parametrize(
    ("members", "symlinks", "bad", "why"),
    [
        ({"ml-25m/ratings.csv": "a", "../evil": "x"}, None, "../evil", "'..'"),
        ({"ml-25m/ratings.csv": "a", "ml-25m/../../evil": "x"}, None, "ml-25m/../../evil", ".."),
        ({"ml-25m/ratings.csv": "a", "/tmp/mfpipe-evil": "x"}, None, "/tmp/mfpipe-evil", "abs"),
        ({"ml-25m/ratings.csv": "a", "C:/evil": "x"}, None, "C:/evil", "absolute"),
        ({"ml-25m/ratings.csv": "a"}, {"ml-25m/link": "../../../etc/passwd"}, "link", "symbolic"),
    ],
)
def test_unsafe_members_refuse_the_archive(
    server: tuple[str, Path],
    work: Path,
    capsys: pytest.CaptureFixture[str],
    members: dict[str, str],
    symlinks: dict[str, str] | None,
    bad: str,
    why: str,
) -> None:
    base, served = server
    _publish(served, "ml-25m", _zip(members, symlinks))
    argv = ["fetch", "ml-25m", "--to", str(work / "ml-25m"), "--base-url", base]
    err = _fails_cleanly(capsys, work, argv)
    assert "refusing the archive" in err
    assert bad in err
    assert why in err
    assert not (work.parent / "evil").exists()
    assert not (work.parent.parent / "evil").exists()
    assert not Path("/tmp/mfpipe-evil").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad deflate", "bad crc"])
def test_corrupt_zip(
    server: tuple[str, Path], work: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    base, served = server
    good = _zip({"ml-20m/ratings.csv": "userId,movieId,rating,timestamp\n" * 200})
    if damage == "garbage":
        data = b"this is not a zip archive" * 40
    elif damage == "truncated":
        data = good[: len(good) // 2]
    elif damage == "bad deflate":
        # Flip a byte of the compressed data: the directory still parses, the content fails.
        offset = good.index(b"ratings.csv") + len("ratings.csv") + 5
        data = good[:offset] + bytes([good[offset] ^ 0xFF]) + good[offset + 1 :]
    else:
        # Stored, not compressed: a changed byte is caught only by the CRC-32 check.
        stored = _zip({"ml-20m/ratings.csv": "userId,movieId\n" * 50}, None, zipfile.ZIP_STORED)
        offset = stored.index(b"userId")
        data = stored[:offset] + b"U" + stored[offset + 1 :]
    _publish(served, "ml-20m", data)  # the published MD5 matches the damaged bytes
    argv = ["fetch", "ml-20m", "--to", str(work / "ml-20m"), "--base-url", base]
    err = _fails_cleanly(capsys, work, argv)
    assert "not a valid zip archive" in err
    if damage == "bad crc":
        assert "CRC" in err


def test_not_found(
    server: tuple[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = server
    argv = ["fetch", "ml-10m", "--to", str(work / "d"), "--base-url", base]
    err = _fails_cleanly(capsys, work, argv)
    assert "HTTP 404" in err
    assert "ml-10m.zip.md5" in err


def test_archive_missing_but_checksum_present(
    server: tuple[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, served = server
    _publish(served, "ml-10m", _good_archive())
    (served / "datasets" / "ml-10m.zip").unlink()
    argv = ["fetch", "ml-10m", "--to", str(work / "d"), "--base-url", base]
    err = _fails_cleanly(capsys, work, argv)
    assert "HTTP 404" in err
    assert "ml-10m.zip:" in err


def test_unparsable_checksum_file(
    server: tuple[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, served = server
    _publish(served, "ml-latest", _good_archive())
    (served / "datasets" / "ml-latest.zip.md5").write_text("<html>moved</html>")
    argv = ["fetch", "ml-latest", "--to", str(work / "d"), "--base-url", base]
    err = _fails_cleanly(capsys, work, argv)
    assert "does not hold an MD5 digest" in err


def test_connection_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["fetch", "ml-1m", "--to", str(work / "d"), "--base-url", f"http://127.0.0.1:{port}"]
    err = _fails_cleanly(capsys, work, argv)
    assert "cannot download" in err
    assert "refused" in err.lower()


def test_unknown_name_lists_known_ones(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails_cleanly(capsys, work, ["fetch", "ml-30m", "--to", str(work / "d")])
    assert "unknown dataset 'ml-30m'" in err
    for name in fetch.DATASETS:
        assert name in err


def test_bad_base_url_scheme(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fetch", "ml-1m", "--to", str(work / "d"), "--base-url", "ftp://mirror/"]
    assert "must start with http://" in _fails_cleanly(capsys, work, argv)


def test_archive_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fetch.BASE_URL_ENV, raising=False)
    assert fetch.archive_url("ml-25m") == (
        "https://files.grouplens.org/datasets/movielens/ml-25m.zip"
    )
    assert fetch.archive_url("ml-1m", "http://m/x/") == "http://m/x/ml-1m.zip"
    monkeypatch.setenv(fetch.BASE_URL_ENV, "https://mirror.example/movielens")
    assert fetch.archive_url("ml-1m") == "https://mirror.example/movielens/ml-1m.zip"


def test_extract_streams_large_member_in_blocks(tmp_path: Path) -> None:
    # A member bigger than one copy block comes out byte-identical.
    payload = bytes(range(256)) * (3 * fetch.BLOCK // 256 + 7)
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"top/big.bin": payload, "top/sub/small.txt": "s"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert fetch.extract(archive, dest) == 2
    assert (dest / "big.bin").read_bytes() == payload
    assert (dest / "sub" / "small.txt").read_text() == "s"


def test_large_download_logs_progress_and_verifies(
    server: tuple[str, Path], work: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, served = server
    payload = os.urandom(5 * fetch.BLOCK)  # incompressible: the archive is over 5 MiB
    _publish(served, "ml-25m", _zip({"ml-25m/blob.bin": payload}, None, zipfile.ZIP_STORED))
    dest = work / "ml-25m"
    with caplog.at_level(logging.INFO, logger="pipeline.fetch"):
        fetch.fetch("ml-25m", dest, base_url=base)
    assert (dest / "blob.bin").read_bytes() == payload
    progress = [r.getMessage() for r in caplog.records if r.getMessage().endswith("%)")]
    assert len(progress) >= 4
    assert progress[-1].endswith("(100%)")


def test_refuses_archive_larger_than_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"top/ratings.csv": "x" * 10_000}))
    dest = tmp_path / "dest"
    dest.mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda _: usage._replace(free=5_000))
    with pytest.raises(
        fetch.PipelineError, match=r"extracting needs 10,000 bytes but .* has 5,000 bytes free"
    ):
        fetch.extract(archive, dest)
    assert list(dest.iterdir()) == []
