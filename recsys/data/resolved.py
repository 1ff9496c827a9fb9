"""The resolved schema: what a spec's prepared data means to a model, written once by prepare.

It holds the table sizes, the vocabularies (key -> row), the dense-feature statistics and the text tables'
identities (keys and texts). The model is built from it, the loader maps ids with it, checkpoints record its hash
and a serving bundle carries a copy. Each spec gets its own folder, `<prepared_dir>/resolved/<fingerprint>/`, keyed
by the spec fields that decide its content (data section, vocabulary settings of the tables, the features' columns
and transforms, the text tables), so preparing a second spec into the same prepared folder writes a second schema
and never changes what the first spec's model means.

Layout of a schema folder: `schema.json` (sizes, dense stats, and the sha256 of every file) + `vocab/<table>.parquet`
(key, row) + `text_tables/<name>.parquet` (row, key, text) + `statistics/<table>.npz` (train counts, `recsys.data.statistics`).
Loading checks every file's sha256 before use.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.errors import DataError
from recsys.fileio import sha256_file
from recsys.spec.config import Spec
from recsys.spec.loader import job_command

if TYPE_CHECKING:
    from recsys.data.statistics import TableCounts

SCHEMA_FILE = "schema.json"
FORMAT = 1


def schema_fingerprint(spec: Spec) -> str:
    """16 hex digits over the spec fields that decide the schema's content (not dims, lengths or training)."""
    # where the raw files live is left out: a checkpoint's manifest holds the resolved (absolute) raw_dir while the
    # YAML may say it relative, and both must find the same schema; what the files held is guarded by the schema's
    # content hash (`sha256`), which checkpoints record and compare
    data = spec.data.model_dump(mode="json", exclude={"row_filter", "max_bad_fraction", "prepared_dir", "raw_dir"})
    feats = [{k: v for k, v in f.model_dump(mode="json").items() if k in
              ("kind", "name", "column", "source", "separator", "table", "transform", "boundaries",
                        "text_table", "sequence")}
             for f in spec.features]
    tables = [{k: v for k, v in t.model_dump(mode="json").items() if k in ("name", "index", "min_count",
                                                                           "num_buckets")} for t in spec.tables]
    texts = [t.model_dump(mode="json") for t in spec.text.tables]
    blob_parts = [data, feats, tables, texts]
    if spec.statistics.counts:  # (absent otherwise, so the schemas of specs without counts keep their folders)
        # what the counts files hold: the folds and which id column fills which table; not which counts the model
        # reads of them (names, `last`, history features), as lengths and dims are left out above
        from recsys.data.statistics import counted_items

        blob_parts.append({"folds": spec.statistics.folds,
                           "counted": {t: f.column for t, f in counted_items(spec).items()}})
    blob = json.dumps(blob_parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ResolvedSchema:
    folder: Path
    info: Dict[str, Any]
    vocab: Dict[str, pa.Array] = field(default_factory=dict)  # table -> keys; keys[i] has row i + 1
    text_tables: Dict[str, pa.Table] = field(default_factory=dict)  # name -> (row, key, text) ordered by row
    counts: Dict[str, "TableCounts"] = field(default_factory=dict)  # id table -> its train counts (statistics)

    @property
    def table_rows(self) -> Dict[str, int]:
        return dict(self.info["tables"])

    @property
    def dense_stats(self) -> Dict[str, Dict[str, float]]:
        return dict(self.info["dense"])

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def sha256(self) -> str:
        """One hash for what the schema means: table rows, dense statistics and every file's sha256 (not which spec
        fingerprint or name it was filed under, so a code change that renames the folder keeps the hash)."""
        content = {k: self.info[k] for k in ("tables", "dense", "files")}
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def text_keys(self, name: str) -> pa.Array:
        return self.text_tables[name]["key"].combine_chunks()

    def copy_to(self, dest: Path) -> None:
        """Copy the schema's files (schema.json and everything it names) into `dest`."""
        for rel in [SCHEMA_FILE, *self.info["files"]]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folder / rel, dest / rel)


def resolved_dir(spec: Spec) -> Path:
    from recsys.data.paths import prepared_dir

    return prepared_dir(spec) / "resolved" / schema_fingerprint(spec)


def write_schema(spec: Spec, stats: Dict[str, Any]) -> Path:
    """Collect the prepared files of `spec` into its schema folder (rewritten only when its content changed)."""
    from recsys.data import paths
    from recsys.data.prepare import table_num_rows

    dest = resolved_dir(spec)
    files: Dict[str, Path] = {}
    for t in spec.tables:
        if t.index == "vocab" and t.name not in spec.bucket_tables():  # bucket tables have no vocabulary
            files[f"vocab/{t.name}.parquet"] = paths.vocab_path(spec, t.name)
    for tt in spec.text.tables:
        files[f"text_tables/{tt.name}.parquet"] = paths.text_table_path(spec, tt.name)
    from recsys.data.statistics import tables_counted

    for table in tables_counted(spec):
        files[f"statistics/{table}.npz"] = paths.counts_path(spec, table)
    info = {"format": FORMAT, "spec_name": spec.name, "fingerprint": schema_fingerprint(spec),
            "tables": table_num_rows(spec), "dense": stats["dense"],
            "files": {rel: sha256_file(src) for rel, src in files.items()}}
    old = dest / SCHEMA_FILE
    if old.is_file() and json.loads(old.read_text()) == info:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, src in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / rel)
    (tmp / SCHEMA_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def load_schema(folder: Path, hint: str = "") -> ResolvedSchema:
    """Read and verify a schema folder: every file must match the sha256 that schema.json names."""
    folder = Path(folder)
    sf = folder / SCHEMA_FILE
    if not sf.is_file():
        raise DataError(f"{sf}: resolved schema missing{hint}")
    try:
        info = json.loads(sf.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{sf}: unreadable ({e})") from None
    if info.get("format") != FORMAT:
        raise DataError(f"{sf}: schema format {info.get('format')!r}, this code reads {FORMAT}")
    for rel, digest in info["files"].items():
        p = folder / rel
        if not p.is_file():
            raise DataError(f"{p}: missing (named by {sf})")
        if sha256_file(p) != digest:
            raise DataError(f"{p}: sha256 does not match {sf}; the file was changed after the schema was written")
    schema = ResolvedSchema(folder=folder, info=info)
    for rel in info["files"]:
        kind, name = rel.split("/", 1)
        if kind == "statistics":
            from recsys.data.statistics import TableCounts

            table = name[:-len(".npz")]
            counts = TableCounts.load(folder / rel)
            if counts.rows != info["tables"].get(table):
                raise DataError(f"{folder / rel}: counts of {counts.rows} rows, table {table!r} has "
                                f"{info['tables'].get(table)} in {sf}")
            schema.counts[table] = counts
            continue
        name = name[:-len(".parquet")]
        if kind == "vocab":
            schema.vocab[name] = pq.read_table(folder / rel, columns=["key"])["key"].combine_chunks()
        else:
            schema.text_tables[name] = pq.read_table(folder / rel).sort_by("row")
    return schema


_LOADED: Dict[str, Tuple[Optional[int], ResolvedSchema]] = {}


def schema_for(spec: Spec) -> ResolvedSchema:
    """The schema that prepare wrote for `spec` (verified once per process and folder)."""
    folder = resolved_dir(spec)
    key = str(folder)
    sf = folder / SCHEMA_FILE
    stamp = sf.stat().st_mtime_ns if sf.is_file() else None
    hit = _LOADED.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    # the hint carries the user's --set overrides: domains, columns or folders they change move the schema
    schema = load_schema(folder, hint=f"; run `{job_command(spec, 'prepare_data.py')}` first")
    _LOADED[key] = (stamp, schema)
    return schema


def check_checkpoint_schema(spec_schema: ResolvedSchema, recorded: Optional[str], where: str) -> None:
    """A checkpoint trained on another schema (the prepared data changed since) is refused, naming both hashes."""
    if recorded and recorded != spec_schema.sha256:
        raise DataError(f"{where}: trained with resolved schema {recorded[:16]}, but {spec_schema.folder} is "
                        f"{spec_schema.sha256[:16]}; the prepared data changed since this model was trained "
                        f"(re-run training, or export the model from the schema it was trained with)")
