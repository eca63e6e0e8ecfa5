"""The MovieLens file layouts: how ratings and movie files of each release are written."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import PipelineError

RATINGS_FIELDS = ("user_id", "movie_id", "rating", "timestamp")

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

CSV_RATINGS_HEADER = "userId,movieId,rating,timestamp"
CSV_MOVIES_HEADER = "movieId,title,genres"

# Fold files of ml-100k share the u.data layout: u1.base .. u5.test, ua.base .. ub.test.
ML100K_RATINGS_NAME = re.compile(r"^(u\.data|u[1-5a-z]\.(base|test))$")


@dataclass(frozen=True)
class Layout:
    """How one MovieLens release writes its files.

    `format` is the manifest name, `separator` splits ratings and movie lines, `header` is
    the expected first line of the ratings file (None when there is none), `encoding` applies
    to every text file of the release, and the rating scale is min..max in steps of `step`.
    """

    format: str
    ratings_name: str
    movies_name: str | None
    separator: str
    header: str | None
    movies_header: str | None
    encoding: str
    rating_min: float
    rating_max: float
    rating_step: float

    @property
    def rating_scale(self) -> tuple[float, float, float]:
        return (self.rating_min, self.rating_max, self.rating_step)


ML100K = Layout("ml-100k", "u.data", "u.item", "\t", None, None, "latin-1", 1.0, 5.0, 1.0)
ML1M = Layout("ml-1m", "ratings.dat", "movies.dat", "::", None, None, "latin-1", 1.0, 5.0, 1.0)
ML10M = Layout("ml-10m", "ratings.dat", "movies.dat", "::", None, None, "utf-8", 0.5, 5.0, 0.5)
MLCSV = Layout(
    "ml-csv",
    "ratings.csv",
    "movies.csv",
    ",",
    CSV_RATINGS_HEADER,
    CSV_MOVIES_HEADER,
    "utf-8",
    0.5,
    5.0,
    0.5,
)

LAYOUTS = {layout.format: layout for layout in (ML100K, ML1M, ML10M, MLCSV)}


def layout_for_ratings_name(name: str) -> Layout | None:
    """The layout implied by a ratings file name alone; None when the name is not telling.

    ``ratings.dat`` is shared by ml-1m and ml-10m and needs :func:`dat_layout`.
    """
    if ML100K_RATINGS_NAME.match(name):
        return ML100K
    if name == "ratings.csv":
        return MLCSV
    return None


def dat_layout(sibling_names: set[str], folder_name: str, sample: bytes) -> Layout:
    """Tell ml-1m from ml-10m: ml-1m ships users.dat, ml-10m tags.dat; else the folder name,
    else a half-star rating in the first lines means ml-10m."""
    if "users.dat" in sibling_names:
        return ML1M
    if "tags.dat" in sibling_names:
        return ML10M
    lowered = folder_name.lower()
    if "10m" in lowered:
        return ML10M
    if "1m" in lowered:
        return ML1M
    for line in sample.splitlines():
        fields = line.split(b"::")
        if len(fields) == 4 and b"." in fields[2]:
            return ML10M
    return ML1M


def sniff_layout(first_line: bytes, where: str) -> Layout:
    """Guess the layout of a ratings file with an unfamiliar name from its first line."""
    text = first_line.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n").decode("latin-1")
    if text == CSV_RATINGS_HEADER:
        return MLCSV
    if len(text.split("::")) == 4:
        return ML10M if "." in text.split("::")[2] else ML1M
    if len(text.split("\t")) == 4:
        return ML100K
    raise PipelineError(
        f"{where}: unknown ratings format; line 1 is {text[:80]!r}, expected a "
        f"'{CSV_RATINGS_HEADER}' header, 'user::movie::rating::time' or tab-separated fields"
    )
