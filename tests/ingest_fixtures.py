"""Writers of small MovieLens-layout fixtures for the ingest tests (no MovieLens data)."""

from __future__ import annotations

import gzip
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.ingest.layouts import ML100K_GENRES

Rating = tuple[int, int, float, int]


def sample_ratings(
    rng: np.random.Generator, n: int, *, n_users: int = 40, n_movies: int = 30, half: bool = False
) -> list[Rating]:
    """`n` ratings with distinct (user_id, movie_id) pairs, in random order."""
    pairs = rng.choice(n_users * n_movies, size=n, replace=False)
    steps = rng.integers(1, 11, size=n) if half else rng.integers(1, 6, size=n) * 2
    stamps = rng.integers(800_000_000, 1_600_000_000, size=n)
    return [
        (int(p // n_movies) + 1, int(p % n_movies) + 1, float(s) / 2, int(t))
        for p, s, t in zip(pairs, steps, stamps, strict=True)
    ]


def rating_text(rating: float, integer: bool) -> str:
    return str(int(rating)) if integer else f"{rating:.1f}"


def ml100k_lines(ratings: Sequence[Rating]) -> list[str]:
    return [f"{u}\t{m}\t{rating_text(r, True)}\t{t}" for u, m, r, t in ratings]


def dat_lines(ratings: Sequence[Rating], integer: bool) -> list[str]:
    return [f"{u}::{m}::{rating_text(r, integer)}::{t}" for u, m, r, t in ratings]


def csv_lines(ratings: Sequence[Rating]) -> list[str]:
    return [f"{u},{m},{rating_text(r, False)},{t}" for u, m, r, t in ratings]


def write_lines(path: Path, lines: Sequence[str | bytes], encoding: str = "utf-8") -> Path:
    """Write lines joined by newlines, with a final newline; bytes are written as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(
        (line if isinstance(line, bytes) else line.encode(encoding)) + b"\n" for line in lines
    )
    path.write_bytes(data)
    return path


def movie_titles(n: int) -> list[tuple[int, str, list[str]]]:
    """(movie_id, title with year, genres) for movies 1..n; some titles need CSV quoting."""
    genres = ["Action", "Comedy", "Drama", "Sci-Fi"]
    movies = []
    for movie_id in range(1, n + 1):
        title = f"Film {movie_id} ({1990 + movie_id % 20})"
        if movie_id % 3 == 0:
            title = f"Story {movie_id}, The ({1980 + movie_id % 30})"
        chosen = [g for k, g in enumerate(genres) if (movie_id >> k) & 1]
        movies.append((movie_id, title, chosen))
    return movies


def write_ml100k(
    folder: Path,
    ratings: Sequence[Rating],
    *,
    n_movies: int = 30,
    genre_names: Sequence[str] = ML100K_GENRES,
    folds: bool = True,
) -> Path:
    """u.data, u.item (latin-1), u.genre and two fold files with other content."""
    write_lines(folder / "u.data", ml100k_lines(ratings))
    items = []
    for movie_id, title, _ in movie_titles(n_movies):
        flags = ["1" if (movie_id + k) % 7 == 0 else "0" for k in range(len(genre_names))]
        items.append(
            f"{movie_id}|{title}|01-Jan-1995||http://example.org/{movie_id}|" + "|".join(flags)
        )
    write_lines(folder / "u.item", items, "latin-1")
    write_lines(folder / "u.genre", [f"{g}|{k}" for k, g in enumerate(genre_names)] + [""])
    if folds:
        write_lines(folder / "u1.base", ml100k_lines(ratings[: len(ratings) // 2]))
        write_lines(folder / "u1.test", ml100k_lines(ratings[len(ratings) // 2 :]))
    (folder / "README").write_text("fixture\n")
    return folder


def write_dat(folder: Path, ratings: Sequence[Rating], *, ten_m: bool, n_movies: int = 30) -> Path:
    """ml-1m (latin-1, users.dat) or ml-10m (UTF-8, tags.dat) ratings.dat and movies.dat."""
    encoding = "utf-8" if ten_m else "latin-1"
    write_lines(folder / "ratings.dat", dat_lines(ratings, integer=not ten_m))
    movies = [
        f"{movie_id}::{title.replace('Film', 'Café')}::{'|'.join(genres) or '(no genres listed)'}"
        for movie_id, title, genres in movie_titles(n_movies)
    ]
    write_lines(folder / "movies.dat", movies, encoding)
    extra = "tags.dat" if ten_m else "users.dat"
    write_lines(folder / extra, ["1::x::y"])
    return folder


def csv_title(title: str) -> str:
    return f'"{title}"' if "," in title or '"' in title else title


def write_csv(folder: Path, ratings: Sequence[Rating], *, n_movies: int = 30) -> Path:
    """ratings.csv and movies.csv with headers (ml-20m/25m/latest), plus ignored extras."""
    write_lines(folder / "ratings.csv", ["userId,movieId,rating,timestamp", *csv_lines(ratings)])
    movies = ["movieId,title,genres"] + [
        f"{movie_id},{csv_title(title)},{'|'.join(genres) or '(no genres listed)'}"
        for movie_id, title, genres in movie_titles(n_movies)
    ]
    write_lines(folder / "movies.csv", movies)
    write_lines(folder / "tags.csv", ["userId,movieId,tag,timestamp", "1,1,fun,5"])
    write_lines(folder / "links.csv", ["movieId,imdbId,tmdbId", "1,1,1"])
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip `folder` with its name as the single top folder, as GroupLens archives are."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{folder.name}/", "")
        for file in sorted(folder.iterdir()):
            zf.write(file, f"{folder.name}/{file.name}")
    return archive


def gzip_file(path: Path, dest: Path | None = None) -> Path:
    dest = dest or path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest
