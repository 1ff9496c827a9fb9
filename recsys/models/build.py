"""Everything a model needs besides the spec: table sizes from the prepared vocabularies and the text tables."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from recsys.models.model import SRFoundationModel
from recsys.models.tables import table_rows
from recsys.spec.config import Spec


def text_tables_for(spec: Spec) -> Dict[str, np.ndarray]:
    """Text-table name -> vectors (mode llm) or hashed token ids (mode random) for every table a feature reads."""
    if spec.text.mode == "none":
        return {}
    from recsys.text import text_table_token_ids, text_table_vectors

    fetch = text_table_vectors if spec.text.mode == "llm" else text_table_token_ids
    return {name: fetch(spec, name) for name in spec.used_text_tables()}


def spec_table_rows(spec: Spec) -> Dict[str, int]:
    from recsys.data.prepare import table_num_rows

    return table_rows(spec, table_num_rows(spec))


def build_model(spec: Spec, device: Optional[torch.device] = None, rows: Optional[Dict[str, int]] = None,
                text_tables: Optional[Dict[str, np.ndarray]] = None) -> SRFoundationModel:
    """Embedding tables on `device` (default meta, to be materialised by DistributedModelParallel)."""
    return SRFoundationModel(spec, rows if rows is not None else spec_table_rows(spec),
                             text_tables if text_tables is not None else text_tables_for(spec), device=device)
