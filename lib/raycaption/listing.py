"""List inputs (a prefix or a manifest) into Parquet listing shards.

The driver streams the listing straight into shards under the run folder, so millions of
keys never sit in its memory at once; Ray Data then reads the shards in parallel. The
shards are also the run's record of exactly which inputs it saw.

Listing schema: ``image_id, source_uri, input_size, input_error, fetch_uri, partition, todo``
plus every extra manifest column (a manifest column whose name the pipeline owns is renamed
``input_<name>``). ``todo`` is False for inputs that already have a committed row the run
keeps; the shards still list them, so a run can be replayed on exactly the same inputs.

A prefix whose top-level folders are all ``<key>=<value>`` (hive style, e.g. ``dt=2026-11-21``)
is partitioned: ``--since/--until/--partitions`` choose folders before anything below them is
listed, and each row carries its folder in ``partition``.
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raycaption import storage
from raycaption.config import (
    MANIFEST_SUFFIXES,
    RESERVED_COLUMNS,
    URI_COLUMN_CANDIDATES,
    CaptionConfig,
    InputConfig,
    prompt_fields,
)
from raycaption.errors import ConfigError

logger = logging.getLogger(__name__)

BASE_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("source_uri", pa.string()),
    pa.field("input_size", pa.int64()),
    pa.field("input_error", pa.string()),
    # The URI as given when it differs from source_uri (signed URLs, user:password@): needed
    # to fetch it, so it stays in the listing shards only, never in the output tables.
    pa.field("fetch_uri", pa.string()),
    pa.field("partition", pa.string()),  # "dt=2026-11-21" for partitioned prefixes
    pa.field("todo", pa.bool_()),
]
_ROWS_PER_WRITE = 10_000
_PARTITION_DIR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=([^/]+)$")


@dataclass
class ListingReport:
    """What the listing step produced."""

    rows: int = 0
    todo: int = 0
    invalid: int = 0
    duplicates_skipped: int = 0
    shards: list[str] = field(default_factory=list)
    extra_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    partition_key: str | None = None
    partitions: list[str] = field(default_factory=list)  # folders selected ("dt=…")


def manifest_format(inp: InputConfig) -> str | None:
    """``parquet``/``csv``/``jsonl`` for a manifest input, None for a prefix."""
    suffix = posixpath.splitext(inp.uri.split("?")[0].rstrip("/"))[1].lower()
    fmt = MANIFEST_SUFFIXES.get(suffix)
    if inp.manifest is True and fmt is None:
        raise ConfigError(
            f"--manifest given but {inp.uri!r} has no manifest suffix "
            f"({', '.join(sorted(MANIFEST_SUFFIXES))})"
        )
    return None if inp.manifest is False else fmt


class _Source:
    """One input: yields Arrow batches of {source_uri, input_size, input_error, extras...}."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.fmt = manifest_format(cfg.input)
        self.uri_column: str | None = None
        self.extra_schema = pa.schema([])
        self.partition_key: str | None = None
        self.partitions: list[str] = []
        self.replay_files: list[str] = []
        if cfg.backfill.replay:
            self.fmt = None
            self._open_replay()
        elif self.fmt:
            self._open_manifest_schema()
        else:
            self.find_partitions()

    # -- replays ---------------------------------------------------------------------------
    def _open_replay(self) -> None:
        """Reuse the listing shards an earlier run saved under ``_runs/<run_id>/listing``."""
        url = storage.join(self.cfg.output, "_runs", self.cfg.backfill.replay, "listing")
        fs, path = storage.filesystem(url, self.cfg.storage)
        self.replay_files = storage.parquet_files(fs, path)
        if not self.replay_files:
            raise ConfigError(f"--replay: run {self.cfg.backfill.replay!r} saved no listing")
        with fs.open(self.replay_files[0], "rb") as f:
            schema = pq.read_schema(f)
        base = {f.name for f in BASE_FIELDS}
        self.extra_schema = pa.schema([f for f in schema if f.name not in base])
        parts: set[str] = set()
        for path in self.replay_files:
            with fs.open(path, "rb") as f:
                parts.update(p for p in pq.read_table(f, columns=["partition"])[0].to_pylist() if p)
        self.partitions = sorted(parts)
        self.partition_key = self.partitions[0].split("=", 1)[0] if parts else None

    def _replay_batches(self) -> Iterator[pa.Table]:
        fs, _ = storage.filesystem(self.cfg.output, self.cfg.storage)
        keep = [f.name for f in BASE_FIELDS if f.name not in ("image_id", "todo")]
        for path in self.replay_files:
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=_ROWS_PER_WRITE):
                    yield pa.Table.from_batches([batch]).select(keep + self.extra_schema.names)

    # -- manifests -------------------------------------------------------------------------
    def _open(self):
        fs, path = storage.filesystem(self.cfg.input.uri, self.cfg.storage)
        return fs.open(path, "rb")

    def _batches(self) -> Iterator[pa.RecordBatch]:
        f = self._open()
        try:
            if self.fmt == "parquet":
                yield from pq.ParquetFile(f).iter_batches(batch_size=_ROWS_PER_WRITE)
            elif self.fmt == "csv":
                # CSV is untyped: carry every column as a string rather than guess per block.
                reader = pacsv.open_csv(
                    f, convert_options=pacsv.ConvertOptions(column_types=self._csv_types(f))
                )
                yield from reader
            else:
                yield from pajson.open_json(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(
                f"cannot read manifest {storage.redact(self.cfg.input.uri)}: {exc}"
            ) from None
        finally:
            f.close()

    def _csv_types(self, f) -> dict[str, pa.DataType]:
        pos = f.tell()
        header = pacsv.open_csv(f).schema.names
        f.seek(pos)
        return dict.fromkeys(header, pa.string())

    def _open_manifest_schema(self) -> None:
        try:
            first = next(iter(self._batches()), None)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - report any parse failure as bad input
            raise ConfigError(
                f"cannot read manifest {storage.redact(self.cfg.input.uri)}: {exc}"
            ) from None
        if first is None:
            raise ConfigError(f"manifest {storage.redact(self.cfg.input.uri)} is empty")
        names = first.schema.names
        col = self.cfg.input.uri_column
        if col is None:
            col = next((c for c in URI_COLUMN_CANDIDATES if c in names), None)
            if col is None:
                raise ConfigError(
                    f"manifest has no URI column (tried {', '.join(URI_COLUMN_CANDIDATES)}); "
                    f"its columns are {names}; name one with --uri-column"
                )
        elif col not in names:
            raise ConfigError(f"--uri-column {col!r} is not in the manifest (columns: {names})")
        self.uri_column = col
        extras = [f for f in first.schema if f.name != col]
        renamed = [
            f.with_name(f"input_{f.name}") if f.name in RESERVED_COLUMNS else f for f in extras
        ]
        self.extra_schema = pa.schema(renamed)

    def _manifest_batches(self) -> Iterator[pa.Table]:
        base = posixpath.dirname(self.cfg.input.uri.split("?")[0])
        for batch in self._batches():
            uris = batch.column(self.uri_column).to_pylist()
            resolved = [_resolve(u, base) for u in uris]
            extras = batch.drop_columns([self.uri_column]).rename_columns(self.extra_schema.names)
            table = pa.Table.from_batches([extras])
            if self.extra_schema.names:  # casting a column-less table drops its rows
                table = table.cast(self.extra_schema)
            given = [r[0] for r in resolved]
            shown = [storage.redact(u) if u else u for u in given]
            fetch = [g if g != s else None for g, s in zip(given, shown, strict=True)]
            table = table.add_column(0, "source_uri", pa.array(shown, pa.string()))
            table = table.append_column("fetch_uri", pa.array(fetch, pa.string()))
            table = table.add_column(1, "input_size", pa.nulls(len(resolved), pa.int64()))
            table = table.add_column(
                2, "input_error", pa.array([r[1] for r in resolved], pa.string())
            )
            yield table.append_column("partition", pa.nulls(table.num_rows, pa.string()))

    # -- prefixes --------------------------------------------------------------------------
    def find_partitions(self) -> None:
        """Detect hive-style top-level folders and apply the partition selection."""
        b = self.cfg.backfill
        self.partition_key, self.partitions = None, []
        if self.fmt:
            return
        fs, path = storage.filesystem(self.cfg.input.uri, self.cfg.storage)
        if fs.isfile(path):
            return
        entries = fs.ls(path, detail=True)
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries]
        dirs = [n for n, e in zip(names, entries, strict=True) if e["type"] == "directory"]
        matches = [_PARTITION_DIR.match(n) for n in dirs]
        keys = {m.group(1) for m in matches if m}
        hive = bool(dirs) and len(dirs) == len(names) and all(matches) and len(keys) == 1
        key = b.partition_key or (keys.pop() if hive else None)
        if key is None:
            if b.selects_partitions:
                raise ConfigError(
                    f"--since/--until/--partitions need <key>=<value> folders directly under "
                    f"{storage.redact(self.cfg.input.uri)}; found {sorted(names)[:5]}"
                )
            return
        values = sorted(m.group(2) for m in matches if m and m.group(1) == key)
        if not values:
            raise ConfigError(
                f"--partition-key {key}: no {key}=<value> folders under "
                f"{storage.redact(self.cfg.input.uri)}"
            )
        chosen = [
            v
            for v in values
            if (not b.partitions or v in b.partitions)
            and (not b.since or v >= b.since)
            and (not b.until or v <= b.until)
        ]
        missing = sorted(set(b.partitions) - set(values))
        if missing:
            raise ConfigError(f"--partitions {missing} not found (there are {values[:10]})")
        self.partition_key = key
        self.partitions = [f"{key}={v}" for v in chosen]

    def _prefix_batches(self) -> Iterator[pa.Table]:
        root = self.cfg.input.uri.rstrip("/")
        if self.partition_key is None:
            yield from self._folder_batches(root, root, None)
            return
        for part in self.partitions:
            yield from self._folder_batches(root, f"{root}/{part}", part)

    def _folder_batches(self, root: str, folder: str, part: str | None) -> Iterator[pa.Table]:
        exts = {e.lower().lstrip(".") for e in self.cfg.input.extensions}
        pattern = self.cfg.input.glob
        uris: list[str] = []
        sizes: list[int | None] = []
        for uri, size in storage.iter_files(folder, self.cfg.storage):
            if posixpath.splitext(uri)[1].lower().lstrip(".") not in exts:
                continue
            if pattern and not fnmatch.fnmatchcase(uri[len(root) :].lstrip("/"), pattern):
                continue
            uris.append(uri)
            sizes.append(size)
            if len(uris) >= _ROWS_PER_WRITE:
                yield _prefix_table(uris, sizes, part)
                uris, sizes = [], []
        if uris:
            yield _prefix_table(uris, sizes, part)

    def tables(self) -> Iterator[pa.Table]:
        if self.replay_files:
            return self._replay_batches()
        return self._manifest_batches() if self.fmt else self._prefix_batches()


def _prefix_table(uris: list[str], sizes: list[int | None], part: str | None) -> pa.Table:
    return pa.table(
        {
            "source_uri": pa.array(uris, pa.string()),
            "input_size": pa.array(sizes, pa.int64()),
            "input_error": pa.nulls(len(uris), pa.string()),
            "fetch_uri": pa.nulls(len(uris), pa.string()),
            "partition": pa.array([part] * len(uris), pa.string()),
        }
    )


def _resolve(uri: object, base: str) -> tuple[str | None, str | None]:
    """A manifest cell -> (absolute URL, None) or (cell text, reason it is invalid)."""
    if uri is None or (isinstance(uri, str) and not uri.strip()):
        return ("" if uri is None else uri), "empty URI"
    if not isinstance(uri, str):
        return str(uri), f"URI must be a string, got {type(uri).__name__}"
    uri = uri.strip()
    if "://" in uri:
        proto = uri.split("://", 1)[0].lower()
        try:
            fsspec.get_filesystem_class(proto)
        except (ValueError, ImportError):
            return uri, f"unsupported protocol {proto!r}"
        return uri, None
    if uri.startswith("/"):
        return uri, None
    # Relative paths are relative to the manifest's folder (same protocol).
    return posixpath.join(base, uri) if base else uri, None


def check_prompt_columns(cfg: CaptionConfig, source_columns: list[str]) -> None:
    """Prompt fields and tag context columns must be columns the input provides."""
    wanted = {
        "--prompt": prompt_fields(cfg.model.prompt) if cfg.model.prompt else [],
        "--tag-columns": list(cfg.tags.context_columns) if cfg.tags.enabled else [],
    }
    for flag, names in wanted.items():
        missing = [f for f in names if f not in source_columns]
        if missing:
            raise ConfigError(
                f"{flag} uses {missing} but the input only provides "
                f"{source_columns or 'no columns'} (they come from manifest columns)"
            )


Select = Callable[[pa.Array], np.ndarray]
"""Given a batch of listing image ids, which still need processing (the resume filter)."""


def open_source(cfg: CaptionConfig) -> _Source:
    """Check the input and find its partitions, before anything is listed."""
    source = _Source(cfg)
    check_prompt_columns(cfg, source.extra_schema.names)
    return source


def write_listing(
    cfg: CaptionConfig, listing_dir: str, select: Select | None = None, source=None
) -> ListingReport:
    """Stream the inputs into Parquet shards under ``listing_dir``; return what was listed.

    ``select`` marks which rows still need processing (``todo``); None means all of them.
    """
    source = source or open_source(cfg)
    schema = pa.schema(BASE_FIELDS + list(source.extra_schema))
    report = ListingReport(extra_schema=source.extra_schema)
    fs, root = storage.filesystem(listing_dir, cfg.storage)
    fs.makedirs(root, exist_ok=True)
    # Prefixes cannot repeat a key (nor can a replayed listing, deduplicated when written).
    seen: set[bytes] | None = set() if source.fmt else None
    writer: _ShardWriter | None = None
    limit = cfg.input.limit
    for table in source.tables():
        if limit is not None:
            table = table.slice(0, max(0, limit - report.rows))
        if table.num_rows == 0:
            break
        ids, keep = [], []
        for uri in table.column("source_uri").to_pylist():
            iid = storage.image_id_for(uri or "")
            dup = seen is not None and _seen_before(seen, iid)
            keep.append(not dup)
            if not dup:
                ids.append(iid)
        if not all(keep):
            report.duplicates_skipped += keep.count(False)
            table = table.filter(pa.array(keep))
        id_array = pa.array(ids, pa.string())
        todo = select(id_array) if select else np.ones(len(ids), dtype=bool)
        table = table.add_column(0, "image_id", id_array).append_column("todo", pa.array(todo))
        table = table.select(schema.names).cast(schema)
        if writer is None or writer.rows >= cfg.compute.listing_shard_rows:
            if writer:
                writer.close()
            path = f"{root}/part-{len(report.shards):05d}.parquet"
            writer = _ShardWriter(fs, path, schema)
            report.shards.append(storage.unstrip(storage.protocol_of(listing_dir), path))
        writer.write(table)
        report.rows += table.num_rows
        report.todo += int(np.count_nonzero(todo))
        report.invalid += table.num_rows - table.column("input_error").null_count
    if writer:
        writer.close()
    report.partition_key, report.partitions = source.partition_key, source.partitions
    logger.info(
        "listed %d inputs (%d to process, %d invalid, %d duplicates skipped) into %d shard(s)",
        report.rows,
        report.todo,
        report.invalid,
        report.duplicates_skipped,
        len(report.shards),
    )
    return report


def _seen_before(seen: set[bytes], image_id: str) -> bool:
    key = bytes.fromhex(image_id[:16])  # 8 bytes per id keeps the set small
    if key in seen:
        return True
    seen.add(key)
    return False


class _ShardWriter:
    def __init__(self, fs, path: str, schema: pa.Schema):
        self._file = fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._file, schema)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
        self._file.close()
