"""Spec -> TorchRec embedding table configs. Pure: no torch.distributed, testable on its own."""
from __future__ import annotations

from typing import Dict, List

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from recsys.data.features import kjt_keys, table_of_key, text_kjt_keys
from recsys.errors import SpecError
from recsys.spec.config import Spec

_TEXT_DATA_TYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16}
TEXT_TABLE_PREFIX = "text_"


def text_table_name(text_table: str) -> str:
    """Embedding-table name of a frozen text table: prefixed, because the planner's constraints and the plan are
    keyed by table name across all embedding modules, and a text table may share its name with an id table."""
    return TEXT_TABLE_PREFIX + text_table


def table_rows(spec: Spec, vocab_rows: Dict[str, int]) -> Dict[str, int]:
    """Rows per table: `num_buckets` where the spec gives one (hash tables, or a cap/override for vocab tables),
    else the prepared vocabulary size (which already counts row 0 for unseen ids)."""
    out: Dict[str, int] = {}
    buckets = spec.bucket_tables()
    for t in spec.tables:
        if t.name in buckets:
            out[t.name] = buckets[t.name]
        elif t.num_buckets is not None:
            out[t.name] = t.num_buckets
        elif t.name in vocab_rows:
            out[t.name] = vocab_rows[t.name]
        else:
            raise SpecError(f"tables.{t.name}: vocabulary size unknown; run jobs/prepare_data.py or set num_buckets")
    return out


def embedding_bag_configs(spec: Spec, rows: Dict[str, int]) -> List[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table that some feature reads, its feature_names in KJT key order.

    Tables nobody reads are skipped (a spec may declare a table for a future domain). Every table SUM-pools, also
    one whose spec says `pooling: mean`: the model divides by the bag length itself, and only for the keys whose bags
    can hold several values (`UserQueryItemEncoder`; a one-value bag's sum is its mean). FBGEMM's CPU kernel for
    mean pooling is 4-6x slower than for sum (on its own, 4,096 one-value bags of 16 wide rows: 0.85 vs 0.23 ms;
    the six keys of the peers' configuration: 4.8 vs 0.7 ms), and one division on [B, dim] costs far less."""
    key_table = table_of_key(spec)
    configs: List[EmbeddingBagConfig] = []
    for t in spec.tables:
        names = [k for k in kjt_keys(spec) if key_table[k] == t.name]
        if not names:
            continue
        configs.append(
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.dim,
                num_embeddings=rows[t.name],
                feature_names=names,
                pooling=PoolingType.SUM,  # means are made by the model (see the docstring)
                init_fn=_normal_init(t.init_std) if t.init_std is not None else None,
            )
        )
    return configs


def _normal_init(std: float):
    import torch

    def init(weight: "torch.Tensor") -> "torch.Tensor":
        return torch.nn.init.normal_(weight, mean=0.0, std=std)

    return init


def text_table_configs(spec: Spec, text_rows: Dict[str, int], dim: int) -> List[EmbeddingBagConfig]:
    """One frozen EmbeddingBagConfig per text table some text feature reads (mode llm): `text_rows[name]` rows
    (row 0 = no text) of the projected width `dim`, stored in `text.dtype`. Every key holds exactly one row
    (histories have one key per position), so SUM pooling returns the row itself."""
    keys = text_kjt_keys(spec)
    by_name = {f.name: f for f in spec.features_of("text")}
    declared = {t.name for t in spec.tables}
    configs: List[EmbeddingBagConfig] = []
    for name in spec.used_text_tables():
        table = text_table_name(name)
        if table in declared:
            raise SpecError(f"tables.{table}: the name is taken by the frozen table of text table '{name}'; "
                            f"rename the embedding table")
        names = [k for k in keys if by_name[k.split("__pos")[0]].text_table == name]
        configs.append(EmbeddingBagConfig(name=table, embedding_dim=dim, num_embeddings=text_rows[name],
                                          feature_names=names, pooling=PoolingType.SUM,
                                          data_type=_TEXT_DATA_TYPE[spec.text.dtype]))
    return configs
