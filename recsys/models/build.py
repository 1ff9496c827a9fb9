"""Everything a model needs besides the spec: table sizes from the prepared vocabularies and the text tables."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch

from recsys.models.model import SRFoundationModel
from recsys.models.tables import table_rows
from recsys.spec.config import Spec

if TYPE_CHECKING:
    from recsys.text.frozen import TextProjection


def text_inputs_for(spec: Spec, projection: Optional["TextProjection"] = None
                    ) -> Tuple[Dict[str, np.ndarray], Optional["TextProjection"]]:
    """(text-table name -> rows, projection) for every table a feature reads: modes llm and hybrid, the frozen
    tables (projected once, stored, memory-mapped; `projection` given: a fine-tune keeps its pretrained one); mode
    random, hashed token ids and no projection. Mode hybrid's token ids: `text_token_tables_for`."""
    if spec.text.mode == "none":
        return {}, None
    if spec.text.frozen:
        from recsys.text.frozen import frozen_text_tables

        frozen = frozen_text_tables(spec, projection)
        return frozen.tables, frozen.projection
    return text_token_tables_for(spec), None


def text_token_tables_for(spec: Spec) -> Dict[str, np.ndarray]:
    """Text-table name -> hashed token ids [rows, random_max_tokens] for every table a feature reads."""
    from recsys.text import text_table_token_ids

    return {name: text_table_token_ids(spec, name) for name in spec.used_text_tables()}


def text_tokens_for(spec: Spec) -> Optional[Dict[str, np.ndarray]]:
    """What SRFoundationModel takes as `text_tokens`: mode hybrid's token ids (its frozen rows come from
    `text_inputs_for`), None in the other modes (mode random's token ids ARE its text tables)."""
    return text_token_tables_for(spec) if spec.text.mode == "hybrid" else None


def text_tables_for(spec: Spec) -> Dict[str, np.ndarray]:
    """Text-table name -> frozen rows (modes llm, hybrid) or hashed token ids (mode random) for every table a feature
    reads."""
    return text_inputs_for(spec)[0]


def spec_table_rows(spec: Spec) -> Dict[str, int]:
    """Rows per table from the resolved schema prepare wrote for `spec` (never from the prepared files)."""
    from recsys.data.resolved import schema_for

    return table_rows(spec, schema_for(spec).table_rows)


def build_model(spec: Spec, device: Optional[torch.device] = None, rows: Optional[Dict[str, int]] = None,
                text_tables: Optional[Dict[str, np.ndarray]] = None,
                text_projection: Optional["TextProjection"] = None) -> SRFoundationModel:
    """Embedding tables on `device` (default meta, to be materialised by DistributedModelParallel). Without
    `text_tables` they are read for the spec (with `text_projection` when given); mode hybrid also reads the token
    ids (they are derived from the prepared text tables alone, so a caller never has to supply them)."""
    if text_tables is None:
        text_tables, text_projection = text_inputs_for(spec, text_projection)
    return SRFoundationModel(spec, rows if rows is not None else spec_table_rows(spec), text_tables, device=device,
                             text_projection=text_projection, text_tokens=text_tokens_for(spec))
