"""MovieLens-1M -> the Parquet layout of Criteo data: `memcom data movielens SRC --out DIR`.

One row per rating: label = rating >= 4; categorical features user, movie, gender, age,
occupation, zip (one id each) and genres (a multi-hot bag); no dense features. Rows are shuffled
with a seeded generator, then split as Kaggle's file is (first 6/7 train, the rest halved into
val and test). Ids are 1..K in the sorted order of each feature's raw values (the list is kept in
`vocab/<feature>.json`); id 0 is left free for values unseen at serving time.

Two source layouts (MovieLens' license forbids redistribution, so nothing here ships it):
GroupLens's `ratings.dat`, `users.dat`, `movies.dat` (`::`-separated, latin-1, genres
`|`-separated) and RecBole's atomic files `*.inter`, `*.user`, `*.item` (tab-separated, UTF-8,
typed headers such as `user_id:token`, movies keyed by title, genres space-separated).
Malformed lines are handled as the Criteo converter does: an error naming file and line, or
(`on_bad_line="skip"`) skipped and counted by reason in the manifest.
"""

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import manifest as mf
from .schema import LABEL_NAME, SPLITS, Features, kaggle_split
from .shards import ROW_GROUP_ROWS, shard_name
from .sources import PathLike

ONE_HOT = ["user", "movie", "gender", "age", "occupation", "zip"]
GENRES = "genres"
FEATURES = Features(dense=[], sparse=[*ONE_HOT, GENRES], multi_hot=[GENRES])
SCHEMA = pa.schema(
    [pa.field(LABEL_NAME, pa.int8(), nullable=False)]
    + [pa.field(n, pa.int64(), nullable=False) for n in ONE_HOT]
    + [pa.field(GENRES, pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False)]
)


class _Layout(TypedDict):
    """A layout's file name (or suffix) of ratings, users, movies; separator; encoding."""

    files: Tuple[str, str, str]
    sep: str
    encoding: str


GROUPLENS: _Layout = {"files": ("ratings.dat", "users.dat", "movies.dat"), "sep": "::", "encoding": "latin-1"}
RECBOLE: _Layout = {"files": (".inter", ".user", ".item"), "sep": "\t", "encoding": "utf-8"}
# RecBole header field -> our column (its typed headers name each field `name:type`).
_RECBOLE_FIELDS = {
    "inter": {"user_id": "user", "item_id": "movie", "rating": "rating"},
    "user": {"user_id": "user", "gender": "gender", "age": "age", "occupation": "occupation", "zip_code": "zip"},
    "item": {"item_id": "movie", "genre": GENRES},
}
_MAX_EXAMPLES = 20


class MovieLensFormatError(ValueError):
    """A malformed line under `on_bad_line="error"`; names the file and 1-based line."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason} (use --on-bad-line skip to skip such lines)")
        self.path, self.line, self.reason = path, line, reason


def find_layout(src: PathLike) -> Tuple[str, List[Path]]:
    """("grouplens" | "recbole", [ratings, users, movies] files) found in folder `src`."""
    folder = Path(src)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of MovieLens files")
    grouplens = [folder / name for name in GROUPLENS["files"]]
    if all(p.is_file() for p in grouplens):
        return "grouplens", grouplens
    recbole = []
    for suffix in RECBOLE["files"]:
        found = sorted(folder.glob(f"*{suffix}"))
        if len(found) != 1:
            break
        recbole.append(found[0])
    if len(recbole) == 3:
        return "recbole", recbole
    raise FileNotFoundError(
        f"{folder}: expected GroupLens's ratings.dat, users.dat, movies.dat or RecBole's "
        f"one each of *.inter, *.user, *.item"
    )


class _Lines:
    """The records of one file as {column: text}, with the error-or-skip policy for bad lines."""

    def __init__(
        self, path: Path, layout: str, kind: str, on_bad_line: str, skipped: Counter, examples: List[str]
    ) -> None:
        self.path, self.layout, self.kind, self.on_bad_line = path, layout, kind, on_bad_line
        self.skipped, self.examples = skipped, examples

    def bad(self, line: int, reason: str, detail: str) -> None:
        if self.on_bad_line == "error":
            raise MovieLensFormatError(str(self.path), line, detail)
        self.skipped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{self.path}:{line}: {detail}")

    def records(
        self, check: Optional[Callable[[Dict[str, str]], Optional[Tuple[str, str]]]] = None
    ) -> List[Tuple[int, Dict[str, str]]]:
        """The well-formed records, in file order; ``check`` returns (reason, detail) of a bad one."""
        spec = GROUPLENS if self.layout == "grouplens" else RECBOLE
        columns = {
            "ratings": ["user", "movie", "rating", "timestamp"],
            "users": ["user", "gender", "age", "occupation", "zip"],
            "movies": ["movie", "title", GENRES],
        }[self.kind]
        positions: Dict[str, int] = {c: i for i, c in enumerate(columns)}
        out = []
        with open(self.path, encoding=spec["encoding"], newline="") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{self.path}: not {spec['encoding']} text: {e}") from None
        lines = text.splitlines()
        start = 0
        width = len(columns)
        if self.layout == "recbole":
            if not lines:
                raise ValueError(f"{self.path}:1: empty file, expected a typed header such as user_id:token")
            header = [h.split(":")[0] for h in lines[0].split(spec["sep"])]
            wanted = _RECBOLE_FIELDS[{"ratings": "inter", "users": "user", "movies": "item"}[self.kind]]
            missing = [h for h in wanted if h not in header]
            if missing:
                raise ValueError(f"{self.path}:1: header lacks field {missing[0]!r} (has {header})")
            positions = {ours: header.index(theirs) for theirs, ours in wanted.items()}
            width, start = len(header), 1
        for number, line in enumerate(lines[start:], start + 1):
            if not line:
                continue
            fields = line.split(spec["sep"])
            if len(fields) != width:
                self.bad(number, "field_count", f"expected {width} fields, found {len(fields)}: {line[:60]!r}")
                continue
            record = {c: fields[i].strip() for c, i in positions.items()}
            problem = check(record) if check is not None else None
            if problem is not None:
                self.bad(number, *problem)
                continue
            out.append((number, record))
        return out


def _vocab(values: List[str]) -> Dict[str, int]:
    return {v: i + 1 for i, v in enumerate(sorted(set(values)))}


def _write_split(out: Path, split: str, table: pa.Table, rows_per_shard: int) -> List[Dict[str, Any]]:
    shards = []
    for index, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        rel = shard_name(split, index)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        piece = table.slice(start, rows_per_shard)
        pq.write_table(piece, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        os.replace(tmp, path)
        shards.append({"path": rel, "rows": piece.num_rows})
    return shards


def convert_movielens(
    src: PathLike,
    out_dir: PathLike,
    *,
    seed: int = 0,
    on_bad_line: str = "error",
    rows_per_shard: int = 1_000_000,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Convert a MovieLens folder (either layout) into `out_dir`; returns the manifest.

    A finished `out_dir` from the same inputs and options is returned as it is; one holding
    other data is refused unless `overwrite`.
    """
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be error or skip, not {on_bad_line!r}")
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be positive")
    layout, files = find_layout(src)
    config = {
        "version": 1,
        "layout": layout,
        "seed": seed,
        "rows_per_shard": rows_per_shard,
        "sources": [{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
    }
    out = Path(out_dir)
    if overwrite:
        mf.clear(out)
    if (out / mf.MANIFEST).is_file():
        existing = mf.load_manifest(out)
        if existing.get("config") == config:
            return existing
        raise ValueError(f"{out} already holds converted data from other inputs or options; use --overwrite")
    out.mkdir(parents=True, exist_ok=True)

    skipped: Counter = Counter()
    examples: List[str] = []

    def reader(path: Path, kind: str) -> _Lines:
        return _Lines(path, layout, kind, on_bad_line, skipped, examples)

    users_file, movies_file = reader(files[1], "users"), reader(files[2], "movies")
    users: Dict[str, Dict[str, str]] = {}
    for number, r in users_file.records():
        if r["user"] in users:
            users_file.bad(number, "duplicate", f"user {r['user']!r} listed again")
            continue
        users[r["user"]] = r
    movies: Dict[str, List[str]] = {}
    genre_sep = "|" if layout == "grouplens" else " "
    for number, r in movies_file.records():
        if r["movie"] in movies:
            movies_file.bad(number, "duplicate", f"movie {r['movie']!r} listed again")
            continue
        movies[r["movie"]] = [g for g in r[GENRES].split(genre_sep) if g]

    def check_rating(r: Dict[str, str]) -> Optional[Tuple[str, str]]:
        try:
            float(r["rating"])
        except ValueError:
            return "bad_rating", f"rating {r['rating']!r} is not a number"
        for which, known in (("user", users), ("movie", movies)):
            if r[which] not in known:
                return f"unknown_{which}", f"{which} {r[which]!r} is not in its file"
        return None

    skipped_before_ratings = sum(skipped.values())
    ratings_file = reader(files[0], "ratings")
    ratings = [(r["user"], r["movie"], float(r["rating"])) for _, r in ratings_file.records(check_rating)]
    read = len(ratings) + sum(skipped.values()) - skipped_before_ratings
    if not ratings:
        raise ValueError(f"{files[0]}: no ratings to convert")

    raw: Dict[str, List[str]] = {
        "user": [u for u, _, _ in ratings],
        "movie": [m for _, m, _ in ratings],
    }
    for name in ("gender", "age", "occupation", "zip"):
        raw[name] = [users[u][name] for u in raw["user"]]
    vocabs = {name: _vocab(values) for name, values in raw.items()}
    vocabs[GENRES] = _vocab([g for genres in movies.values() for g in genres])

    n = len(ratings)
    order = np.random.default_rng(seed).permutation(n)
    columns: Dict[str, Any] = {LABEL_NAME: np.array([r >= 4 for _, _, r in ratings], dtype=np.int8)[order]}
    for name in ONE_HOT:
        vocab = vocabs[name]
        columns[name] = np.array([vocab[v] for v in raw[name]], dtype=np.int64)[order]
    genre_ids = {m: [vocabs[GENRES][g] for g in genres] for m, genres in movies.items()}
    bags = [genre_ids[raw["movie"][i]] for i in order]
    arrays = [pa.array(columns[LABEL_NAME])] + [pa.array(columns[c]) for c in ONE_HOT]
    arrays.append(pa.array(bags, type=SCHEMA.field(GENRES).type))
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)

    ranges = kaggle_split(n)
    shards = {s: _write_split(out, s, table.slice(a, b - a), rows_per_shard) for s, (a, b) in ranges.items()}
    (out / mf.VOCAB).mkdir(parents=True, exist_ok=True)
    for name, vocab in vocabs.items():
        mf.write_json_atomic(out / mf.VOCAB / f"{name}.json", sorted(vocab, key=vocab.__getitem__))
    sizes = {name: len(vocabs[name]) + 1 for name in FEATURES.sparse}
    return mf.finish(
        out,
        {s: shards[s] for s in SPLITS},
        sizes,
        {
            "kind": "movielens",
            "config": config,
            "mode": "movielens",
            "layout": layout,
            "sources": [str(p) for p in files],
            "split_rule": {"rule": "kaggle", "shuffled": True, "seed": seed, **{s: list(r) for s, r in ranges.items()}},
            "label": "int8: rating >= 4",
            "dense": "none",
            "vocab": f"{mf.VOCAB}/<feature>.json: raw value of id i+1 at index i; id 0 = absent",
            "rows_read": read,
            "rows_written": n,
            "rows_skipped": read - n,
            "skipped_by_reason": dict(skipped),
            "skipped_examples": examples,
            "on_bad_line": on_bad_line,
        },
        features=FEATURES,
    )


def write_movielens(
    folder: PathLike,
    layout: str,
    ratings: List[Tuple[int, int, float]],
    users: List[Tuple[int, str, int, int, str]],
    movies: List[Tuple[int, str, List[str]]],
    extra_lines: Optional[Dict[str, List[str]]] = None,
) -> Path:
    """Write MovieLens-1M-style files of either layout (for tests and examples): ratings
    (user, movie, rating), users (user, gender, age, occupation, zip), movies (movie, title,
    genres). RecBole's keys users as ``1m_<id>`` and movies by title, as its ml-1m files do.
    ``extra_lines`` appends raw lines to the ratings/users/movies file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = extra_lines or {}
    title = {m: t for m, t, _ in movies}
    if layout == "grouplens":
        enc, names = "latin-1", GROUPLENS["files"]
        rows = {
            "ratings": [f"{u}::{m}::{r:g}::97830{i:04d}" for i, (u, m, r) in enumerate(ratings)],
            "users": [f"{u}::{g}::{a}::{o}::{z}" for u, g, a, o, z in users],
            "movies": [f"{m}::{t}::{'|'.join(gs)}" for m, t, gs in movies],
        }
        headers: Dict[str, List[str]] = {"ratings": [], "users": [], "movies": []}
    elif layout == "recbole":
        enc, names = "utf-8", ("ml-1m.inter", "ml-1m.user", "ml-1m.item")
        rows = {
            "ratings": [f"1m_{u}\t{title[m]}\t{r:g}\t97830{i:04d}" for i, (u, m, r) in enumerate(ratings)],
            "users": [f"1m_{u}\t{a}\t{g}\t{o}\t{z}" for u, g, a, o, z in users],
            "movies": [f"{t}\t{t.rsplit(' (', 1)[0]}\t1995\t{' '.join(gs)}" for _, t, gs in movies],
        }
        headers = {
            "ratings": ["user_id:token\titem_id:token\trating:float\ttimestamp:float"],
            "users": ["user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token"],
            "movies": ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"],
        }
    else:
        raise ValueError(f"unknown layout {layout!r}: grouplens or recbole")
    for kind, name in zip(("ratings", "users", "movies"), names):
        lines = headers[kind] + rows[kind] + extra.get(kind, [])
        (folder / name).write_bytes(("\r\n".join(lines) + "\r\n").encode(enc))
    return folder
