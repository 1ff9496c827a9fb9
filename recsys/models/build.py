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
    """(text-table name -> rows, projection) for every table a feature reads: mode llm, the frozen tables
    (projected once, stored, memory-mapped; `projection` given: a fine-tune keeps its pretrained one); mode random,
    hashed token ids and no projection."""
    if spec.text.mode == "none":
        return {}, None
    if spec.text.mode == "llm":
        from recsys.text.frozen import frozen_text_tables

        frozen = frozen_text_tables(spec, projection)
        return frozen.tables, frozen.projection
    from recsys.text import text_table_token_ids

    return {name: text_table_token_ids(spec, name) for name in spec.used_text_tables()}, None


def text_tables_for(spec: Spec) -> Dict[str, np.ndarray]:
    """Text-table name -> frozen rows (mode llm) or hashed token ids (mode random) for every table a feature reads."""
    return text_inputs_for(spec)[0]


def spec_table_rows(spec: Spec) -> Dict[str, int]:
    """Rows per table from the resolved schema prepare wrote for `spec` (never from the prepared files)."""
    from recsys.data.resolved import schema_for

    return table_rows(spec, schema_for(spec).table_rows)


def build_model(spec: Spec, device: Optional[torch.device] = None, rows: Optional[Dict[str, int]] = None,
                text_tables: Optional[Dict[str, np.ndarray]] = None,
                text_projection: Optional["TextProjection"] = None) -> SRFoundationModel:
    """Embedding tables on `device` (default meta, to be materialised by DistributedModelParallel). Without
    `text_tables` they are read for the spec (with `text_projection` when given)."""
    if text_tables is None:
        text_tables, text_projection = text_inputs_for(spec, text_projection)
    return SRFoundationModel(spec, rows if rows is not None else spec_table_rows(spec), text_tables, device=device,
                             text_projection=text_projection)
