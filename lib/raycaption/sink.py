"""Write and commit: owns every output guarantee.

Write tasks put each block's healthy rows into a captions file and its failed rows into an
errors file, both under ``_staging/<run_id>/`` where no reader of ``captions/`` or
``errors/`` looks. Only after every write task has finished does the driver move the files
into ``captions/`` and ``errors/``, so a crashed run leaves nothing half-visible there.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from raycaption import storage
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
]
ERROR_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("stage", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("run_id", pa.string()),
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


def write_parquet(table: pa.Table, url: str, storage_cfg: StorageConfig) -> None:
    """One Parquet file, in the dialect plain pyarrow, DuckDB and Spark all read."""
    fs, path = storage.filesystem(url, storage_cfg)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(
            table,
            f,
            compression="snappy",
            coerce_timestamps="us",  # Spark cannot read nanosecond timestamps
            allow_truncated_timestamps=True,
        )


@dataclass
class WriteOutcome:
    """What one write task produced (returned to the driver)."""

    caption_files: list[str] = field(default_factory=list)
    error_files: list[str] = field(default_factory=list)
    captioned: int = 0
    error_codes: Counter = field(default_factory=Counter)
    error_stages: Counter = field(default_factory=Counter)
    new_tags: Counter = field(default_factory=Counter)


class CommitDatasink(Datasink[WriteOutcome]):
    """Splits rows into the captions and errors tables and commits them at the end."""

    def __init__(
        self,
        output: str,
        run_id: str,
        model: str,
        extra_schema: pa.Schema,
        storage_cfg: StorageConfig,
        embedding: tuple[str, int] | None = None,
        vocabulary: frozenset[str] | None = None,
        image_embedding: tuple[str, int] | None = None,
    ):
        self.output = output.rstrip("/")
        self.run_id = run_id
        self.model = model
        # None: no tags column; an empty set: tags without a vocabulary (every tag is new).
        self.vocabulary = vocabulary
        self.schema = caption_schema(
            extra_schema, embedding, tags=vocabulary is not None, image_embedding=image_embedding
        )
        self.storage_cfg = storage_cfg
        self.staging = storage.join(self.output, "_staging", run_id)
        self.committed: WriteOutcome | None = None

    def write(self, blocks: Iterable[Block], ctx) -> WriteOutcome:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        outcome = WriteOutcome()
        if not tables:
            return outcome
        table = pa.concat_tables(tables, promote_options="default")
        failed = pc.is_valid(table.column("stage"))
        ok_rows = table.filter(pc.invert(failed))
        bad_rows = table.filter(failed)
        name = f"part-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        if ok_rows.num_rows:
            path = storage.join(self.staging, "captions", name)
            write_parquet(self._caption_table(ok_rows), path, self.storage_cfg)
            outcome.caption_files.append(path)
            outcome.captioned = ok_rows.num_rows
            if self.vocabulary is not None:
                for tags in ok_rows.column("tags").to_pylist():
                    outcome.new_tags.update(t for t in tags or () if t not in self.vocabulary)
        if bad_rows.num_rows:
            path = storage.join(self.staging, "errors", name)
            write_parquet(self._error_table(bad_rows), path, self.storage_cfg)
            outcome.error_files.append(path)
            outcome.error_codes.update(bad_rows.column("error_code").to_pylist())
            outcome.error_stages.update(bad_rows.column("stage").to_pylist())
        return outcome

    def _caption_table(self, rows: pa.Table) -> pa.Table:
        n = rows.num_rows
        arrays = []
        for f in self.schema:
            if f.name == "run_id":
                arrays.append(pa.array([self.run_id] * n, pa.string()))
            elif f.name in rows.column_names:  # a re-tag keeps the rows' own model etc.
                arrays.append(rows.column(f.name).cast(f.type))
            elif f.name == "model":
                arrays.append(pa.array([self.model] * n, pa.string()))
            else:
                arrays.append(pa.nulls(n, f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _error_table(self, rows: pa.Table) -> pa.Table:
        n = rows.num_rows
        run = pa.array([self.run_id] * n, pa.string())
        arrays = [run if f.name == "run_id" else rows.column(f.name) for f in ERROR_FIELDS]
        return pa.Table.from_arrays(arrays, schema=ERROR_SCHEMA)

    def on_write_complete(self, write_result: Any) -> None:
        outcomes = [o for o in write_result.write_returns if o is not None]
        self.committed = commit(self, outcomes)

    def on_write_failed(self, error: Exception) -> None:
        logger.error("write failed; nothing from run %s was made visible: %s", self.run_id, error)


def commit(sink: CommitDatasink, outcomes: list[WriteOutcome]) -> WriteOutcome:
    """Move staged files into the visible tables; make sure both tables exist."""
    total = WriteOutcome()
    fs, _ = storage.filesystem(sink.output, sink.storage_cfg)
    for table_name, attr in (("captions", "caption_files"), ("errors", "error_files")):
        final_dir = storage.join(sink.output, table_name)
        fs.makedirs(_path(final_dir, sink), exist_ok=True)
        moved = []
        for o in outcomes:
            for src in getattr(o, attr):
                dst = storage.join(final_dir, src.rsplit("/", 1)[1])
                fs.mv(_path(src, sink), _path(dst, sink))
                moved.append(dst)
        if not moved:
            # An empty file keeps the table readable (with its schema) even with no rows.
            dst = storage.join(final_dir, f"part-{sink.run_id}-empty.parquet")
            schema = sink.schema if table_name == "captions" else ERROR_SCHEMA
            write_parquet(schema.empty_table(), dst, sink.storage_cfg)
            moved.append(dst)
        setattr(total, attr, moved)
    for o in outcomes:
        total.captioned += o.captioned
        total.error_codes.update(o.error_codes)
        total.error_stages.update(o.error_stages)
        total.new_tags.update(o.new_tags)
    staging = _path(sink.staging, sink)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    return total


def _path(url: str, sink: CommitDatasink) -> str:
    return storage.filesystem(url, sink.storage_cfg)[1]
