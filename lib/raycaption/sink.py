"""Output schemas and the write stage.

Write tasks put each bundle's healthy rows into a captions file and its failed rows into an
errors file (one per partition folder), under ``_staging/<run_id>/`` where no reader of
``captions/`` or ``errors/`` looks, and return one small row per file to the driver, which
commits them (:mod:`raycaption.commit`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycaption import storage
from raycaption.commit import STAGING_DIR, StagedFile, id_keys, write_parquet
from raycaption.config import StorageConfig

logger = logging.getLogger(__name__)

CAPTION_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("fingerprint", pa.string()),
    pa.field("content_sha256", pa.string()),
]
ERROR_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("stage", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("fingerprint", pa.string()),
    pa.field("content_sha256", pa.string()),
]
ERROR_SCHEMA = pa.schema(ERROR_FIELDS)


def caption_schema(
    extra: pa.Schema,
    embedding: tuple[str, int] | None = None,
    tags: bool = False,
    image_embedding: tuple[str, int] | None = None,
) -> pa.Schema:
    """Fixed caption columns, tags and the embedding when configured, then the manifest's own
    columns in manifest order. The embedding model and dimension go into schema metadata."""
    fields = list(CAPTION_FIELDS)
    if tags:
        fields += [
            pa.field("tags", pa.list_(pa.string())),
            pa.field("tag_scores", pa.list_(pa.float32())),
            pa.field("tag_vocabulary", pa.string()),
        ]
    metadata = {}
    if embedding:
        name, dim = embedding
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
        metadata["raycaption.text_embedding_model"] = name
        metadata["raycaption.text_embedding_dim"] = str(dim)
    if image_embedding:
        name, dim = image_embedding
        fields += [
            pa.field("image_tags", pa.list_(pa.string())),
            pa.field("image_tag_scores", pa.list_(pa.float32())),
            pa.field("image_embedding", pa.list_(pa.float32(), dim)),
        ]
        metadata["raycaption.image_embedding_model"] = name
        metadata["raycaption.image_embedding_dim"] = str(dim)
    return pa.schema(fields + list(extra), metadata=metadata or None)


OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string()),  # captions | errors | stats
        pa.field("path", pa.string()),
        pa.field("keys", pa.list_(pa.uint64())),
        pa.field("stats", pa.string()),
    ]
)


@dataclass
class WriteSpec:
    """Everything a write task needs (shipped to every task)."""

    output: str
    run_id: str
    model: str
    schema: pa.Schema
    storage_cfg: StorageConfig
    fingerprint: str | None = None
    # None: no tags column; an empty set: tags without a vocabulary (every tag is new).
    vocabulary: frozenset[str] | None = None

    @property
    def staging(self) -> str:
        return storage.join(self.output, STAGING_DIR, self.run_id)


def write_block(table: pa.Table, spec: WriteSpec) -> pa.Table:
    """Write one bundle of rows into staging; return one outcome row per file plus a stats
    row. Rows marked ``stage == "skipped"`` (already captioned under another URI) are
    counted, not written."""
    stats = {
        "captioned": 0,
        "error_codes": Counter(),
        "error_stages": Counter(),
        "new_tags": Counter(),
        "same_content": 0,
    }
    out = []
    if table.num_rows:
        stage = table.column("stage")
        skipped = pc.fill_null(pc.equal(stage, "skipped"), False)
        stats["same_content"] = int(pc.sum(skipped).as_py() or 0)
        table = table.filter(pc.invert(skipped))
        for part, rows in _by_partition(table):
            bad = pc.is_valid(rows.column("stage"))
            ok_rows, bad_rows = rows.filter(pc.invert(bad)), rows.filter(bad)
            if ok_rows.num_rows:
                out.append(_write_rows(spec, "captions", part, _caption_table(spec, ok_rows)))
                stats["captioned"] += ok_rows.num_rows
                if spec.vocabulary is not None:
                    for tags in ok_rows.column("tags").to_pylist():
                        stats["new_tags"].update(t for t in tags or () if t not in spec.vocabulary)
            if bad_rows.num_rows:
                out.append(_write_rows(spec, "errors", part, _error_table(spec, bad_rows)))
                stats["error_codes"].update(bad_rows.column("error_code").to_pylist())
                stats["error_stages"].update(bad_rows.column("stage").to_pylist())
    out.append({"table": "stats", "path": None, "keys": None, "stats": json.dumps(stats)})
    return pa.Table.from_pylist(out, schema=OUTCOME_SCHEMA)


def _by_partition(table: pa.Table):
    if "partition" not in table.column_names:
        yield None, table
        return
    parts = table.column("partition")
    for value in pc.unique(parts).to_pylist():
        mask = pc.is_null(parts) if value is None else pc.fill_null(pc.equal(parts, value), False)
        yield value, table.filter(mask)


def _write_rows(spec: WriteSpec, table_name: str, part: str | None, rows: pa.Table) -> dict:
    folder = storage.join(spec.staging, table_name, *([part] if part else []))
    url = storage.join(folder, f"part-{spec.run_id}-{uuid.uuid4().hex[:12]}.parquet")
    fs, path = storage.filesystem(url, spec.storage_cfg)
    write_parquet(fs, path, rows, fault_point="write")
    keys = id_keys(rows.column("image_id"))
    return {"table": table_name, "path": path, "keys": keys.tolist(), "stats": None}


def _caption_table(spec: WriteSpec, rows: pa.Table) -> pa.Table:
    n = rows.num_rows
    arrays = []
    for f in spec.schema:
        if f.name == "run_id":
            arrays.append(pa.array([spec.run_id] * n, pa.string()))
        elif f.name in rows.column_names:  # a re-tag keeps the rows' own model etc.
            arrays.append(rows.column(f.name).cast(f.type))
        elif f.name == "model":
            arrays.append(pa.array([spec.model] * n, pa.string()))
        elif f.name == "fingerprint":
            arrays.append(pa.array([spec.fingerprint] * n, pa.string()))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=spec.schema)


def _error_table(spec: WriteSpec, rows: pa.Table) -> pa.Table:
    n = rows.num_rows
    arrays = []
    for f in ERROR_FIELDS:
        if f.name == "run_id":
            arrays.append(pa.array([spec.run_id] * n, pa.string()))
        elif f.name in rows.column_names:
            arrays.append(rows.column(f.name).cast(f.type))
        elif f.name == "fingerprint":
            arrays.append(pa.array([spec.fingerprint] * n, pa.string()))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=ERROR_SCHEMA)


@dataclass
class WriteTotals:
    """What the write tasks of a run reported, summed on the driver."""

    captioned: int = 0
    error_codes: Counter = field(default_factory=Counter)
    error_stages: Counter = field(default_factory=Counter)
    new_tags: Counter = field(default_factory=Counter)
    same_content: int = 0

    @property
    def errors(self) -> int:
        return sum(self.error_codes.values())

    def staged_files(self, outcome: pa.Table) -> list[StagedFile]:
        """Add a batch of outcome rows to the totals; return the files to commit."""
        files = []
        for row in outcome.to_pylist():
            if row["table"] == "stats":
                s = json.loads(row["stats"])
                self.captioned += s["captioned"]
                self.error_codes.update(s["error_codes"])
                self.error_stages.update(s["error_stages"])
                self.new_tags.update(s["new_tags"])
                self.same_content += s["same_content"]
            else:
                keys = np.array(row["keys"], dtype=np.uint64)
                files.append(StagedFile(row["path"], row["table"], keys))
        return files
