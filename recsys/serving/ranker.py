"""Load a bundle once, score rows and rank requests: the one scoring function behind jobs/score.py and jobs/serve.py.

`Ranker.score_table` scores impression rows in the canonical row schema (what jobs/score.py streams);
`Ranker.rank` turns ranking requests into such rows (context repeated per candidate) and scores them in ONE model
call however many requests it is given (the server's micro-batches). Ids go through the bundle's vocabularies
(unseen -> row 0, the unseen row); a candidate outside the catalogue takes the catalogue features and texts it carries,
its texts encoded on the fly (recsys.serving.cold_text).

The model is built unsharded in this process (no process group) in the precision the bundle's spec names.
"""
from __future__ import annotations

import gc
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recsys import hardware
from recsys.data import arrowops
from recsys.data.mapping import Arrays, FeatureMapper, assemble
from recsys.errors import RecsysError
from recsys.logs import CONSOLE
from recsys.serving.bundle import Bundle, load_bundle
from recsys.serving.cold_text import ColdTextCache
from recsys.serving.quantize import quantize_tables
from recsys.serving.requests import request_columns, request_models

log = logging.getLogger("recsys.serving")

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_COLD_TEXT_CAPACITY = 4096
SINGLE_THREAD_MAX_ROWS = 512  # model calls up to this many rows run on one thread (see Ranker._forward)


class RequestError(RecsysError):
    """A request the bundle cannot score, with the field it concerns (`loc`)."""

    def __init__(self, loc: str, message: str):
        super().__init__(f"{loc}: {message}")
        self.loc, self.message = loc, message


def build_scoring_model(bundle: Bundle, spare_text_rows: int = 0) -> Tuple[torch.nn.Module, Dict[str, int]]:
    """The bundle's model on CPU in eval mode, with `spare_text_rows` free rows after every text table's own."""
    from recsys.models.model import SRFoundationModel
    from recsys.models.tables import table_rows

    from recsys.serving.bundle import TOKENS_PREFIX

    spec = bundle.spec
    text, tokens = {}, {}
    base_rows: Dict[str, int] = {}
    for key, arr in bundle.text_tables.items():
        padded = np.concatenate([arr, np.zeros((spare_text_rows,) + arr.shape[1:], arr.dtype)]) \
            if spare_text_rows else arr
        if key.startswith(TOKENS_PREFIX):  # mode hybrid: the token ids beside the frozen rows of the same table
            tokens[key[len(TOKENS_PREFIX):]] = padded
        else:
            base_rows[key] = arr.shape[0]
            text[key] = padded
    projection = None
    if "l0.text_projection.center" in bundle.weights:
        from recsys.models.encoding import projection_from_buffers

        projection = projection_from_buffers(bundle.weights["l0.text_projection.center"],
                                             bundle.weights["l0.text_projection.basis"])
    model = SRFoundationModel(spec, table_rows(spec, bundle.schema.table_rows), text, device=torch.device("cpu"),
                              text_projection=projection, text_tokens=tokens or None)
    model.l0.ebc = quantize_tables(model.l0.ebc, bundle.quantize)
    missing, unexpected = model.load_state_dict(bundle.weights, strict=False)
    missing = [k for k in missing if not k.startswith("l0.text_ebc.")]  # the text tables came from text.safetensors
    if missing or unexpected:
        raise RecsysError(f"{bundle.folder}: weights do not fit the bundle's spec (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    if bundle.quantize == "none":  # same fp32 weights in the fused inference kernel (see quantize_tables)
        model.l0.ebc = quantize_tables(model.l0.ebc, "fp32")
    if model.l0.text_ebc is not None:  # the text tables likewise (fp32 whatever the bundle's quantize: the cosines
        model.l0.text_ebc = quantize_tables(model.l0.text_ebc, "fp32")  # that carry cold items want full precision)
    model.eval()
    return model, base_rows


class Ranker:
    """A loaded bundle. Thread-safe: model calls are serialised by a lock (torch uses every core inside one)."""

    def __init__(self, bundle: Bundle, max_candidates: int = DEFAULT_MAX_CANDIDATES,
                 cold_text_capacity: int = DEFAULT_COLD_TEXT_CAPACITY, threads: Optional[int] = None):
        self.bundle = bundle
        self.spec = spec = bundle.spec
        if threads:
            torch.set_num_threads(int(threads))
        self.max_threads = torch.get_num_threads()
        hardware.keep_freed_memory()  # large activations reuse heap pages instead of faulting in fresh ones
        t0 = time.perf_counter()
        self.model, base_rows = build_scoring_model(bundle, cold_text_capacity if spec.text.mode != "none" else 0)
        self.mapper = FeatureMapper(spec, schema=bundle.schema, side_tables=bundle.catalogue)
        self.columns = request_columns(spec)
        self.max_candidates = int(max_candidates)
        self.RankRequest, self.Context, self.Candidate = request_models(spec, self.max_candidates)
        encoder_ref = bundle.encoder

        def make_encoder():
            from recsys.serving.encoder_ref import load_referenced_encoder

            return load_referenced_encoder(encoder_ref, spec.text.encoder)

        self.cold_text = ColdTextCache(spec, self.model, base_rows, cold_text_capacity,
                                       make_encoder if encoder_ref else None)
        self._lock = threading.Lock()
        self._domain_value = {d.name: d.match_value for d in spec.domains}
        from recsys.data.features import active_domains

        self._active = np.array(sorted(spec.domain_index(n) for n in active_domains(spec)), dtype=np.int64)
        self._dense_pos = {f.name: i for i, f in enumerate(f for f in spec.features_of("dense") if not f.bucketized)}
        self.item_key = next(iter(self.columns.candidate))
        # The bundle is ~360k long-lived Python objects (vocabularies, catalogue): a full garbage collection walks
        # them all, 170 ms on amazon-sr, landing inside some request. Frozen, they are never walked again.
        gc.collect()
        gc.freeze()
        log.info("bundle %s loaded in %.1fs (%s, quantize %s)", bundle.folder, time.perf_counter() - t0, spec.name,
                 bundle.quantize, extra=CONSOLE)

    @classmethod
    def load(cls, folder: Path, **kwargs) -> "Ranker":
        return cls(load_bundle(Path(folder)), **kwargs)

    # ------------------------------------------------------------------------------------------------ metadata
    def metadata(self) -> Dict[str, Any]:
        cols = self.columns
        m = self.bundle.manifest
        return {"name": self.spec.name, "bundle_sha256": self.bundle.bundle_hash,
                "spec_fingerprint": m.get("spec_fingerprint"), "training_commit": m.get("training_commit"),
                "quantize": self.bundle.quantize,
                "domains": [{"name": d.name, "kind": d.kind} for d in self.spec.domains],
                "context_fields": cols.context, "candidate_fields": cols.candidate,
                "candidate_optional_fields": cols.candidate_optional, "max_candidates": self.max_candidates,
                "features": [{"name": f.name, "kind": f.kind, "side": f.side, "column": f.column}
                             for f in self.spec.features]}

    # ------------------------------------------------------------------------------------------------ scoring
    def _forward(self, arrays: Arrays, owner: Optional[np.ndarray] = None) -> np.ndarray:
        # A call of few rows (one request) is a chain of small ops that intra-op threads only slow down, and the
        # server's event loop and the clients need the other cores then; large calls (micro-batches, score_table)
        # use every thread the Ranker was given.
        threads = 1 if len(arrays["labels"]) <= SINGLE_THREAD_MAX_ROWS else self.max_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        # `owner` (requests): each request's context features (user, histories, query) are looked up once and its
        # histories attended once per request, not once per candidate (recsys.data.batch.RequestGroups)
        batch = assemble(self.spec, self.mapper.with_counts(arrays), owner)
        with torch.inference_mode():
            return self.model(batch).logits.float().numpy().astype(np.float64)

    def score_table(self, table: pa.Table, batch_rows: int = 8192) -> np.ndarray:
        """Logits of impression rows (canonical row schema) in their order; NaN for rows the model does not score
        (a bad row as the loader defines it, or a domain the model is not trained for)."""
        n = table.num_rows
        out = np.full(n, np.nan, dtype=np.float64)
        if n == 0:
            return out
        reason = self.mapper.check(table)
        good = (reason == 0) & np.isin(self.mapper.domain_index(table), self._active)
        rows = np.nonzero(good)[0]
        for s in range(0, len(rows), batch_rows):
            r = rows[s:s + batch_rows]
            sub = table.take(pa.array(r))
            arrays = self.mapper.map(sub, r.astype(np.int64))
            with self._lock:
                out[r] = self._forward(arrays)
        return out

    # ------------------------------------------------------------------------------------------------ requests
    def parse(self, payload: Any):
        """A RankRequest from a dict (pydantic ValidationError on a bad one)."""
        return self.RankRequest.model_validate(payload)

    def rank(self, requests: Sequence[Any]) -> List[List[Dict[str, Any]]]:
        """Candidates of each request sorted by score (probability), best first: [{index, <item key>, score}]."""
        logits = self.score_requests(requests)
        out = []
        key = self.item_key
        for req, lg in zip(requests, logits):
            order = np.argsort(-lg, kind="stable")
            if req.top_k:
                order = order[:req.top_k]
            score = (1.0 / (1.0 + np.exp(-lg[order]))).tolist()
            cands = req.candidates
            out.append([{"index": i, key: getattr(cands[i], key), "score": s} for i, s in zip(order.tolist(), score)])
        return out

    def score_requests(self, requests: Sequence[Any]) -> List[np.ndarray]:
        """Logits per request, candidates in request order; all requests in one model call."""
        if not requests:  # no rows to group (RequestGroups numbers at least one request)
            return []
        context, candidates, owner, cold = self._request_tables(requests)
        arrays = self.mapper.map_requests(context, candidates, owner)
        with self._lock:
            self._apply_catalogue_misses(arrays, context, candidates, owner, cold)
            logits = self._forward(arrays, owner)
        bounds = np.cumsum([0] + [len(r.candidates) for r in requests])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _request_tables(self, requests: Sequence[Any]) -> Tuple[pa.Table, pa.Table, np.ndarray, Dict[str, list]]:
        """(context: one row per request, candidates: one row per candidate, owner: the request of each candidate,
        catalogue columns the candidates carry). The context is never repeated per candidate: the mapper maps it
        once per request (a history of 20 items is 20 values per request, not 2,000 for 100 candidates)."""
        cols = self.columns
        owner = np.repeat(np.arange(len(requests)), [len(r.candidates) for r in requests])
        context: Dict[str, pa.Array] = {self.spec.data.domain_column: pa.array(
            [self._domain_value[r.domain] for r in requests], pa.string())}
        for col, kind in cols.context.items():
            context[col] = _column([getattr(r.context, col) for r in requests], kind, f"context.{col}")
        cands = [c for r in requests for c in r.candidates]
        candidates = {col: _column([getattr(c, col) for c in cands], kind, f"candidates.{col}")
                      for col, kind in cols.candidate.items()}
        # catalogue columns carried by candidates (used only for candidates outside the catalogue)
        cold = {col: [getattr(c, col) for c in cands] for col in cols.candidate_optional}
        cold = {col: v for col, v in cold.items() if any(x is not None for x in v)}
        return pa.table(context), pa.table(candidates), owner, cold

    def _apply_catalogue_misses(self, arrays: Arrays, context: pa.Table, candidates: pa.Table, owner: np.ndarray,
                                cold: Dict[str, list]) -> None:
        """Features and texts of candidates the catalogue lacks, from what the request carries; new query texts."""
        spec, m = self.spec, self.mapper
        for st in spec.data.side_tables:
            if st.name not in m.side_keys:
                continue
            carried = [f for f in m.side_features(st.name) if f.column in cold]
            if not carried:
                continue
            miss = arrowops.lookup(candidates[st.join_on], m.side_keys[st.name]) < 0
            has = np.zeros(len(miss), dtype=bool)
            for f in carried:
                has |= np.array([v is not None for v in cold[f.column]])
            rows = np.nonzero(miss & has)[0]
            if not len(rows):
                continue
            side = {st.key: candidates[st.join_on].take(pa.array(rows))}
            for f in m.side_features(st.name):
                vals = [cold[f.column][i] for i in rows] if f.column in cold else [None] * len(rows)
                side[f.column] = _column(vals, "number" if f.kind == "dense" else "sparse", f"candidates.{f.column}")
            mapped = m.side_feature_arrays(st.name, pa.table(side))
            for f in m.side_features(st.name):
                if f.kind == "dense" and f.bucketized:
                    arrays["sp/" + f.name][rows] = mapped[f.name]
                elif f.kind == "dense":
                    arrays["dense"][rows, self._dense_pos[f.name]] = mapped[f.name]
                elif f.kind == "id":
                    arrays["id/" + f.name][rows] = mapped[f.name]
                else:
                    arrays["sp/" + f.name][rows] = mapped[f.name]
                    arrays["sp/" + f.name + "#len"][rows] = mapped[f.name + "#len"]
        if spec.text.mode == "none":
            return
        for f in spec.features_of("text"):
            if f.sequence:
                continue
            tt = next(t for t in spec.text.tables if t.name == f.text_table)
            current = arrays["txt/" + f.name]
            if tt.source == "rows" and f.column in context.column_names:  # a query text: once per request
                texts = context[f.column].to_pylist()
                first = np.searchsorted(owner, np.arange(len(texts)))  # each request's first candidate
                new = [r for r, t in enumerate(texts) if first[r] < len(owner) and current[first[r]] == 0
                       and t is not None and str(t).strip()]
                if new:
                    row_of = np.zeros(len(texts), dtype=current.dtype)
                    row_of[new] = self.cold_text.rows_for(tt.name, [str(texts[r]) for r in new])
                    fill = np.isin(owner, new)
                    current[fill] = row_of[owner[fill]]
                continue
            if tt.source == "rows":  # the candidate's own column value is its text
                texts = candidates[f.column].to_pylist()
            elif f.side == "item" and (tt.text or tt.key) in cold:
                texts = cold[tt.text or tt.key]
            else:
                continue
            rows = [i for i, t in enumerate(texts) if current[i] == 0 and t is not None and str(t).strip()]
            if rows:
                current[rows] = self.cold_text.rows_for(tt.name, [str(texts[i]) for i in rows])


def _column(values: list, kind: str, where: str) -> pa.Array:
    """Arrow column of request values: ids as strings (None -> ""), lists of strings, numbers as float64."""
    if kind == "number":
        arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        if not np.isfinite(arr).all() and where.startswith("context"):
            raise RequestError(where, "not a finite number")
        return pa.array(arr)
    if kind == "list":
        return pa.array([[str(x) for x in v] if v else [] for v in values], pa.list_(pa.string()))
    if kind == "sparse" and any(isinstance(v, list) for v in values):
        return pa.array([[str(x) for x in v] if isinstance(v, list) else ([] if v is None else [str(v)])
                         for v in values], pa.list_(pa.string()))
    return pa.array(["" if v is None else str(v) for v in values], pa.string())


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
