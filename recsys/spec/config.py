"""Typed configuration of one job, as declared in a `feature_specs/*.yaml` file.

Every model is strict (`extra="forbid"`): an unknown key is an error, never silently ignored. Cross-references
between sections (a feature naming a table, a text feature naming a text table, ...) are checked in `Spec`'s
validator so a spec that loads is a spec that can be built. Line numbers and file names are added to errors by
`recsys.spec.loader`, which is the only way specs should be read.
"""
from __future__ import annotations

from typing import Annotated, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

# KJT key suffix of the empty second feature that moves a table to FBGEMM's loop backward path
# (recsys/train/update_path.py); reserved in feature names
PAD_SUFFIX = "__update_pad"

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


# ----------------------------------------------------------------------------------------------------------- data
class SideTableSpec(StrictModel):
    """A lookup table joined onto impression rows by key (e.g. the item catalogue joined on item_id)."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str  # parquet file; relative paths resolve against `data.raw_dir`
    key: str  # key column inside the side table
    join_on: str  # column of the impression rows holding the key


class DataSpec(StrictModel):
    """Where rows come from and how they are split.

    `adapter` names the function in `recsys.data.adapters` that turns the raw dataset into canonical parquet
    (one row per impression) under `prepared_dir`. `parquet` means the raw files already are canonical.
    Relative paths resolve against the project root (the folder holding `feature_specs/`); environment variables
    (`${RECSYS_DATA:-../shared/data}`) are expanded.
    """

    adapter: Literal["movielens", "amazon_sr", "parquet"]
    raw_dir: str
    prepared_dir: str
    # split names become file names (quarantine/<split>.jsonl, index caches): plain names only, no `../x`
    splits: Dict[Annotated[str, Field(pattern=NAME_PATTERN)], str] = Field(default_factory=lambda: {"train": "train.parquet", "valid": "valid.parquet",
                                                             "test": "test.parquet"})
    side_tables: List[SideTableSpec] = Field(default_factory=list)
    domain_column: str = "domain"
    label_column: str = "label"
    user_column: str = "user_id"  # used for GAUC and for rank-stable user subsets
    slice_columns: List[str] = Field(default_factory=lambda: ["cold_item"])  # boolean columns reported as slices
    # domain values whose rows are skipped without counting as bad rows (e.g. a domain held out of pretraining
    # for a cold-start experiment)
    ignore_domains: List[str] = Field(default_factory=list)
    row_filter: Optional[str] = None  # e.g. "user_bucket < 10": a simple `column op number` filter on train rows
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    row_group_size: int = Field(default=65536, gt=0)


class DomainSpec(StrictModel):
    """One surface (scenario). Rows belong to it when `data.domain_column == value` (default: the name)."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["search", "rec"]
    value: Optional[str] = None
    loss_weight: float = Field(default=1.0, ge=0.0)

    @property
    def match_value(self) -> str:
        return self.value if self.value is not None else self.name


# ------------------------------------------------------------------------------------------------------- features
Side = Literal["user", "query", "item"]


class IdFeature(StrictModel):
    """A single-valued categorical id (user id, item id, query id). Looked up in `table`."""

    kind: Literal["id"]
    name: str = Field(pattern=NAME_PATTERN)
    column: str
    side: Side
    table: str
    source: Optional[str] = None  # side table to read `column` from; None = the impression row


class SparseFeature(StrictModel):
    """A single- or multi-valued categorical feature (genres, brand, category tokens)."""

    kind: Literal["sparse"]
    name: str = Field(pattern=NAME_PATTERN)
    column: str
    side: Side
    table: str
    source: Optional[str] = None
    separator: Optional[str] = None  # split a string column into several values (e.g. "|" for genres)
    max_values: int = Field(default=16, gt=0)


class SequenceFeature(StrictModel):
    """A behaviour sequence (history item ids, newest last) reusing another feature's table.

    `pooling: attention` (default): emitted as `max_len` single-valued KJT keys `<name>__pos0 ..
    <name>__pos{max_len-1}` (oldest kept first, right-padded) so an EmbeddingBagCollection returns per-position vectors
    for target attention plus a mean; the batch carries its lengths.
    `pooling: mean`: ONE multi-valued KJT key `<name>` that the EmbeddingBagCollection pools itself (the public
    multi-domain baselines' mean-pooled history): 1 lookup output per sample instead of `max_len`, no attention.
    """

    kind: Literal["sequence"]
    name: str = Field(pattern=NAME_PATTERN)
    column: str
    side: Side = "user"
    table: str
    max_len: int = Field(default=20, gt=0)
    pooling: Literal["attention", "mean"] = "attention"
    target: Optional[str] = None  # feature whose embedding attends over this sequence (attention pooling only)


class DenseFeature(StrictModel):
    """A numeric column. `none` / `log1p` / `standardize` (train mean and std) feed it to the model as a number;
    `bucketize` turns it into a categorical id instead (the usual treatment of age-like columns): value v gets
    row 1 + (number of `boundaries` <= v) of its own embedding `table`, which has len(boundaries) + 2 rows
    (row 0 = missing / non-finite value, never a bad row)."""

    kind: Literal["dense"]
    name: str = Field(pattern=NAME_PATTERN)
    column: str
    side: Side
    source: Optional[str] = None
    transform: Literal["none", "log1p", "standardize", "bucketize"] = "standardize"
    boundaries: Optional[List[float]] = None  # bucketize: increasing bucket edges, e.g. [18, 25, 35, 45, 55, 65]
    table: Optional[str] = None  # bucketize: the embedding table of the buckets (read by this feature only)

    @model_validator(mode="after")
    def _bucketize_fields(self):
        if self.transform == "bucketize":
            if not self.boundaries or self.table is None:
                raise ValueError("transform 'bucketize' needs boundaries (increasing numbers) and table")
            if any(hi <= lo for lo, hi in zip(self.boundaries, self.boundaries[1:])):
                raise ValueError(f"boundaries must increase strictly, got {self.boundaries}")
        elif self.boundaries is not None or self.table is not None:
            raise ValueError(f"boundaries/table are for transform 'bucketize', not '{self.transform}'")
        return self

    @property
    def bucketized(self) -> bool:
        return self.transform == "bucketize"


class TextFeature(StrictModel):
    """A text aspect. `column` holds the key(s) into `text_table` (a scalar or, for histories, a list)."""

    kind: Literal["text"]
    name: str = Field(pattern=NAME_PATTERN)
    column: str
    side: Side
    text_table: str
    sequence: bool = False  # column is a list (e.g. history item ids) -> [B, max_len] text rows
    max_len: int = Field(default=20, gt=0)


Feature = Annotated[Union[IdFeature, SparseFeature, SequenceFeature, DenseFeature, TextFeature], Field(discriminator="kind")]


class CountFeature(StrictModel):
    """A count from the train split's positives, read for each row from ids the row already has (no column):
    without `history`, how often the candidate (id feature `item`) was bought; with `history` (a sequence feature
    over the same table), how many users bought both the candidate and one of the row's `last` newest history
    items, summed over them. Computed by `recsys.data.statistics`; the model reads log1p(count) and an "unknown"
    flag, set where the candidate's id is unseen (cold items, and the training rows id dropout hides)."""

    name: str = Field(pattern=NAME_PATTERN)
    item: str
    history: Optional[str] = None
    last: int = Field(default=5, gt=0)


COLUMNS_PER_STATISTIC = 2  # what the model reads of each count or match: log1p(value) and an "unknown" flag


class MatchFeature(StrictModel):
    """How many of the row's history items (sequence feature `history`) share the candidate's value of `feature`,
    a one-value sparse feature read from a side table (e.g. the item's brand): "the user bought this brand before".
    Needs no train data, so it holds for cold candidates too; each history item's value comes from the same side
    table through its id. The model reads log1p(matches) and an "unknown" flag, set where the candidate has no
    value. Computed by `recsys.data.statistics` beside the counts."""

    name: str = Field(pattern=NAME_PATTERN)
    feature: str
    history: str


class StatisticsSpec(StrictModel):
    """Features counted for each row (`recsys.data.statistics`). `counts` come from the train split; a row's
    counts leave out the users of its own fold (`folds` folds by a hash of the user): a training row never counts
    its own purchase, and training, evaluation and serving rows all see counts over the same share of users.
    `matches` compare the candidate with its own row's history."""

    folds: int = Field(default=5, ge=2, le=64)
    counts: List[CountFeature] = Field(default_factory=list)
    matches: List[MatchFeature] = Field(default_factory=list)

    @property
    def columns(self) -> int:
        """How many values the counts and matches append to each row's dense array (two each)."""
        return COLUMNS_PER_STATISTIC * (len(self.counts) + len(self.matches))


# --------------------------------------------------------------------------------------------------------- tables
class TableSpec(StrictModel):
    """An embedding table. `vocab`: rows from a vocabulary built at prepare time (row 0 = unseen id);
    `hash`: `num_buckets` rows addressed by a stable hash of the raw id (row 0 reserved for missing)."""

    name: str = Field(pattern=NAME_PATTERN)
    dim: int = Field(gt=0)
    index: Literal["vocab", "hash"] = "vocab"
    num_buckets: Optional[int] = Field(default=None, gt=1)  # for `hash`; an upper bound / override for `vocab`
    min_count: int = Field(default=1, ge=1)  # vocab: ids seen fewer times in train share the unseen row
    pooling: Literal["sum", "mean"] = "mean"
    trainable: bool = True
    # train-time probability that an id read from this table is replaced by the unseen row 0 (ids only, the text
    # stays): row 0 then learns what "an item we have never seen" means and the model learns to lean on text for
    # it, instead of scoring every cold item with an untrained row
    id_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: Optional[float] = None  # None = TorchRec default (uniform +-sqrt(1/rows))

    @model_validator(mode="after")
    def _hash_needs_buckets(self):
        if self.index == "hash" and self.num_buckets is None:
            raise ValueError("index 'hash' needs num_buckets")
        return self


class TextTableSpec(StrictModel):
    """Texts addressed by key. `source: <side table>` takes key/text columns from it; `source: rows` collects the
    distinct values of `key` across all splits' impression rows, the value being its own text (queries)."""

    name: str = Field(pattern=NAME_PATTERN)
    source: str
    key: str
    text: Optional[str] = None  # text column in the side table; defaults to `key` for source: rows
    # expected number of texts: sizes the frozen text table for planning (jobs/plan.py) when the table is not
    # prepared here; a prepared table always has its own row count
    num_rows: Optional[int] = Field(default=None, gt=0)


class EncoderSpec(StrictModel):
    """The frozen LLM turning texts into vectors (see recsys.text)."""

    model: str = "package:all_minilm_l6_v2"  # `package:<name>` (PyPI-shipped model) or a local folder path
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(default=64, gt=0)
    batch_size: int = Field(default=128, gt=0)
    normalize: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # how the model is run (docs/text_encoding.md): `torch` fp32 is the reference; `onnx` is ONNX Runtime fp32 and
    # `onnx-int8` ONNX Runtime with int8 weights and dynamically quantised activations (CPU; several times faster,
    # other numerics: its own cache entries); `torch-int8` is PyTorch's dynamic int8 (torch.ao); `torch-bf16` runs
    # the model in bfloat16 where the device has native bf16 (refused elsewhere: emulated bf16 is far slower).
    backend: Literal["torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8"] = "torch"
    # texts encoded together and stored as one cache part: the unit of resuming and of sharding over ranks
    chunk_size: int = Field(default=4096, gt=0)


class TextSpec(StrictModel):
    # llm: frozen LLM vectors; random: trainable hashed word tokens (no LLM); hybrid: both, each text's vector the
    # concatenation of its frozen LLM vector and its trainable token vector (the LLM carries meaning to texts never
    # trained on, the tokens learn what the data says about its words); none: no text
    mode: Literal["llm", "random", "hybrid", "none"] = "llm"
    encoder: EncoderSpec = Field(default_factory=EncoderSpec)
    cache_dir: str = "data_cache/text"
    tables: List[TextTableSpec] = Field(default_factory=list)
    # project LLM vectors on their top-k principal components (0 = keep the encoder's width), once, when the frozen
    # text tables are materialised (see recsys.text.frozen for why and how)
    reduce_dim: int = Field(default=64, ge=0)
    # storage of the frozen text tables (mode llm): fp16 halves their memory and their all-to-all for a rounding of
    # ~2.4e-4 per unit-vector component (cosines move by < 1e-3). int8 is not offered: TorchRec's training
    # EmbeddingBagCollection (1.8) cannot shard fbgemm's int8 rows, which carry their scale and bias inline.
    dtype: Literal["fp32", "fp16"] = "fp16"
    random_buckets: int = Field(default=100_000, gt=1)  # mode `random`: hashed text-token table size
    random_dim: int = Field(default=64, gt=0)
    random_max_tokens: int = Field(default=32, gt=0)

    @property
    def frozen(self) -> bool:
        """Texts read frozen LLM vectors (modes llm and hybrid): encoded by jobs/encode_text.py, in frozen tables."""
        return self.mode in ("llm", "hybrid")

    @property
    def tokens(self) -> bool:
        """Texts read trainable hashed-token embeddings (modes random and hybrid)."""
        return self.mode in ("random", "hybrid")


# ---------------------------------------------------------------------------------------------------------- model
class ModelSpec(StrictModel):
    dim: int = Field(default=64, gt=0)  # width every aspect is projected to before fusion
    fusion: Literal["domain", "mean", "cls"] = "domain"
    tower: Literal["sr_foundation", "shared_bottom", "mmoe", "ple", "star"] = "sr_foundation"
    domain_adaptive: bool = True
    regularizer: Literal["js", "mmd", "none"] = "js"
    reg_weight: float = Field(default=0.1, ge=0.0)
    # at least one layer, each at least 1 wide (the towers index hidden[0] and divide by widths)
    hidden: List[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 128], min_length=1)
    num_experts: int = Field(default=4, gt=0)  # mmoe / ple shared experts
    num_specific_experts: int = Field(default=1, gt=0)  # ple
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    single_domain: Optional[str] = None  # train and evaluate one domain only (ablation)


# ---------------------------------------------------------------------------------------------------------- train
class TrainSpec(StrictModel):
    batch_size: int = Field(default=4096, gt=0)  # global batch; each of N ranks takes batch_size / N
    eval_batch_size: int = Field(default=16384, gt=0)
    epochs: int = Field(default=3, gt=0)
    lr: float = Field(default=1e-3, gt=0)  # dense optimiser (Adam)
    weight_decay: float = Field(default=0.0, ge=0)
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    embedding_lr: float = Field(default=0.05, gt=0)
    # both learning rates are multiplied by lr_decay ** epoch: later epochs refine instead of re-fitting the
    # embeddings of small domains (which is where multi-epoch CTR training overfits)
    lr_decay: float = Field(default=1.0, gt=0, le=1.0)
    # decay of an exponential moving average of the trained weights, which the run is then evaluated, selected,
    # checkpointed and shipped with (recsys/train/weight_average.py; 0.99 averages over the last ~100 steps); null = off
    ema_decay: Optional[float] = Field(default=None, gt=0, lt=1.0)
    seed: int = 2023
    output_dir: str = "runs/default"
    checkpoint_every_steps: int = Field(default=0, ge=0)  # 0 = at epoch ends only
    keep_checkpoints: int = Field(default=2, gt=0)
    max_steps: Optional[int] = Field(default=None, gt=0)  # cap per epoch (smoke tests)
    log_every_steps: int = Field(default=50, gt=0)
    # per-domain AUC / NE of the last this-many training samples (all ranks), to TensorBoard every log_every_steps
    # (torchrec.metrics; see recsys/train/live_metrics.py); 0 = off
    live_metrics_window: int = Field(default=65536, ge=0)
    # which valid number picks the best epoch: the mean of the domains' AUCs weighs a small domain like a large one
    # (overall AUC is dominated by the largest domain and hides a small domain that overfits)
    select_metric: Literal["mean_domain_auc", "overall_auc"] = "mean_domain_auc"
    # threads that read and map the next blocks of training rows while the step runs (torchdata.nodes: 1 = the
    # Prefetcher's thread, 2+ = a ParallelMapper before it; the batch order does not depend on it); 0 = map in the
    # training thread.
    # None = auto: 1 on CUDA (the step runs on the GPU, a CPU thread is free to load), 0 on CPU (the step's
    # intra-op threads already use every core; a loader thread only competes with them, measured slower)
    loader_workers: Optional[int] = Field(default=None, ge=0)
    shuffle: bool = True
    # rows are shuffled inside windows of chunks (`data.row_group_size` rows each) taken in a seeded order. A file
    # sorted by domain or user needs wide windows: on amazon-sr (games rows first, then Scientific) 4-chunk windows
    # fed the Scientific rows in bursts and cost 0.006 test AUC on one process against one window over the file.
    # None = auto: a window takes chunks while the row groups they come from fit the loader's row-group cache
    # (each row group then decoded once per window); a number fixes the chunks per window.
    shuffle_buffer_row_groups: Optional[int] = Field(default=None, gt=0)
    # dense-layer compute precision: bf16 autocasts the dense matmuls (fp32 weights, tables and optimiser state;
    # see recsys/models/precision.py): 2-5x faster GEMMs where bf16 is native (AVX512-BF16, AMX, GPUs), ~100x
    # slower where it is emulated (AVX2). `auto` picks bf16 only where it is native and logs which and why.
    # Training steps only: evaluation and serving always run fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile of the dense layers in training steps (recsys/models/compiled.py): `auto` compiles on CPU where
    # inductor's C++ compiler is installed and the run is long enough to repay the compile (>= 10,000 steps);
    # true / false (YAML's on / off too) force it. Evaluation and serving always run the plain layers.
    compile: Union[Literal["auto"], bool] = "auto"
    # which of FBGEMM's two CPU backward paths trains a row-wise Adagrad table that one feature reads
    # (recsys/train/update_path.py): its JIT kernels, or the loop it uses for tables several features read. Same
    # update; which is faster depends on the CPU, so `auto` times both once at start (~0.1 s) and, where the JIT
    # path is > 2x slower, moves the tables with at least a batch's rows; it logs which and why, and a resumed run
    # takes its first start's choice. `jit` / `loop` force one for every such table. GPUs have one path.
    embedding_update_path: Literal["auto", "jit", "loop"] = "auto"
    # precision of the pooled embeddings (forward) and their gradients (backward) in the sharded all-to-all:
    # fp16/bf16 halve its bytes (TorchRec quantized comms; gloo has no bf16 codec, so bf16 is sent as fp16 on CPU)
    embedding_comm: Literal["fp32", "fp16", "bf16"] = "fp32"
    sharding_constraints: Dict[str, List[Literal["table_wise", "column_wise", "row_wise", "table_row_wise",
                                                 "data_parallel"]]] = Field(default_factory=dict)


class Spec(StrictModel):
    """A whole job. Validating one runs `check_references` too (the loader defers that step so it can report
    reference problems with file lines; see `recsys.spec.loader`)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    data: DataSpec
    domains: List[DomainSpec] = Field(min_length=1)
    features: List[Feature] = Field(min_length=1)
    tables: List[TableSpec] = Field(min_length=1)
    statistics: StatisticsSpec = Field(default_factory=StatisticsSpec)
    text: TextSpec = Field(default_factory=TextSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)

    # Where the spec came from, set by the loader (None for specs built in code): the YAML file, the line of
    # every key path, and which key paths `--set` overrides replaced. Used by `resolve_path` and by data-
    # dependent checks that report file lines after loading (`check_domains_have_rows`).
    _source_path: Optional[str] = PrivateAttr(default=None)
    _key_lines: Dict[Tuple, int] = PrivateAttr(default_factory=dict)
    _override_origin: Dict[Tuple, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _references_resolve(self, info: ValidationInfo):
        # The loader passes context {"defer_references": True} and runs check_references itself, so each
        # problem gets its own file line; specs built in code get one combined error here.
        if isinstance(info.context, dict) and info.context.get("defer_references"):
            return self
        issues = check_references(self)
        if issues:
            raise ValueError("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in issues))
        return self

    # -- convenient views -------------------------------------------------------------------------------------
    def features_of(self, *kinds: str) -> list:
        return [f for f in self.features if f.kind in kinds]

    def used_text_tables(self) -> List[str]:
        """Names of the text tables some text feature reads, sorted."""
        return sorted({f.text_table for f in self.features_of("text")})

    def bucket_tables(self) -> Dict[str, int]:
        """Tables of bucketized dense features -> their rows (len(boundaries) + 2; no vocabulary)."""
        return {f.table: len(f.boundaries) + 2 for f in self.features_of("dense") if f.bucketized}

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)

    def domain_index(self, name: str) -> int:
        return [d.name for d in self.domains].index(name)


# ------------------------------------------------------------------------------------------- cross-references
Loc = Tuple[Union[str, int], ...]
RAW_ID_KINDS = ("id", "sequence")  # features whose values are raw ids, looked up as-is


def _first_dupes(names: List[str]) -> Dict[int, int]:
    """index of each repeated name -> index of its first occurrence."""
    seen: Dict[str, int] = {}
    out: Dict[int, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            out[i] = seen[n]
        else:
            seen[n] = i
    return out


def _one_of(names) -> str:
    names = list(names)
    return "|".join(names) if names else "(none declared)"


def check_references(spec: "Spec") -> List[Tuple[Loc, str]]:
    """All cross-section problems of a schema-valid spec, as (key path, message), in spec order.

    Key paths point at the offending list item's field (e.g. ``("features", 4, "table")``) so the loader can
    report its YAML line.
    """
    issues: List[Tuple[Loc, str]] = []

    # unique names per namespace
    for section, items, what in (
        (("data", "side_tables"), spec.data.side_tables, "side table"),
        (("domains",), spec.domains, "domain"),
        (("features",), spec.features, "feature"),
        (("tables",), spec.tables, "table"),
        (("text", "tables"), spec.text.tables, "text table"),
    ):
        for i, first in _first_dupes([x.name for x in items]).items():
            issues.append(((*section, i, "name"),
                           f"duplicate {what} name '{items[i].name}' (first at {'.'.join(section)}.{first})"))
    for i, first in _first_dupes([d.match_value for d in spec.domains]).items():
        issues.append((("domains", i, "value"), f"domain value '{spec.domains[i].match_value}' already selects "
                       f"domain '{spec.domains[first].name}' (domains.{first}); each row must map to one domain"))

    for i, f in enumerate(spec.features):
        if "__pos" in f.name:  # reserved: history positions become KJT keys `<sequence>__pos<i>`
            issues.append((("features", i, "name"), f"feature name '{f.name}' may not contain '__pos' (reserved)"))
        if f.name.endswith(PAD_SUFFIX):  # reserved: the empty second feature of recsys/train/update_path.py
            issues.append((("features", i, "name"), f"feature name '{f.name}' may not end with '{PAD_SUFFIX}' "
                           f"(reserved)"))

    side_names = [t.name for t in spec.data.side_tables]
    for i, t in enumerate(spec.data.side_tables):
        if t.name == "rows":  # `source: rows` in text tables means the impression rows themselves
            issues.append((("data", "side_tables", i, "name"), "side table name 'rows' is reserved"))
    table_names = [t.name for t in spec.tables]
    feature_index = {f.name: i for i, f in reversed(list(enumerate(spec.features)))}
    text_table_names = [t.name for t in spec.text.tables]

    # features -> tables / side tables / text tables / targets
    text_needs_tables_reported = False
    for i, f in enumerate(spec.features):
        table = getattr(f, "table", None)
        if table is not None and table not in table_names:
            issues.append((("features", i, "table"), f"unknown table '{table}'; expected one of {_one_of(table_names)}"))
        source = getattr(f, "source", None)
        if source is not None and source not in side_names:
            issues.append((("features", i, "source"),
                           f"unknown side table '{source}'; expected one of {_one_of(side_names)} (data.side_tables)"))
        if f.kind == "sequence" and f.target is not None:
            j = feature_index.get(f.target)
            if j is None:
                issues.append((("features", i, "target"), f"unknown target feature '{f.target}'"))
            else:
                tgt = spec.features[j]
                tgt_table = getattr(tgt, "table", None)
                if tgt_table != f.table:
                    got = f"table '{tgt_table}'" if tgt_table else f"no table (kind {tgt.kind})"
                    issues.append((("features", i, "target"), f"target '{f.target}' must share table '{f.table}' "
                                   f"with the sequence (target attention compares their embeddings), it has {got}"))
        if f.kind == "text" and spec.text.mode != "none":
            if not text_table_names:
                if not text_needs_tables_reported:
                    issues.append((("features", i, "text_table"), f"text feature needs text.tables when text.mode "
                                   f"is '{spec.text.mode}' (declare text.tables or set text.mode: none)"))
                    text_needs_tables_reported = True
            elif f.text_table not in text_table_names:
                issues.append((("features", i, "text_table"),
                               f"unknown text table '{f.text_table}'; expected one of {_one_of(text_table_names)}"))

    # counts read the ids of an id feature (and of a sequence feature over the same table)
    feature_names = {f.name for f in spec.features}
    for i, c in enumerate(spec.statistics.counts):
        loc = ("statistics", "counts", i)
        if c.name in feature_names:
            issues.append(((*loc, "name"), f"name '{c.name}' is already a feature's; counts need names of their own"))
        j = feature_index.get(c.item)
        item = spec.features[j] if j is not None else None
        if item is None or item.kind != "id":
            issues.append(((*loc, "item"), f"'{c.item}' is not an id feature; expected one of "
                           f"{_one_of(f.name for f in spec.features if f.kind == 'id')}"))
        elif item.source is not None:
            issues.append(((*loc, "item"), f"id feature '{c.item}' reads side table '{item.source}'; counts read the "
                           f"candidate's id from the impression rows"))
        if c.history is not None:
            k = feature_index.get(c.history)
            hist = spec.features[k] if k is not None else None
            if hist is None or hist.kind != "sequence":
                issues.append(((*loc, "history"), f"'{c.history}' is not a sequence feature; expected one of "
                               f"{_one_of(f.name for f in spec.features if f.kind == 'sequence')}"))
            elif item is not None and item.kind == "id" and hist.table != item.table:
                issues.append(((*loc, "history"), f"sequence '{c.history}' reads table '{hist.table}', item "
                               f"'{c.item}' table '{item.table}': a co-count pairs ids of one table"))
    for i, first in _first_dupes([c.name for c in spec.statistics.counts]).items():
        issues.append((("statistics", "counts", i, "name"), f"duplicate count name '{spec.statistics.counts[i].name}' "
                       f"(first at statistics.counts.{first})"))

    # matches compare a side-table value of the candidate with the same value of each history item
    side_tables = {st.name: st for st in spec.data.side_tables}
    count_names = {c.name for c in spec.statistics.counts}
    for i, m in enumerate(spec.statistics.matches):
        loc = ("statistics", "matches", i)
        if m.name in feature_names or m.name in count_names:
            issues.append(((*loc, "name"), f"name '{m.name}' is already a feature's or a count's"))
        j = feature_index.get(m.feature)
        feat = spec.features[j] if j is not None else None
        if feat is None or feat.kind != "sparse" or feat.source is None:
            side_sparse = (f.name for f in spec.features if f.kind == "sparse" and f.source)
            issues.append(((*loc, "feature"), f"'{m.feature}' is not a sparse feature read from a side table; "
                           f"expected one of {_one_of(side_sparse)}"))
            continue
        k = feature_index.get(m.history)
        hist = spec.features[k] if k is not None else None
        if hist is None or hist.kind != "sequence":
            issues.append(((*loc, "history"), f"'{m.history}' is not a sequence feature; expected one of "
                           f"{_one_of(f.name for f in spec.features if f.kind == 'sequence')}"))
            continue
        hist_table = next((t for t in spec.tables if t.name == hist.table), None)
        if hist_table is not None and hist_table.index != "vocab":
            issues.append(((*loc, "history"), f"sequence '{m.history}' reads table '{hist.table}' of index "
                           f"'{hist_table.index}': a history item's value is found through its id, which needs a "
                           f"vocabulary (a hashed row cannot be mapped back to an id)"))
            continue
        side = side_tables.get(feat.source)
        keyed = [f for f in spec.features if f.kind == "id" and f.source is None and side is not None
                 and f.column == side.join_on]
        if not any(f.table == hist.table for f in keyed):
            issues.append(((*loc, "history"), f"sequence '{m.history}' reads table '{hist.table}', but side table "
                           f"'{feat.source}' of '{m.feature}' is joined on column "
                           f"'{side.join_on if side else '?'}', which no id feature of that table reads: a history "
                           f"item's value is found through its id"))
    for i, first in _first_dupes([m.name for m in spec.statistics.matches]).items():
        issues.append((("statistics", "matches", i, "name"), f"duplicate match name "
                       f"'{spec.statistics.matches[i].name}' (first at statistics.matches.{first})"))

    # a bucketized dense feature owns its table: its rows are bucket numbers, no other id space
    for i, f in enumerate(spec.features):
        if f.kind == "dense" and f.bucketized:
            others = [j for j, g in enumerate(spec.features) if j != i and getattr(g, "table", None) == f.table]
            if others:
                issues.append((("features", i, "table"), f"table '{f.table}' holds the buckets of '{f.name}'; "
                               f"features.{others[0]} '{spec.features[others[0]].name}' may not read it too"))

    # features sharing a table must put values of one id space into it: tokens split out of a string column
    # (sparse with a separator) are a different id space than raw ids (id / sequence features).
    raw_users: Dict[str, int] = {}
    token_users: Dict[str, int] = {}
    for i, f in enumerate(spec.features):
        if f.kind in RAW_ID_KINDS:
            raw_users.setdefault(f.table, i)
        elif f.kind == "sparse" and f.separator is not None:
            token_users.setdefault(f.table, i)
    for table, i in token_users.items():
        if table in raw_users:
            j = raw_users[table]
            issues.append((("features", i, "table"), f"table '{table}' would mix tokens split from "
                           f"'{spec.features[i].column}' with the raw ids of features.{j} '{spec.features[j].name}' "
                           f"({spec.features[j].kind}); give the tokens their own table"))

    # text tables read a side table or the impression rows
    for i, t in enumerate(spec.text.tables):
        if t.source != "rows" and t.source not in side_names:
            issues.append((("text", "tables", i, "source"),
                           f"unknown source '{t.source}'; expected 'rows' or a side table: {_one_of(side_names)}"))
        elif t.source != "rows" and t.text is None:
            issues.append((("text", "tables", i), f"text table reads side table '{t.source}': name its text column "
                           f"with 'text'"))

    # a domain both declared and ignored would keep its rows (the loader maps rows by the declared domains first)
    declared = {d.match_value: i for i, d in enumerate(spec.domains)}
    declared.update({d.name: i for i, d in enumerate(spec.domains)})
    for j, value in enumerate(spec.data.ignore_domains):
        if value in declared:
            i = declared[value]
            issues.append((("data", "ignore_domains", j), f"domain '{value}' is declared (domains.{i}) and ignored; "
                           f"remove it from domains to hold it out, or from data.ignore_domains to train it"))

    if spec.model.single_domain is not None and spec.model.single_domain not in [d.name for d in spec.domains]:
        issues.append((("model", "single_domain"), f"unknown domain '{spec.model.single_domain}'; expected one of "
                       f"{_one_of(d.name for d in spec.domains)}"))

    # frozen text tables (mode llm) are embedding tables too, named `text_<text table>` (recsys.models.tables)
    # (declared whatever text.mode is: a spec overridden to `text.mode: none` keeps its constraints valid)
    constrainable = list(table_names) + [f"text_{t.name}" for t in spec.text.tables]
    for key in spec.train.sharding_constraints:
        if key not in constrainable:
            issues.append((("train", "sharding_constraints", key),
                           f"unknown table '{key}'; expected one of {_one_of(constrainable)}"))
    return issues
