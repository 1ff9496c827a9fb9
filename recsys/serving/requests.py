"""Ranking requests, typed from the spec: field names are the spec's column names.

A request is one domain, the context (user side and query side columns: user id, history, the query text of a search
domain) and a list of candidates (item side columns: the item id, and for items the catalogue lacks, the catalogue's
feature and text columns). The pydantic models are generated once per bundle with `extra="forbid"`, so an unknown,
missing or mistyped field is reported with its path (`candidates.3.item_id`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Type, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from recsys.spec.config import Spec

Id = Union[str, int]  # ids may be strings or integers in the data; both are compared as strings


@dataclass(frozen=True)
class RequestColumns:
    """Which spec columns a request carries, where, and of what kind ("id", "list", "number")."""

    context: Dict[str, str]  # column -> kind
    candidate: Dict[str, str]  # required per candidate (item ids, join keys)
    candidate_optional: Dict[str, str]  # catalogue columns a candidate outside the catalogue may carry
    required_context: Tuple[str, ...]
    side_text: Dict[str, Tuple[str, str]]  # candidate text column -> (text table, side table)


def request_columns(spec: Spec) -> RequestColumns:
    d = spec.data
    context: Dict[str, str] = {d.user_column: "id"}
    candidate: Dict[str, str] = {st.join_on: "id" for st in d.side_tables}
    optional: Dict[str, str] = {}
    side_text: Dict[str, Tuple[str, str]] = {}
    side_names = {st.name for st in d.side_tables}
    for f in spec.features:
        kind = {"id": "id", "sparse": "id", "sequence": "list", "dense": "number",
                "text": "list" if getattr(f, "sequence", False) else "id"}[f.kind]
        if f.kind == "sparse" and getattr(f, "separator", None) is None:
            kind = "sparse"
        source = getattr(f, "source", None)
        if source is not None:
            if f.side == "item":
                optional[f.column] = kind
            continue
        (candidate if f.side == "item" else context).setdefault(f.column, kind)
        if f.kind == "text" and f.side == "item" and not f.sequence:
            tt = next(t for t in spec.text.tables if t.name == f.text_table)
            if tt.source in side_names:
                col = tt.text or tt.key
                optional.setdefault(col, "id")
                side_text[col] = (tt.name, tt.source)
    for col in candidate:
        optional.pop(col, None)
    return RequestColumns(context=context, candidate=candidate, candidate_optional=optional,
                          required_context=(d.user_column,), side_text=side_text)


Number = Annotated[float, Field(allow_inf_nan=False)]
_TYPES = {"id": (Id, None), "list": (List[Id], None), "number": (Number, None),
          "sparse": (Union[Id, List[Id]], None)}


def _field(kind: str, required: bool) -> Tuple[Any, Any]:
    tp = _TYPES[kind][0]
    if required:
        return tp, ...
    return Optional[tp], None


def request_models(spec: Spec, max_candidates: int) -> Tuple[Type[BaseModel], Type[BaseModel], Type[BaseModel]]:
    """(RankRequest, Context, Candidate) pydantic models for `spec`."""
    cols = request_columns(spec)
    strict = ConfigDict(extra="forbid")
    context = create_model("Context", __config__=strict,
                           **{c: _field(k, c in cols.required_context) for c, k in cols.context.items()})
    cand = {c: _field(k, True) for c, k in cols.candidate.items()}
    cand.update({c: _field(k, False) for c, k in cols.candidate_optional.items()})
    candidate = create_model("Candidate", __config__=strict, **cand)
    domains = tuple(d.name for d in spec.domains)
    request = create_model(
        "RankRequest", __config__=strict,
        domain=(Literal[domains], ...),  # type: ignore[valid-type]
        context=(context, ...),
        candidates=(List[candidate], Field(..., min_length=1, max_length=max_candidates)),  # type: ignore
        top_k=(Optional[int], Field(None, ge=1)),
    )
    return request, context, candidate
