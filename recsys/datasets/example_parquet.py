"""A small "bring your own data" example: impression rows as plain parquet files, the way a new user's own data
would look (built from the shipped MovieLens latest-small ratings, GroupLens licence; no download).

    python -m recsys.datasets.example_parquet --out data_cache/own_data_example [--users 200]

writes `train.parquet`, `valid.parquet`, `test.parquet` (split by time: the last 10% / 10% of each user's ratings
are valid / test) with one row per rating and these columns:

| column | type | what |
|---|---|---|
| user_id, item_id | int64 | ids |
| surface | string | the domain: `drama_feed`, `comedy_feed`, `other_feed` (the movie's genre family) |
| clicked | int8 | the label: rating >= 4 |
| genres | list<string> | multi-valued categorical |
| title | string | the movie title (text) |
| release_year | float64 | age-like number (a candidate for `bucketize`) |
| user_ratings_so_far | int64 | skewed count (a candidate for `log1p`) |
| recent_items | list<int64> | the user's previous 10 rated movies, oldest first (a behaviour sequence) |
| new_item | bool | the movie has no rating in train (a slice column) |
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ML_DIR = Path(__file__).resolve().parent / "ml-latest-small"
HISTORY = 10


def _family(genres: str) -> str:
    g = genres.split("|")
    return "drama_feed" if "Drama" in g else "comedy_feed" if "Comedy" in g else "other_feed"


def build(users: int = 200) -> dict:
    """The three splits as Arrow tables, from the first `users` users of MovieLens latest-small."""
    ratings = pacsv.read_csv(ML_DIR / "ratings.csv")
    movies = pacsv.read_csv(ML_DIR / "movies.csv")
    ratings = ratings.filter(pc.less_equal(ratings["userId"], users))
    order = np.lexsort((ratings["timestamp"].to_numpy(), ratings["userId"].to_numpy()))
    ratings = ratings.take(pa.array(order))
    user = ratings["userId"].to_numpy().astype(np.int64)
    item = ratings["movieId"].to_numpy().astype(np.int64)
    n = len(user)
    first = np.r_[True, user[1:] != user[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))  # index of each user's first rating
    pos = np.arange(n) - start
    count = np.bincount(user)[user]
    frac = pos / count
    split = np.where(frac >= 0.9, "test", np.where(frac >= 0.8, "valid", "train"))

    mid = movies["movieId"].to_numpy()
    row_of = {int(m): i for i, m in enumerate(mid)}
    mrow = np.array([row_of[int(m)] for m in item])
    titles = np.array(movies["title"].to_pylist(), dtype=object)[mrow]
    genre_str = np.array(movies["genres"].to_pylist(), dtype=object)[mrow]
    years = np.array([float(t.strip()[-5:-1]) if t.strip()[-5:-1].isdigit() else np.nan for t in titles])
    hist = [item[max(start[i], i - HISTORY):i].tolist() for i in range(n)]
    in_train = set(item[split == "train"].tolist())
    table = pa.table({
        "user_id": pa.array(user), "item_id": pa.array(item),
        "surface": pa.array([_family(g) for g in genre_str]),
        "clicked": pa.array((ratings["rating"].to_numpy() >= 4).astype(np.int8)),
        "genres": pa.array([g.split("|") for g in genre_str], pa.list_(pa.string())),
        "title": pa.array(titles.tolist(), pa.string()),
        "release_year": pa.array(years),
        "user_ratings_so_far": pa.array(pos.astype(np.int64)),
        "recent_items": pa.array(hist, pa.list_(pa.int64())),
        "new_item": pa.array([int(i) not in in_train for i in item]),
    })
    return {s: table.filter(pa.array(split == s)) for s in ("train", "valid", "test")}


def write(out: Path, users: int = 200) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tables = build(users)
    for name, t in tables.items():
        pq.write_table(t, out / f"{name}.parquet")
    return {name: t.num_rows for name, t in tables.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for train/valid/test.parquet")
    p.add_argument("--users", type=int, default=200, help="how many MovieLens users (default 200)")
    args = p.parse_args(argv)
    rows = write(args.out, args.users)
    print(", ".join(f"{k}: {v:,} rows" for k, v in rows.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
