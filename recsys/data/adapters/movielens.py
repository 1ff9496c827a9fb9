"""`movielens` adapter: MovieLens latest-small (ratings, movies, tags) -> canonical multi-domain parquet.

Recommendation domains (one per genre family). Every movie belongs to exactly one family, decided by a majority
vote of its genres over this mapping (ties: action, then comedy, then drama; no genre -> drama):

    ml_action: Action Adventure Fantasy Horror IMAX Sci-Fi War Western
    ml_comedy: Animation Children Comedy Musical
    ml_drama:  Crime Documentary Drama Film-Noir Mystery Romance Thriller (and "(no genres listed)")

(crime/thriller sit with drama so the three families have comparable numbers of ratings.)

Each rating is one row of its movie's family domain: label = rating >= 4 (the usual "liked" threshold for 0.5-5
stars), query = ''.

Search domain `ml_tag_search` (personalised search with the users' own words, like the product-search protocol of
Ai et al. 2017 where the query comes from the text of the item the user picked): every tag application
(user u typed tag t on movie m at time ts) is one search event. query = t normalised (lower case, single
spaces); the positive candidate is m (label 1: the user themself said m matches t). The 4 negatives are drawn so
that nothing but their relation to the query and to the user tells them from the positive:
- *popularity-matched*: from the movies whose number of ratings (in ratings.csv) falls in the same power-of-two
  bucket as m's (1, 2-3, 4-7, ...; a bucket with too few movies borrows from its neighbours), so an item's
  popularity, or how often it appears in anyone's history, carries no label;
- *novelty-matched*: never a movie u tagged with t, and, like the positive, every candidate is left out of the
  event's history (users mostly rate a movie just before tagging it, so the newest history item would otherwise
  give the positive away), so "already seen by the user" is equally invisible for all candidates.
(The first construction drew negatives from the user's own rated movies: the positives were mostly movies new to
the user and the negatives ones they had rated, less novel and more popular, and every model, popularity included,
scored 0.39-0.49 on test: a defect of the construction, not a hard task.) Sampling uses a fixed seed, so prepare is
deterministic.

History (`hist_item_ids`): up to 20 movies the user rated strictly before the event, newest last (ties in
timestamp keep the file order); for search events the event's own candidates are left out of the history (users
mostly rate a movie just before tagging it, so the newest history item would otherwise give the positive away).
Query history (`query_hist_item_ids`, search events only, empty on rating rows): up to 10 movies the user tagged
with the same tag strictly before the event, newest last, the event's candidates left out -- the "what did this user
pick for this query before" signal of personalised search (negatives are never movies the user tagged with the tag,
so it cannot name one). `position` = number of the user's ratings before the event.

Split: chronological per user over all the user's events (ratings and tag events; a tag event's positive and
negatives always share a split): the last 10% (at least 1) -> test, the previous 10% (at least 1) -> valid, the
rest -> train. `cold_item` = the candidate never appears in train (as candidate or in a history).
`user_bucket` = stable hash of the user id mod 100 (`recsys.data.hashing`).

Side table `movies.parquet`: item_id, title, genres ('|'-separated, '' when none listed), year (from the title;
missing -> median year, so the column is NaN-free), text = "title. genre words.".
"""
from __future__ import annotations

import bisect

import logging
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsys.data import paths
from recsys.data.adapters.parquet import validate  # the canonical files' schema check
from recsys.data.hashing import hash64
from recsys.errors import DataError
from recsys.spec.config import Spec

log = logging.getLogger("recsys.data.adapters.movielens")

FAMILIES = ["ml_action", "ml_comedy", "ml_drama"]  # tie-break order
GENRE_FAMILY: Dict[str, str] = {
    **{g: "ml_action" for g in ["Action", "Adventure", "Fantasy", "Horror", "IMAX", "Sci-Fi", "War", "Western"]},
    **{g: "ml_comedy" for g in ["Animation", "Children", "Comedy", "Musical"]},
    **{g: "ml_drama" for g in ["Crime", "Documentary", "Drama", "Film-Noir", "Mystery", "Romance", "Thriller"]},
}
SEARCH_DOMAIN = "ml_tag_search"
HIST_LEN = 20
QUERY_HIST_LEN = 10
NEGATIVES = 4
SEED = 20231127
SPLIT_FRACTION = 0.1
SOURCES = ["ratings.csv", "movies.csv", "tags.csv"]


def genre_family(genres: str) -> str:
    votes = {f: 0 for f in FAMILIES}
    for g in genres.split("|"):
        if g in GENRE_FAMILY:
            votes[GENRE_FAMILY[g]] += 1
    best = max(votes.values())
    return "ml_drama" if best == 0 else next(f for f in FAMILIES if votes[f] == best)


def _read_csv(path: Path, types: Dict[str, pa.DataType]) -> pa.Table:
    if not path.exists():
        raise DataError(f"{path}: file not found (movielens raw_dir must hold {SOURCES})")
    try:
        t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: unreadable csv ({e})") from None
    for c in types:
        if c not in t.column_names:
            raise DataError(f"{path}: missing column {c!r}")
    return t


def build_movies(raw: Path) -> pa.Table:
    t = _read_csv(raw / "movies.csv", {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()})
    titles = t["title"].to_pylist()
    genres = ["" if g in (None, "(no genres listed)") else g for g in t["genres"].to_pylist()]
    years = []
    for title in titles:
        m = re.search(r"\((\d{4})\)\s*$", title or "")
        years.append(float(m.group(1)) if m else np.nan)
    year = np.array(years, dtype=np.float64)
    year[np.isnan(year)] = float(np.nanmedian(year))
    text = [f"{(ti or '').strip()}. {g.replace('|', ' ')}." if g else f"{(ti or '').strip()}." for ti, g in
            zip(titles, genres)]
    return pa.table({"item_id": pc.cast(t["movieId"], pa.string()), "title": titles, "genres": genres,
                      "year": year, "text": text,
                      "family": [genre_family(g) for g in genres]})


def _hist_lists(items: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    """list<string> of items[starts[i]:ends[i]] per row (already clipped to HIST_LEN)."""
    lens = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    flat = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(items[flat].astype(str)))


def build_rows(raw: Path) -> Dict[str, pa.Table]:
    movies = build_movies(raw)
    r = _read_csv(raw / "ratings.csv", {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(),
                                        "timestamp": pa.int64()})
    tg = _read_csv(raw / "tags.csv", {"userId": pa.int64(), "movieId": pa.int64(), "tag": pa.string(),
                                      "timestamp": pa.int64()})
    ru, rm, rr, rt = (r[c].to_numpy() for c in ["userId", "movieId", "rating", "timestamp"])
    order = np.lexsort((np.arange(len(ru)), rt, ru))  # by user, then time, then file order
    ru, rm, rr, rt = ru[order], rm[order], rr[order], rt[order]
    user_start = np.searchsorted(ru, ru, side="left")  # first rating of the row's user
    k = np.arange(len(ru)) - user_start  # ratings of this user before this one
    fam = dict(zip(movies["item_id"].to_pylist(), movies["family"].to_pylist()))
    rec = {
        "domain": np.array([fam.get(str(m), "ml_drama") for m in rm], dtype=object), "label": (rr >= 4.0).astype(np.int8),
        "user": ru, "item": rm, "query": np.full(len(ru), "", dtype=object), "time": rt, "k": k,
        "hstart": np.maximum(user_start, np.arange(len(ru)) - HIST_LEN), "hend": np.arange(len(ru)),
        "event": np.arange(len(ru)),
    }
    # Search events: one per tag application; popularity-matched negatives the user did not tag with that tag.
    rng = np.random.default_rng(SEED)
    sample_negatives = _popularity_matched_sampler(movies, rm, rng)
    tu, tm, tt = tg["userId"].to_numpy(), tg["movieId"].to_numpy(), tg["timestamp"].to_numpy()
    tq = [" ".join((s or "").lower().split()) for s in tg["tag"].to_pylist()]
    tag_times: Dict[tuple, List[tuple]] = {}  # (user, tag) -> [(time, movie)] in time order
    for u, m, q, t in zip(tu, tm, tq, tt):
        tag_times.setdefault((u, q), []).append((int(t), int(m)))
    for v in tag_times.values():
        v.sort()
    tagged = {k: {m for _, m in v} for k, v in tag_times.items()}  # (user, tag) -> movies
    tag_clock = {k: [when for when, _ in v] for k, v in tag_times.items()}  # their times, for bisect
    key = ru * (1 << 32) + rt
    cols: Dict[str, List] = {c: [] for c in rec}
    next_event = len(ru)
    search_hist: List[List[str]] = []
    query_hist: List[List[str]] = []
    for u, m, q, t in zip(tu, tm, tq, tt):
        if not q:
            continue
        lo, hi = np.searchsorted(ru, u, "left"), np.searchsorted(ru, u, "right")
        kk = int(np.searchsorted(key, u * (1 << 32) + t, "left"))
        negs = sample_negatives(int(m), tagged[(u, q)])
        cands = [(int(m), 1)] + [(int(c), 0) for c in negs]
        # The user usually rated the movie right before tagging it: drop the event's candidates from the history,
        # otherwise "the newest history item" would leak the positive.
        excluded = {c for c, _ in cands}
        hist = [str(x) for x in rm[lo:kk] if int(x) not in excluded][-HIST_LEN:]
        # The (user, tag) list is time-ordered: the events strictly before t end at the bisect point, and of the last
        # QUERY_HIST_LEN + len(excluded) of them at least QUERY_HIST_LEN survive the exclusion when enough exist (a
        # heavy tagger's list is not rescanned per event).
        end = bisect.bisect_left(tag_clock[(u, q)], int(t))
        before = tag_times[(u, q)][max(0, end - QUERY_HIST_LEN - len(excluded)):end]
        earlier = [str(x) for _, x in before if x not in excluded][-QUERY_HIST_LEN:]
        for cand, label in cands:
            for c, v in (("domain", SEARCH_DOMAIN), ("label", label), ("user", u), ("item", cand), ("query", q),
                         ("time", t), ("k", kk - lo), ("hstart", 0), ("hend", 0), ("event", next_event)):
                cols[c].append(v)
            search_hist.append(hist)
            query_hist.append(earlier)
        next_event += 1
    rows = {c: np.concatenate([np.asarray(rec[c]), np.asarray(cols[c], dtype=np.asarray(rec[c]).dtype)])
            for c in rec}
    hist = pa.concat_arrays([_hist_lists(rm, rec["hstart"], rec["hend"]),
                             pa.array(search_hist, type=pa.list_(pa.string()))])
    no_query_hist = pa.ListArray.from_arrays(pa.array(np.zeros(len(rec["user"]) + 1, np.int32)),
                                             pa.array([], pa.string()))  # rating rows: empty lists
    query_hist_ids = pa.concat_arrays([no_query_hist, pa.array(query_hist, type=pa.list_(pa.string()))])
    split = _chronological_split(rows["user"], rows["time"], rows["event"])
    user_str = rows["user"].astype(str)
    base = pa.table({
        "domain": rows["domain"].astype(str), "label": pa.array(rows["label"].astype(np.int8)),
        "user_id": user_str, "item_id": rows["item"].astype(str), "query": rows["query"].astype(str),
        "hist_item_ids": hist, "query_hist_item_ids": query_hist_ids, "position": pa.array(rows["k"].astype(np.int32)),
        "user_bucket": pa.array((hash64(pa.array(user_str)) % np.uint64(100)).astype(np.int8)),
    })
    # File order: by user, then time, so a split file reads like the users' timelines.
    out: Dict[str, pa.Table] = {}
    for name, code in (("train", 0), ("valid", 1), ("test", 2)):
        idx = np.nonzero(split == code)[0]
        idx = idx[np.lexsort((rows["event"][idx], rows["time"][idx], rows["user"][idx]))]
        out[name] = base.take(pa.array(idx))
    warm = pc.unique(pa.chunked_array([out["train"]["item_id"], pc.list_flatten(out["train"]["hist_item_ids"])]))
    for name in out:
        out[name] = out[name].append_column("cold_item", pc.invert(pc.is_in(out[name]["item_id"], warm)))
    out["movies"] = movies.drop(["family"])
    return out


def _popularity_matched_sampler(movies: pa.Table, rated: np.ndarray, rng: np.random.Generator):
    """-> sample(positive, excluded) -> NEGATIVES distinct movies from the positive's popularity bucket (rating
    count in the same power of two), none in `excluded`. Buckets with fewer than 50 movies borrow the neighbouring
    buckets' movies (the few most-rated movies form one pool)."""
    ids = np.array([int(x) for x in movies["item_id"].to_pylist()])
    uniq, n = np.unique(rated, return_counts=True)
    count = dict(zip(uniq.tolist(), n.tolist()))
    bucket = np.array([int(count.get(int(i), 0)).bit_length() for i in ids])  # 0 | 1 | 2-3 | 4-7 | ...
    pools: Dict[int, np.ndarray] = {}
    for b in np.unique(bucket):
        lo = hi = b
        while (np.count_nonzero((bucket >= lo) & (bucket <= hi)) < 50
               and (lo > bucket.min() or hi < bucket.max())):
            lo, hi = max(lo - 1, bucket.min()), min(hi + 1, bucket.max())
        pools[int(b)] = ids[(bucket >= lo) & (bucket <= hi)]
    bucket_of = dict(zip(ids.tolist(), bucket.tolist()))

    def sample(positive: int, excluded: set) -> List[int]:
        pool = pools[bucket_of.get(positive, 0)]
        negs: List[int] = []
        tries = 0
        while len(negs) < NEGATIVES:
            tries += 1
            if tries > 1000:  # the user tagged nearly the whole bucket with this tag: use the catalogue
                pool = ids
            c = int(pool[rng.integers(len(pool))])
            if c != positive and c not in excluded and c not in negs:
                negs.append(c)
        return negs

    return sample


def _chronological_split(user: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """0/1/2 (train/valid/test) per row; rows of one event share it; events ordered per user by time."""
    ev, first = np.unique(event, return_index=True)
    eu, et = user[first], time[first]
    order = np.lexsort((ev, et, eu))
    eu_sorted = eu[order]
    start = np.searchsorted(eu_sorted, eu_sorted, "left")
    count = np.searchsorted(eu_sorted, eu_sorted, "right") - start
    rank = np.arange(len(order)) - start
    n_test = np.maximum(1, np.floor(count * SPLIT_FRACTION)).astype(np.int64)
    n_valid = np.maximum(1, np.floor(count * SPLIT_FRACTION)).astype(np.int64)
    code_sorted = np.where(rank >= count - n_test, 2, np.where(rank >= count - n_test - n_valid, 1, 0))
    code_ev = np.empty(len(ev), dtype=np.int8)
    code_ev[order] = code_sorted
    return code_ev[np.searchsorted(ev, event)]


def _outputs(spec: Spec) -> List[Path]:
    return [paths.split_path(spec, s) for s in ("train", "valid", "test")] + [paths.side_table_path(spec, "movies")]


def prepare_rows(spec: Spec) -> None:
    """Build the canonical splits and movies.parquet into prepared_dir unless they are newer than the raw csv."""
    raw = paths.raw_dir(spec)
    for s in ("train", "valid", "test"):
        if s not in spec.data.splits:
            raise DataError(f"movielens adapter needs data.splits.{s}")
    inputs = [raw / f for f in SOURCES]
    outputs = _outputs(spec)
    missing = [p for p in inputs if not p.exists()]
    if missing:
        raise DataError(f"{missing[0]}: file not found (movielens raw_dir must hold {SOURCES})")
    newest_in = max(p.stat().st_mtime for p in inputs)
    if all(p.exists() and p.stat().st_mtime >= newest_in for p in outputs):
        log.info("movielens rows up to date in %s", outputs[0].parent)
    else:
        log.info("building movielens rows from %s", raw)
        tables = build_rows(raw)
        for path, name in zip(outputs, ("train", "valid", "test", "movies")):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            pq.write_table(tables[name], tmp, row_group_size=spec.data.row_group_size, compression="zstd")
            tmp.replace(path)
            log.info("wrote %s (%d rows)", path, tables[name].num_rows)
    validate(spec)
