"""Streaming, sharded, resumable batch loader over a split's parquet file.

Reading: the file is cut into chunks = slices of at most `data.row_group_size` rows inside one parquet row group.
Row groups are read with string columns dictionary-encoded (ids are then looked up once per distinct value) and
kept in a small LRU cache bounded in bytes, so memory stays O(row group), never O(file) of Python objects.

Row validity: the first loader of a split checks every row (bad label, unknown domain, empty required id,
non-finite dense value, malformed list), writes `prepared_dir/quarantine/<split>.jsonl` (rewritten, not appended
twice, because the result is cached in `prepared_dir/index/`) and raises `DataError` when the bad fraction exceeds
`data.max_bad_fraction`. Kept rows = good rows of active domains (+ `data.row_filter` on train).

Order of one epoch (identical on every rank for a seed): chunks in a seeded permutation (or file order without
shuffle); the concatenated kept rows form the global stream of N rows. Rank r takes the contiguous range
[r*N/W, (r+1)*N/W) of it (each rank reads only its chunks):
  * train mode: every rank takes floor(N/W) rows -- at most W-1 rows at the end of the stream are dropped per
    epoch (they differ between epochs because the chunk order does);
  * eval mode (default for non-train splits): every rank takes ceil(N/W) rows, the missing ones are padding rows
    (a copy of a real row with row_id = -1) that the evaluator drops; no real row is dropped or repeated.
Within a rank, rows are shuffled inside windows of chunks (`train.shuffle_buffer_row_groups` of them, or by default as
many as the row-group cache holds: the whole file when it fits), then cut into
batches, so all ranks yield the same number of batches. The sequence is a pure function of
(seed, epoch, rank, world_size), which makes `state_dict` (epoch + batches yielded) an exact resume point.
The pipeline (torchdata.nodes, see `_pipeline`): work items are blocks of whole batches (about MAP_BLOCK rows,
one vectorised Arrow/numpy mapping each) -> mapped (`ParallelMapper` on `workers` threads, in order, for 2 or more;
a plain `Mapper` otherwise) -> `Unbatcher` -> each batch's tensors -> `PinMemory` (CUDA) -> `Prefetcher` (with
`prefetch` or `workers=1`: one worker is the Prefetcher's thread itself). The batch sequence does not depend on the
thread count, so the batch count in `state_dict` stays the exact resume point. The training loop uses
`train.loader_workers` (auto: 1 thread on CUDA, where the step leaves the CPU free; 0 on CPU, where the step's own
threads use every core) and keeps one loader for all its epochs. A train-mode loader keeps the mapped arrays of the
rows it has read when all its kept rows fit STORE_BYTES (`_MappedStore`, narrow integer types: MovieLens 14 MB,
amazon-sr 272 MB): before an epoch's first block it maps the epoch's rows not stored yet in file order (row-group
slices, no take) on the rank's torch threads and stores them, and every block gathers its rows from the store.
benchmarks/loader.py compares this loader with the one before it, side by side.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import operator
import re
import os
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data import arrowops, paths, schema
from recsys.data.hashing import hash_user_keys
from recsys.data.batch import Batch
from recsys.data.features import KjtOrder, active_domains
from recsys.data.mapping import REASONS, Arrays, FeatureMapper, assemble, drop_ids
from recsys.errors import DataError
from recsys.spec.config import Spec

log = logging.getLogger("recsys.data.loader")

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}
MAP_BLOCK = 65536  # rows mapped per vectorised call (a block is whole batches of about this many rows)
PREFETCH_BATCHES = 2  # batches the Prefetcher keeps ready ahead of the consumer
CACHE_BYTES = 512 << 20  # decoded row groups kept in memory (at least one is always kept)
DECIDE_ROWS = 4096  # rows whose stored size decides whether a loader's kept rows fit STORE_BYTES
STORE_BYTES = 512 << 20  # stored mapped rows a train-mode loader keeps for its later epochs (see _MappedStore)


_BUCKET = re.compile(r"^bucket\(\s*([^,\s()]+)\s*,\s*(\d+)\s*\)$")


def parse_row_filter(expr: str) -> Tuple[str, str, float, Optional[int]]:
    """`column op number`, or `bucket(column, N) op number`: the column's values hashed (stable, the same hash
    as GAUC's user keys) into N buckets, so a few-shot subset of users needs no numeric bucket column:
    `bucket(user_id, 100) < 10` keeps about 10% of the users, with all their rows."""
    left, _, rest = expr.strip().rpartition(" ")
    left, op = left.strip().rsplit(" ", 1) if " " in left.strip() else ("", left.strip())
    if not left or op not in _OPS:
        raise DataError(f"data.row_filter {expr!r}: expected `column op number` or `bucket(column, N) op number` "
                        f"with op in {sorted(_OPS)}")
    try:
        number = float(rest)
    except ValueError:
        raise DataError(f"data.row_filter {expr!r}: {rest!r} is not a number") from None
    m = _BUCKET.match(left)
    if m:
        if int(m.group(2)) < 1:
            raise DataError(f"data.row_filter {expr!r}: bucket count must be at least 1")
        return m.group(1), op, number, int(m.group(2))
    if "(" in left or " " in left:
        raise DataError(f"data.row_filter {expr!r}: expected `column op number` or `bucket(column, N) op number`")
    return left, op, number, None


def row_filter_values(path: Path, expr: str) -> Tuple[np.ndarray, str, float]:
    """(the filtered quantity per row of `path`, op, number) of a row filter."""
    col, op, num, buckets = parse_row_filter(expr)
    raw = pq.read_table(path, columns=[col])[col]
    if buckets is not None:
        return (hash_user_keys(arrowops.as_strings(raw.combine_chunks())) % buckets).astype(np.float64), op, num
    return raw.to_numpy(zero_copy_only=False).astype(np.float64), op, num


class _RowGroupReader:
    """Random access to row-group slices with a byte-bounded LRU of decoded (dictionary-encoded) row groups."""

    def __init__(self, path: Path, columns: List[str]):
        self.path = path
        self.pf = pq.ParquetFile(path)
        self.columns = columns
        pschema = self.pf.schema  # parquet leaf paths: dictionary-read every string leaf we use
        self.dict_cols = [c.path for c in pschema if c.path.split(".")[0] in columns and
                          c.physical_type == "BYTE_ARRAY"]
        self.cache: "collections.OrderedDict[int, pa.Table]" = collections.OrderedDict()
        self.rg_rows = [self.pf.metadata.row_group(i).num_rows for i in range(self.pf.num_row_groups)]
        self.rg_start = np.concatenate([[0], np.cumsum(self.rg_rows)]).astype(np.int64)
        self.rg_bytes = [self._decoded_bytes(i) for i in range(self.pf.num_row_groups)]

    def _decoded_bytes(self, rg: int) -> int:
        """Upper estimate of a row group's decoded size from the parquet metadata (no read): 8 bytes per value of
        every column read (a dictionary index, a number, or an offset) and 8 per row of each column. Measured on
        amazon-sr's train row groups: 139 / 78 MB estimated, 46 / 23 MB decoded."""
        meta = self.pf.metadata.row_group(rg)
        cols = set(self.columns)
        values = sum(meta.column(i).num_values for i in range(meta.num_columns)
                     if meta.column(i).path_in_schema.split(".")[0] in cols)
        return 8 * (values + meta.num_rows * len(cols))

    def row_group(self, rg: int) -> pa.Table:
        if rg in self.cache:
            self.cache.move_to_end(rg)
            return self.cache[rg]
        pf = pq.ParquetFile(self.path, read_dictionary=self.dict_cols)
        t = pf.read_row_group(rg, columns=self.columns)
        self.cache[rg] = t
        while len(self.cache) > 1 and sum(x.nbytes for x in self.cache.values()) > CACHE_BYTES:
            self.cache.popitem(last=False)
        return t

    def slice(self, rg: int, start: int, length: int) -> pa.Table:
        return self.row_group(rg).slice(start, length)


class BatchLoader:
    def __init__(self, spec: Spec, split: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, with_row_filter: bool = True,
                 eval_mode: Optional[bool] = None, prefetch: bool = False, workers: int = 0,
                 pin_memory: bool = False, kjt_order: Optional[KjtOrder] = None):
        """`kjt_order`: the feature order of the batches' KJTs (the one the model's sharded embedding modules read,
        `recsys.train.sharding.pin_kjt_order`, so that they need not permute each batch); None: the spec's."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.spec, self.split, self.batch_size = spec, split, int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last, self.prefetch = shuffle, drop_last, prefetch
        self.workers, self.pin_memory = int(workers), bool(pin_memory)
        self.kjt_order = kjt_order
        self.eval_mode = (split != "train") if eval_mode is None else eval_mode
        self.path = paths.split_path(spec, split)
        self.columns = list(schema.row_columns(spec, split, with_row_filter))
        schema.check_file(self.path, schema.row_columns(spec, split, with_row_filter))
        self.mapper = FeatureMapper(spec)
        self.reader = _RowGroupReader(self.path, self.columns)
        rows = int(self.reader.rg_start[-1])
        step = spec.data.row_group_size
        self.chunks: List[Tuple[int, int, int]] = [(rg, s, min(step, n - s)) for rg, n in
                                                   enumerate(self.reader.rg_rows) for s in range(0, n, step)]
        reason, domain = self._validity()
        self.bad_row_counts: Dict[str, int] = {r: int((reason == i).sum()) for i, r in enumerate(REASONS) if i
                                               and (reason == i).any()}
        active = [spec.domain_index(n) for n in active_domains(spec)]
        keep = (reason == 0) & np.isin(domain, active)
        if spec.data.row_filter and with_row_filter and split == "train":
            vals, op, num = row_filter_values(self.path, spec.data.row_filter)
            keep &= _OPS[op](vals, num)
        starts = np.array([self.reader.rg_start[rg] + s for rg, s, _ in self.chunks], dtype=np.int64)
        # kept global row numbers of every chunk
        self.kept: List[np.ndarray] = [np.nonzero(keep[s:s + ln])[0] + s for s, (_, _, ln) in zip(starts, self.chunks)]
        self.num_rows = int(sum(len(k) for k in self.kept))
        self.rows_per_rank = (math.ceil(self.num_rows / world_size) if self.eval_mode
                              else self.num_rows // world_size)
        self.epoch = 0
        self.batches_yielded = 0
        self.window_chunks = spec.train.shuffle_buffer_row_groups  # None: as many as the row-group cache holds
        self._dropout = not self.eval_mode and any(t.id_dropout > 0 for t in spec.tables)
        # train mode iterates epochs over the same rows: keep them mapped when they fit (eval loaders read once)
        self._store = None if self.eval_mode else _MappedStore(
            rows, self.num_rows, self.mapper.value_bounds(), self.mapper.side_derived())
        log.info("%s: %d rows, %d kept, %d per rank, %d chunks, bad %s", self.path, rows, self.num_rows,
                 self.rows_per_rank, len(self.chunks), self.bad_row_counts or "none")
        if self.bad_row_counts:  # skipped rows are news the user must see, not only a line in the log file
            log.warning("%s: skipped bad rows %s (listed in the prepared folder's quarantine/)", self.path,
                        self.bad_row_counts)

    # -- validity pre-pass (cached) ------------------------------------------------------------------------
    def _validity(self) -> Tuple[np.ndarray, np.ndarray]:
        st = self.path.stat()
        fp = hashlib.sha256(json.dumps([str(self.path), st.st_size, st.st_mtime_ns, self.columns,
                                        [d.match_value for d in self.spec.domains],
                                        self.spec.data.model_dump(include={"domain_column", "label_column",
                                                                           "user_column", "ignore_domains"}),
                                        [f.model_dump() for f in self.spec.features]],
                                       sort_keys=True).encode()).hexdigest()[:16]
        cache = paths.prepared_dir(self.spec) / "index" / f"{self.split}-{fp}.npz"
        if cache.exists():
            z = np.load(cache)
            reason, domain = z["reason"], z["domain"]
        else:
            parts_r, parts_d = [], []
            for rg in range(len(self.reader.rg_rows)):
                t = self.reader.row_group(rg)
                parts_r.append(self.mapper.check(t))
                parts_d.append(self.mapper.domain_index(t).astype(np.int16))
            reason = np.concatenate(parts_r) if parts_r else np.zeros(0, np.int16)
            domain = np.concatenate(parts_d) if parts_d else np.zeros(0, np.int16)
            if self.rank == 0:
                self._write_quarantine(reason)
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, reason=reason, domain=domain)
                tmp.replace(cache)
        bad = int((reason > 0).sum())
        if len(reason) and bad / len(reason) > self.spec.data.max_bad_fraction:
            summary = ", ".join(f"{REASONS[i]}={int((reason == i).sum())}" for i in range(1, len(REASONS))
                                if (reason == i).any())
            raise DataError(f"{self.path}: {bad}/{len(reason)} bad rows ({summary}) exceed data.max_bad_fraction="
                            f"{self.spec.data.max_bad_fraction}; see {paths.quarantine_path(self.spec, self.split)}")
        return reason, domain

    def _write_quarantine(self, reason: np.ndarray) -> None:
        qp = paths.quarantine_path(self.spec, self.split)
        bad = np.nonzero(reason)[0]
        if not len(bad):
            if qp.exists():
                qp.unlink()
            return
        qp.parent.mkdir(parents=True, exist_ok=True)
        with open(qp, "w") as fh:
            for r in bad:
                fh.write(json.dumps({"file": str(self.path), "row": int(r), "reason": REASONS[reason[r]]}) + "\n")
        log.warning("%s: %d bad rows quarantined in %s", self.path, len(bad), qp)

    # -- epoch plan ----------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_yielded = epoch, 0

    def __len__(self) -> int:
        n = self.rows_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "world_size", "batch_size"):
            if k in state and state[k] != getattr(self, k):
                raise DataError(f"loader state has {k}={state[k]}, this loader has {getattr(self, k)}")
        self.epoch, self.batches_yielded = int(state["epoch"]), int(state["batches_yielded"])

    def _windows(self) -> List[np.ndarray]:
        """Global row numbers of this rank, grouped in shuffle windows, each already in yield order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.chunks)) if self.shuffle else np.arange(len(self.chunks))
        lo = self.rank * (math.ceil(self.num_rows / self.world_size) if self.eval_mode
                          else self.num_rows // self.world_size)
        hi = min(lo + self.rows_per_rank, self.num_rows)
        windows, cur, pos, groups = [], [], 0, set()
        for c in order:
            k = self.kept[c]
            a, b = max(lo, pos), min(hi, pos + len(k))
            pos += len(k)
            if a >= b:
                continue
            rg = self.chunks[c][0]
            if cur and self._window_full(len(cur), groups, rg):
                windows.append(np.concatenate(cur))
                cur, groups = [], set()
            cur.append(k[a - (pos - len(k)): b - (pos - len(k))])
            groups.add(rg)
        if cur:
            windows.append(np.concatenate(cur))
        wrng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        if self.shuffle:
            windows = [w[wrng.permutation(len(w))] for w in windows]
        pad = self.rows_per_rank - (hi - lo if hi > lo else 0)
        if pad > 0:  # eval padding: copies of a real row, flagged by a negative id (-1 - row)
            real = next((w[-1] for w in reversed(windows) if len(w)), None)
            if real is None:
                real = next(k[0] for k in self.kept if len(k))
            windows.append(np.full(pad, -1 - real, dtype=np.int64))
        return windows

    def _window_full(self, chunks: int, groups: set, rg: int) -> bool:
        """Whether a shuffle window of `chunks` chunks from row groups `groups` must close before a chunk of `rg`."""
        if self.window_chunks is not None:
            return chunks >= self.window_chunks
        if rg in groups:
            return False
        return sum(self.reader.rg_bytes[g] for g in groups) + self.reader.rg_bytes[rg] > CACHE_BYTES

    # -- reading -------------------------------------------------------------------------------------------
    def _read_rows(self, rows: np.ndarray) -> Arrays:
        """Map global rows (negative = padding copy of row -1-r) in the given order; rows already mapped in an
        earlier epoch come from the loader's store of mapped rows instead."""
        real = np.where(rows < 0, -1 - rows, rows)
        out = self._store.read(real, self._map_rows) if self._store is not None else self._map_rows(real)
        if (rows < 0).any():
            out["row_id"] = np.where(rows < 0, -1, out["row_id"])
        return out

    def _map_rows(self, real: np.ndarray) -> Arrays:
        """Read and map global rows (all real) in the given order."""
        rg = np.searchsorted(self.reader.rg_start, real, side="right") - 1
        groups = np.unique(rg)
        # The row groups side by side (a zero-copy concatenation), then ONE take in the requested (shuffled) order,
        # and ONE map call on that compact Arrow data. A take per row group followed by a take that restores the
        # order copied the list columns twice: on MovieLens (blocks over 2 row groups) it was 20 ms a block against
        # 9.5 ms for the one take, ~10% of the epoch. Reordering the mapped arrays instead (padded histories, text
        # rows) cost ~45% of the loader. The block's row groups are held together for the take; they are at most
        # its shuffle window's, which the window sizing already keeps resident in the row-group cache.
        tables = [self.reader.row_group(int(g)) for g in groups]
        offset = np.cumsum([0] + [t.num_rows for t in tables[:-1]]).astype(np.int64)
        local = real - self.reader.rg_start[rg] + offset[np.searchsorted(groups, rg)]
        table = (tables[0] if len(tables) == 1 else pa.concat_tables(tables)).take(pa.array(local))
        return self.mapper.map(table, real)

    def _map_in_file_order(self, rows: np.ndarray) -> Arrays:
        """Read and map ascending global rows: each run of consecutive rows inside a row group is a zero-copy slice
        of it, so the rows need no Arrow take (the list columns' copy: about a third of mapping a shuffled
        amazon-sr block) and are mapped in file order (dictionary lookups and history gathers walk memory forwards).
        Rows too scattered for slices to pay (more than one run per 256 rows) are taken, in file order."""
        rg = np.searchsorted(self.reader.rg_start, rows, side="right") - 1
        cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(rg) != 0)) + 1
        if len(cut) > len(rows) // 256 + 8:
            return self._map_rows(rows)
        starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(rows)]])
        parts = [self.reader.slice(int(rg[a]), int(rows[a] - self.reader.rg_start[rg[a]]), int(e - a))
                 for a, e in zip(starts, ends)]
        # the store rebuilds the side-table arrays from the stored side rows: not mapped here only to be dropped
        return self.mapper.map(parts[0] if len(parts) == 1 else pa.concat_tables(parts), rows,
                               side_rows_only=self._store is not None and bool(self._store.derived))

    def _order(self) -> np.ndarray:
        """This rank's global rows (negative = eval padding) in yield order: batch b is rows [b*B, (b+1)*B)."""
        windows = self._windows()
        return np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)

    def _blocks(self, start_batch: int) -> Iterator[Tuple[int, int, np.ndarray]]:
        """Work items (first batch, batches to skip, rows): runs of whole batches of about MAP_BLOCK rows, so each
        is mapped by ONE vectorised call however small the batch; a resume starts inside the block holding
        `start_batch` and skips its earlier batches."""
        B, total = self.batch_size, len(self)
        limit = total * B if self.drop_last else self.rows_per_rank  # rows past the last batch are never read
        order = self._order()[:limit]
        per_block = max(1, MAP_BLOCK // B)
        first = start_batch - start_batch % per_block
        if self._store is not None:  # the rows this epoch reads that are not stored yet, mapped in file order first
            self._store.fill(order[first * B:], self._map_in_file_order)
        for b0 in range(first, total, per_block):
            yield b0, max(0, start_batch - b0), order[b0 * B: (b0 + per_block) * B]

    def _map_block(self, item: Tuple[int, int, np.ndarray]) -> List[Tuple[int, Arrays]]:
        """Read and map one block (Arrow/numpy, mostly without the GIL), cut into (batch index, arrays) views."""
        b0, skip, rows = item
        arrays = self._read_rows(rows)
        B = self.batch_size
        return [(b0 + i, {k: v[i * B:(i + 1) * B] for k, v in arrays.items()})
                for i in range(skip, -(-len(rows) // B))]

    def _to_batch(self, item: Tuple[int, Arrays]) -> Tuple[int, Batch]:
        """One batch's id dropout and tensors, made when the batch is next. Assembling a whole block's batches at
        once kept all their fresh arrays alive together, so the allocator could not reuse freed pages for the next
        block (the padding gathers page-faulted in new memory): MovieLens epochs took 1.5-2x as long as the loader
        before torchdata.nodes (benchmarks/loader.py, docs/cpu_speed.md)."""
        b, part = item
        if self._dropout:  # seeded by (seed, epoch, rank, batch): a resumed epoch drops the same ids
            part = drop_ids(self.spec, part, np.random.default_rng([self.seed, self.epoch, self.rank, b, 2]))
        return b, assemble(self.spec, self.mapper.with_counts(part), order=self.kjt_order)

    def _pipeline(self, start_batch: int) -> "tn.BaseNode":
        """torchdata.nodes graph of one epoch from `start_batch`: blocks -> mapped on `workers` threads (in order)
        -> batches -> pinned (CUDA) -> prefetched. The order is fixed by _blocks, so the result is the same
        sequence whatever the thread count, and a batch count is an exact resume point."""
        import torchdata.nodes as tn

        node: tn.BaseNode = tn.IterableWrapper(self._blocks(start_batch))
        if self.workers > 1:
            node = tn.ParallelMapper(node, self._map_block, num_workers=self.workers, in_order=True, method="thread")
        else:
            # one worker is the Prefetcher's own thread (everything upstream of it runs there): a ParallelMapper
            # of one thread would add two more threads and two queue hand-offs per block to the same work
            node = tn.Mapper(node, self._map_block)
        node = tn.Mapper(tn.Unbatcher(node), self._to_batch)  # upstream of the Prefetcher: in its thread
        if self.pin_memory:
            node = tn.PinMemory(node)
        if self.prefetch or self.workers == 1:
            node = tn.Prefetcher(node, prefetch_factor=PREFETCH_BATCHES)
        return node

    def __iter__(self) -> Iterator[Batch]:
        import torchdata.nodes as tn

        loader = tn.Loader(self._pipeline(self.batches_yielded), restart_on_stop_iteration=False)
        try:
            for b, batch in loader:
                self.batches_yielded = b + 1
                yield batch
        finally:
            _shutdown(loader)
        self.batches_yielded = 0  # epoch finished: the next iteration starts it again (call set_epoch)



FILL_THREADS_MAX = 4  # each thread holds one mapped piece in flight (amazon-sr: ~100 MB of temporaries)


def fill_threads() -> int:
    """Threads that map and store an epoch's new rows before its first batch (`_MappedStore.fill`): torch's
    intra-op threads, i.e. the cores this rank's training step uses, at most FILL_THREADS_MAX. The step waits for
    the fill, so those cores are otherwise idle then; on 2 ranks of a 2-core machine each rank fills on its one core.
    The cap bounds the fill's transient memory on a many-core rank (64 threads would hold ~6 GB of pieces)."""
    return max(1, min(torch.get_num_threads(), FILL_THREADS_MAX))


class _MappedStore:
    """The mapped arrays of the rows a train-mode loader has read, so that a later epoch gathers a row (one numpy
    take per array) instead of an Arrow take plus the mapping (dictionary lookups, history padding, text rows).

    Before an epoch's first block, `fill` maps the epoch's rows not stored yet in file order (row-group slices: no
    Arrow take) and stores them, on `fill_threads()` threads; every block then gathers. On 2 or more ranks an
    epoch's rows change with the chunk order, so a later epoch maps only the rows its rank had not read before (a
    block with some rows missing was mapped whole and written again: MovieLens on 2 instances ran at 0.91x the loader
    before the store). Rows get slots in the order they are stored, so storing is one contiguous copy per array (a
    scatter to file-order slots cost about as much as mapping). Integer arrays are kept in the narrowest integer type
    of their range, which the mapper knows without reading a value (`FeatureMapper.value_bounds`: table rows, list
    widths, text rows; the row ids' range is the split's): embedding rows of tables under 65536 rows fit 2 bytes.
    (Narrowing to the values seen so far cost a min/max pass per array per block plus re-typing the whole store when
    a later block needed more: a third of storing amazon-sr's first epoch.) A key without a known range keeps its
    mapped type. Arrays read from a side table are not stored: each row's side-table row is, and a read gathers them
    from the side table's arrays (`FeatureMapper.side_derived`). amazon-sr's 836 mapped bytes a row are 152 stored,
    which lets its train split fit STORE_BYTES. Gathered arrays keep the stored types (same values): `assemble` makes
    every index tensor int64 anyway, and widening each gathered array first cost ~0.5 s of a 5 s amazon-sr epoch.
    Whether the store is used is decided on its first DECIDE_ROWS rows: all kept rows at their stored bytes per row
    must fit STORE_BYTES, else the loader maps every block every epoch.

    Mapping is a pure function of the row (the id dropout of train batches comes after, per batch), so a gathered row
    is the row the mapping would give; gathering copies, so a consumer that changes its batch in place cannot change
    the store. Stores happen under a lock (`workers` >= 2 map blocks concurrently) and a row's slot is published only
    after its values are written, so a gather never reads a slot being filled."""

    def __init__(self, rows_total: int, capacity: int, bounds: Optional[Dict[str, Tuple[int, int]]] = None,
                 derived: Optional[Dict[str, Tuple[str, np.ndarray]]] = None):
        self.slot = np.full(rows_total, -1, dtype=np.int64)  # global row -> its slot, -1 = not stored
        self.capacity = capacity  # the kept rows: every row a train epoch can read
        # inclusive value range of each integer array (the mapper's, plus the row ids'): its stored type
        self.bounds = {**(bounds or {}), "row_id": (0, max(rows_total - 1, 0))}
        # arrays not stored but rebuilt from a stored row key (FeatureMapper.side_derived), tables narrowed too
        self.derived = {k: (row_key, table.astype(_stored_type(table, self.bounds.get(k)), copy=False))
                        for k, (row_key, table) in (derived or {}).items()}
        self.used = 0
        self.arrays: Optional[Arrays] = None  # slot-indexed, narrow integer types
        self.enabled = capacity > 0
        self.rows_gathered = self.rows_mapped = 0  # counts, for tests and profiling
        self._lock = threading.Lock()

    def read(self, real: np.ndarray, map_rows) -> Arrays:
        """Mapped arrays of global rows `real` (all real, distinct) in their order: stored rows gathered, the others
        mapped by `map_rows(rows)` and stored."""
        if not self.enabled or self.arrays is None:
            out = map_rows(real)
            with self._lock:
                self.rows_mapped += len(real)
            self.put(real, out)
            return out
        slot = self.slot[real]
        missing = np.flatnonzero(slot < 0)
        if len(missing) == len(real):
            out = map_rows(real)
        else:
            out = {k: np.take(v, slot, axis=0) for k, v in self.arrays.items()}
            out.update({k: np.take(table, out[row_key], axis=0) for k, (row_key, table) in self.derived.items()
                        if row_key in out})
            if len(missing):  # mapped values fit the stored types (their declared ranges)
                new = map_rows(real[missing])
                for k, v in new.items():
                    out[k][missing] = v
        with self._lock:  # blocks are read on several threads with workers >= 2
            self.rows_gathered += len(real) - len(missing)
            self.rows_mapped += len(missing)
        if len(missing):
            self.put(real[missing], out if len(missing) == len(real) else {k: v[missing] for k, v in out.items()})
        return out

    def fill(self, rows: np.ndarray, map_in_file_order) -> None:
        """Map and store the rows of `rows` (an epoch's, all real) not stored yet, in file order and pieces of
        MAP_BLOCK rows, before the epoch's first block: its blocks then only gather. Mapping a shuffled block's rows
        needs an Arrow take of them (amazon-sr: ~40 of ~115 ms a block); in file order they are slices, and storing
        plus gathering them costs less than that take (the first epoch was 0.6-0.8x the loader before the store
        when each block was mapped and then stored). The epoch's first batch waits for this (amazon-sr on one
        rank: about two seconds), once per row and loader."""
        if not self.enabled or not len(rows):
            return
        todo = np.zeros(len(self.slot), dtype=bool)
        todo[rows] = True
        todo &= self.slot < 0
        need = np.flatnonzero(todo)
        # an undecided store first maps a small piece: when the rows prove not to fit, only that piece was mapped
        # for nothing (the blocks then map themselves, as without a store)
        bounds = list(range(0, len(need), MAP_BLOCK)) + [len(need)]
        if self.arrays is None and len(need) > DECIDE_ROWS:
            bounds.insert(1, DECIDE_ROWS)
        pieces = [need[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

        def map_and_put(piece: np.ndarray) -> None:
            out = map_in_file_order(piece)
            with self._lock:  # the counters are kept under the lock everywhere (read() runs on worker threads)
                self.rows_mapped += len(piece)
            self.put(piece, out)

        while pieces and self.arrays is None and self.enabled:  # the first piece decides (types, whether it fits)
            map_and_put(pieces.pop(0))
        if not self.enabled or not pieces:
            return
        threads = min(fill_threads(), len(pieces))
        if threads <= 1:
            for piece in pieces:
                map_and_put(piece)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="recsys-fill") as pool:
            list(pool.map(map_and_put, pieces))  # consumed: re-raises a piece's error here

    def put(self, real: np.ndarray, arrays: Arrays) -> None:
        """Store rows `real` (none stored yet) with their mapped arrays."""
        n = len(real)
        if not self.enabled or not n:
            return
        arrays = {k: v for k, v in arrays.items() if k not in self.derived or self.derived[k][0] not in arrays}
        with self._lock:
            if self.arrays is None:  # the first block decides, whatever thread maps it
                stored = {k: _stored_type(v, self.bounds.get(k)) for k, v in arrays.items()}
                per_row = sum(stored[k].itemsize * (v[0].size if n else 0) for k, v in arrays.items())
                need = per_row * self.capacity
                if need > STORE_BYTES:
                    self.enabled = False
                    log.info("mapped rows need %.0f MB > %d MB: mapping every epoch", need / 2**20,
                             STORE_BYTES >> 20)
                    return
                _check_bounds(arrays, stored, self.bounds)  # a wrong range would wrap values silently
                self.arrays = {k: np.empty((self.capacity,) + v.shape[1:], dtype=stored[k])
                               for k, v in arrays.items()}
            if self.used + n > self.capacity:  # only if rows were stored twice (an abandoned epoch's last block)
                return
            s = self.used  # slots [s, s + n) are this call's: concurrent puts copy into their own slots
            self.used += n
            stored = self.arrays
        for k, v in arrays.items():  # outside the lock: the fill's threads copy (and fault in fresh pages) at once
            stored[k][s:s + n] = v
        with self._lock:
            self.slot[real] = np.arange(s, s + n)  # published last: the values are in place


def _stored_type(v: np.ndarray, bounds: Optional[Tuple[int, int]]) -> np.dtype:
    """The narrowest integer type holding the inclusive range `bounds` of integer array `v`; `v`'s own type for
    other arrays, unknown ranges and ranges no narrower type holds."""
    if v.dtype.kind not in "iu" or bounds is None:
        return v.dtype
    lo, hi = bounds
    for t in (np.uint8, np.uint16, np.uint32) if lo >= 0 else (np.int8, np.int16, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return np.dtype(t) if np.dtype(t).itemsize < v.dtype.itemsize else v.dtype
    return v.dtype


def _check_bounds(arrays: Arrays, stored: Dict[str, np.dtype], bounds: Dict[str, Tuple[int, int]]) -> None:
    """Raise when a narrowed array of the store's first block leaves its declared range (a mapper defect)."""
    for k, v in arrays.items():
        if stored[k] != v.dtype and v.size:
            lo, hi = bounds[k]
            if int(v.min()) < lo or int(v.max()) > hi:
                raise AssertionError(f"mapped array {k!r} holds values in [{int(v.min())}, {int(v.max())}], "
                                     f"outside its declared range [{lo}, {hi}] (FeatureMapper.value_bounds)")


def _shutdown(loader) -> None:
    """Stop the pipeline's background threads now (a consumer may stop early, e.g. at train.max_steps); torchdata
    would only stop them when the nodes are garbage collected. Each node keeps its running iterator in `_it`."""
    node = getattr(loader, "root", None)
    while node is not None:
        it, depth = getattr(node, "_it", None), 0
        while it is not None and depth < 4:
            stop = getattr(it, "_shutdown", None)
            if callable(stop):
                stop()
            it, depth = getattr(it, "_it", None), depth + 1
        node = getattr(node, "source", None)
