"""Re-tag without re-captioning: new tags and embeddings for an existing captions table.

The vocabulary changes far more often than the captions, so this reads the captions Parquet,
recomputes ``tags``, ``tag_scores``, ``tag_vocabulary`` and ``embedding`` on CPU workers
(no captioning model, no images), and writes a new captions table with the same commit
protocol as the caption job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raycaption import storage
from raycaption.config import TagRunConfig
from raycaption.errors import ConfigError

logger = logging.getLogger(__name__)
REQUIRED = ("image_id", "source_uri", "caption")
# How long a re-tag waits for the CPUs its actors need (an autoscaler is asked meanwhile).
RESOURCE_WAIT_S = 30.0


def input_files(cfg: TagRunConfig) -> tuple[Any, list[str], pa.Schema]:
    """The Parquet files to re-tag and their schema; a caption output means its captions/."""
    fs, path = storage.filesystem(cfg.input, cfg.storage)
    try:
        if fs.isdir(path) and fs.isdir(f"{path.rstrip('/')}/captions"):
            path = f"{path.rstrip('/')}/captions"
        files = [path] if fs.isfile(path) else storage.parquet_files(fs, path)
    except Exception as exc:  # noqa: BLE001 - any backend failure means "unreachable"
        raise ConfigError(f"input {storage.redact(cfg.input)} is unreachable: {exc}") from None
    if not files:
        raise ConfigError(f"input {storage.redact(cfg.input)} has no Parquet files")
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise ConfigError(f"input {storage.redact(cfg.input)} lacks column(s) {missing}")
    return fs, files, schema


def run_tag(cfg: TagRunConfig) -> dict[str, Any]:
    """Re-tag one table end to end; returns the run summary (also saved as summary.json)."""
    import ray
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from raycaption.commit import Committer, TableIndex
    from raycaption.pipeline import (
        WRITE_TASK_OPTIONS,
        _ensure_ray,
        _wait_for_resources,
        stream_commits,
        text_models,
    )
    from raycaption.sink import (
        CAPTION_FIELDS,
        ERROR_SCHEMA,
        WriteSpec,
        WriteTotals,
        caption_schema,
        write_block,
    )
    from raycaption.stages import ENRICHED_COLUMNS, STATUS_COLUMNS, TagActor

    started = time.perf_counter()
    cfg.validate()
    cfg = dataclasses.replace(cfg, storage=storage.resolve_storage(cfg.storage))
    fs, files, schema = input_files(cfg)
    missing = [c for c in cfg.tags.context_columns if c not in schema.names]
    if cfg.tags.enabled and missing:
        raise ConfigError(f"--tag-columns uses {missing} but the input only has {schema.names}")
    embedding, vocabulary = text_models(cfg)
    owned = {f.name for f in CAPTION_FIELDS} | set(ENRICHED_COLUMNS) | set(STATUS_COLUMNS)
    extra = pa.schema([f for f in schema if f.name not in owned])
    words = frozenset(vocabulary.words) if vocabulary else None
    out_schema = caption_schema(extra, embedding, tags=words is not None)
    # Columns carried unchanged keep their schema metadata (CLIP image embedding model/dim).
    carried = {
        k: v for k, v in (schema.metadata or {}).items() if k.startswith(b"raycaption.image_")
    }
    if carried:
        out_schema = out_schema.with_metadata({**(out_schema.metadata or {}), **carried})
    spec = WriteSpec(cfg.output, cfg.run_id, "", out_schema, cfg.storage, None, words)
    committer = Committer(cfg.output, cfg.storage, cfg.run_id, TableIndex())
    committer.open()
    totals = WriteTotals()
    rows = sum(_num_rows(fs, f) for f in files)
    if rows:
        _ensure_ray(cfg)
        lo, hi = cfg.compute.concurrency
        _wait_for_resources(0, lo, cfg.compute.num_cpus, RESOURCE_WAIT_S)
        ds = ray.data.read_parquet(
            files, filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning=None
        )
        ds = ds.map_batches(
            TagActor,
            batch_format="pyarrow",
            batch_size=cfg.embed.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=cfg.compute.num_cpus,
            fn_constructor_kwargs={
                "embed_cfg": cfg.embed,
                "tag_cfg": cfg.tags,
                "vocabulary": vocabulary,
            },
        )
        ds = ds.map_batches(
            write_block,
            batch_format="pyarrow",
            batch_size=cfg.compute.rows_per_file,
            fn_kwargs={"spec": spec},
            **WRITE_TASK_OPTIONS,
        )
        stream_commits(ds, committer, totals, every_s=30.0)
    committer.ensure_tables({"captions": out_schema, "errors": ERROR_SCHEMA})
    committer.finish()
    committed = totals
    errors = committed.errors
    summary = {
        "run_id": cfg.run_id,
        "kind": "tag",
        "input": storage.redact(cfg.input),
        "output": storage.redact(cfg.output),
        "rows": rows,
        "tagged": committed.captioned,
        "errors": errors,
        "errors_by_code": dict(committed.error_codes),
        "new_tags": dict(committed.new_tags.most_common(100)),
        "tag_vocabulary": vocabulary.version if vocabulary else None,
        "seconds": round(time.perf_counter() - started, 3),
        "config": cfg.to_dict(),
    }
    if committed.captioned + errors != rows:
        raise RuntimeError(f"{rows} rows in but {committed.captioned} + {errors} written")
    out_fs, out_path = storage.filesystem(storage.join(cfg.output, "summary.json"), cfg.storage)
    with out_fs.open(out_path, "w") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


def _num_rows(fs, path: str) -> int:
    """Row count from the Parquet footer alone."""
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows
