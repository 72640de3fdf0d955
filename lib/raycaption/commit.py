"""Exactly-once commits on plain object storage: owns the resume set and ``_SUCCESS``.

Write tasks put finished Parquet files under ``_staging/<run_id>/``, where no reader of the
tables looks. The driver commits them in groups, one commit at a time across every run that
writes the same output (``_commit.lock``, created with an exclusive create):

1. ids of the group that already have a committed row (a forced redo, a retried failure, a
   stale fingerprint, a concurrent attempt, a block Ray re-executed) are looked up in the
   in-memory :class:`TableIndex`; the files holding those older rows are rewritten into
   staging without them;
2. a commit record ``_commits/<run_id>-<seq>.json`` lists the moves and deletions, state
   ``pending``;
3. staged files move into ``captions/`` and ``errors/`` (one object per file: a reader sees
   a whole file or nothing) and the replaced files are deleted;
4. the record is rewritten with state ``done``.

A run that dies between 2 and 4 leaves a pending record, which the next run finishes (roll
forward) before it reads the tables, so every id converges to exactly one row. Files a
writer left half-written (fsspec uploads what it has when a writer raises inside
``with fs.open(...)``) or that a killed process left behind stay in staging, are never
listed in a record, and are deleted by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycaption import storage
from raycaption.config import StorageConfig

logger = logging.getLogger(__name__)

TABLES = ("captions", "errors")
COMMITS_DIR = "_commits"
STAGING_DIR = "_staging"
LOCK_FILE = "_commit.lock"
SUCCESS_FILE = "_SUCCESS"
# A commit holds the lock for seconds; a lock this old belongs to a driver that died.
LOCK_STALE_S = 600.0
# Staging folders of other runs are left alone this long (they may still be running).
ORPHAN_AGE_S = 24 * 3600.0

FRESH, STALE, FAILED = 0, 1, 2  # TableIndex.kind: caption (current fingerprint), caption, error


def _member(keys: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    if not len(sorted_unique):
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_unique, keys).clip(0, len(sorted_unique) - 1)
    return sorted_unique[pos] == keys


def id_keys(ids: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The first 8 bytes of each hex image id as uint64: compact keys for the resume set."""
    if not isinstance(ids, list):
        ids = ids.to_pylist()
    return np.fromiter((int(i[:16], 16) for i in ids), dtype=np.uint64, count=len(ids))


class TableIndex:
    """Every committed row of the output, as id key -> (file, kind).

    Holds two numpy arrays per row (16 bytes), so ten million rows take about 160 MB on the
    driver. ``uri_keys`` (content ids only) maps the source URI of each row to its kind so the
    listing can skip objects already seen at that URI.
    """

    def __init__(self, fingerprint: str | None = None, with_uris: bool = False):
        self.fingerprint = fingerprint
        self.with_uris = with_uris
        self.files: list[str] = []
        self.keys = np.empty(0, np.uint64)
        self.file_idx = np.empty(0, np.int32)
        self.kind = np.empty(0, np.int8)
        self.uri_keys = np.empty(0, np.uint64)
        self.duplicates = 0
        self._sorted: dict = {}  # (column, kinds) -> sorted unique keys; cleared on change
        self._chunks: list[tuple] = []  # appended rows not yet in the arrays (see _flush)

    def __len__(self) -> int:
        self._flush()
        return int(np.count_nonzero(self.file_idx >= 0))

    # -- building --------------------------------------------------------------------------
    def add_file(self, path: str, table_name: str, columns: pa.Table) -> None:
        """Index one committed file from its ``image_id`` (and fingerprint) columns."""
        keys = id_keys(columns.column("image_id"))
        if table_name == "errors":
            kind = np.full(len(keys), FAILED, np.int8)
        elif "fingerprint" in columns.column_names and self.fingerprint:
            fresh = pc.equal(columns.column("fingerprint"), self.fingerprint)
            fresh = pc.fill_null(fresh, False).to_numpy(zero_copy_only=False)
            kind = np.where(fresh, FRESH, STALE).astype(np.int8)
        else:
            kind = np.full(len(keys), STALE, np.int8)
        uri_keys = None
        if self.with_uris:
            uris = [storage.image_id_for(u or "") for u in columns.column("source_uri").to_pylist()]
            uri_keys = id_keys(uris)
        self.add_keys(path, keys, kind, uri_keys)

    def add_keys(
        self, path: str, keys: np.ndarray, kind: np.ndarray, uri_keys: np.ndarray | None = None
    ) -> None:
        """Index the rows of one committed file (arrays are joined once, in _flush)."""
        self._sorted.clear()
        idx = len(self.files)
        self.files.append(path)
        if self.with_uris and uri_keys is None:  # only needed before the run; keep aligned
            uri_keys = np.zeros(len(keys), np.uint64)
        self._chunks.append((keys, np.full(len(keys), idx, np.int32), kind, uri_keys))

    def _flush(self) -> None:
        if not self._chunks:
            return
        parts = list(zip(*self._chunks, strict=True))
        self._chunks = []
        self.keys = np.concatenate([self.keys, *parts[0]])
        self.file_idx = np.concatenate([self.file_idx, *parts[1]])
        self.kind = np.concatenate([self.kind, *parts[2]])
        if self.with_uris:
            self.uri_keys = np.concatenate([self.uri_keys, *parts[3]])

    def drop_file(self, path: str) -> None:
        """Forget the rows of a file that was deleted or rewritten."""
        self._flush()
        self._sorted.clear()
        try:
            idx = self.files.index(path)
        except ValueError:
            return
        self.file_idx[self.file_idx == idx] = -1

    def compact(self) -> None:
        self._flush()
        self._sorted.clear()
        live = self.file_idx >= 0
        self.keys, self.file_idx, self.kind = self.keys[live], self.file_idx[live], self.kind[live]
        if self.with_uris:
            self.uri_keys = self.uri_keys[live]
        self.duplicates = len(self.keys) - len(np.unique(self.keys))

    # -- queries ---------------------------------------------------------------------------
    def contains(self, keys: np.ndarray, kinds: tuple[int, ...] | None = None) -> np.ndarray:
        """Boolean mask: which ``keys`` have a live committed row (of the given kinds)."""
        return _member(keys, self._sorted_keys("keys", kinds))

    def contains_uri(self, uri_keys: np.ndarray, kinds: tuple[int, ...]) -> np.ndarray:
        return _member(uri_keys, self._sorted_keys("uri_keys", kinds))

    def _sorted_keys(self, column: str, kinds: tuple[int, ...] | None) -> np.ndarray:
        # Sorted once per index state, so each listing batch costs a binary search per key
        # instead of a sort of the whole index.
        cached = self._sorted.get((column, kinds))
        if cached is None:
            self._flush()
            mask = self.file_idx >= 0
            if kinds is not None:
                mask &= np.isin(self.kind, kinds)
            cached = self._sorted[(column, kinds)] = np.unique(getattr(self, column)[mask])
        return cached

    def files_holding(self, keys: np.ndarray) -> list[str]:
        """Committed files that hold a row for any of ``keys``."""
        self._flush()
        hit = (self.file_idx >= 0) & np.isin(self.keys, keys)
        return [self.files[i] for i in np.unique(self.file_idx[hit])]

    def keys_of_kind(self, kinds: tuple[int, ...]) -> np.ndarray:
        self._flush()
        mask = (self.file_idx >= 0) & np.isin(self.kind, kinds)
        return np.unique(self.keys[mask])


@dataclass
class StagedFile:
    """A finished file in staging, reported by a write task."""

    path: str  # filesystem path (no protocol)
    table: str  # captions | errors
    keys: np.ndarray


@dataclass
class CommitStats:
    """What the commits of one run did."""

    commits: int = 0
    files: int = 0
    rows: int = 0
    replaced: int = 0
    duplicates_dropped: int = 0
    by_table: Counter = field(default_factory=Counter)


class CommitLock:
    """Mutual exclusion between runs committing to one output.

    Exclusive create is atomic on local disks (``O_EXCL``) and on S3 (``If-None-Match: *``,
    which S3 and its compatible stores honour); other fsspec backends fall back to
    check-then-write, which only narrows the race.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, owner: str, wait_s: float = 900):
        self.fs, self.path, self.owner, self.wait_s = fs, path, owner, wait_s

    def __enter__(self) -> CommitLock:
        deadline = time.monotonic() + self.wait_s
        body = json.dumps({"run_id": self.owner, "time": time.time()}).encode()
        delay = 0.05
        while True:
            if self._create(body):
                return self
            holder = self._holder()
            if holder == json.loads(body):  # our own create, retried after a lost reply
                return self
            if holder is not None and time.time() - holder.get("time", 0) > LOCK_STALE_S:
                logger.warning("breaking a stale commit lock held by run %s", holder.get("run_id"))
                self.fs.rm(self.path)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"commit lock held by {holder} for over {self.wait_s:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def __exit__(self, *exc) -> None:
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            logger.warning("commit lock was already gone (broken as stale?)")

    def _create(self, body: bytes) -> bool:
        if storage.is_local(self.fs):
            self.fs.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        try:
            self.fs.pipe_file(self.path, body, mode="create")
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc):
                return False
            raise
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return None


class Committer:
    """The driver's side of the protocol: recovers, loads the index, commits groups."""

    def __init__(
        self,
        output: str,
        storage_cfg: StorageConfig,
        run_id: str,
        index: TableIndex,
        scope: list[str] | None = None,
    ):
        self.output = output.rstrip("/")
        self.storage_cfg = storage_cfg
        self.run_id = run_id
        self.index = index
        # Partition folders ("dt=2026-11-21") this run may touch; None = the whole table.
        self.scope = scope
        self.fs, self.root = storage.filesystem(self.output, storage_cfg)
        self.root = self.root.rstrip("/")
        self.staging = f"{self.root}/{STAGING_DIR}/{run_id}"
        self.stats = CommitStats()
        self._seq = 0
        self._seen_records: set[str] = set()

    # -- set-up ----------------------------------------------------------------------------
    def lock(self) -> CommitLock:
        return CommitLock(self.fs, f"{self.root}/{LOCK_FILE}", self.run_id)

    def open(self) -> TableIndex:
        """Finish any interrupted commit, then index the committed tables."""
        with self.lock():
            self._roll_forward()
            self._load_index()
        self._clean_orphans()
        return self.index

    def _records(self) -> list[str]:
        base = f"{self.root}/{COMMITS_DIR}"
        if not self.fs.exists(base):
            return []
        return sorted(p for p in self.fs.ls(base, detail=False) if p.endswith(".json"))

    def _roll_forward(self) -> None:
        for path in self._records():
            self._read_record(path)
            self._seen_records.add(path)

    def _read_record(self, path: str) -> dict:
        """A commit record; one left ``pending`` by a dead driver is finished first."""
        record = json.loads(self.fs.cat_file(path))
        if record["state"] != "done":
            logger.warning("finishing interrupted commit %s", path.rsplit("/", 1)[-1])
            self._apply(record)
            record["state"] = "done"
            self.fs.pipe_file(path, json.dumps(record).encode())
        return record

    def _apply(self, record: dict) -> None:
        """Idempotent: safe to repeat after a crash at any point."""
        for src, dst in record["add"]:
            if self.fs.exists(src):
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(src, dst)
        for path in record["remove"]:
            if self.fs.exists(path):
                self.fs.rm(path)

    def table_files(self) -> list[tuple[str, str]]:
        """(table, path) of every committed Parquet file in scope."""
        out = []
        for table in TABLES:
            base = f"{self.root}/{table}"
            dirs = [base] if self.scope is None else [f"{base}/{p}" for p in self.scope]
            for d in dirs:
                files = storage.parquet_files(self.fs, d)
                if self.scope is not None:
                    files = [f for f in files if "/" not in f[len(d) + 1 :]]
                out.extend((table, f) for f in files)
        if self.scope is not None:  # files at the top level (e.g. empty-table markers)
            for table in TABLES:
                base = f"{self.root}/{table}"
                if self.fs.exists(base):
                    out.extend(
                        (table, p) for p in self.fs.ls(base, detail=False) if p.endswith(".parquet")
                    )
        return out

    def _load_index(self) -> None:
        files = self.table_files()
        columns = ["image_id", "fingerprint"] + (["source_uri"] if self.index.with_uris else [])

        def read(item):
            table, path = item
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = [c for c in columns if c in pf.schema_arrow.names]
                return table, path, pf.read(columns=names)

        with ThreadPoolExecutor(8) as pool:
            for table, path, cols in pool.map(read, files):
                self.index.add_file(path, table, cols)
        self.index.compact()
        if self.index.duplicates:
            logger.warning(
                "%d ids have more than one committed row (written before this version?); "
                "a run that redoes them keeps one",
                self.index.duplicates,
            )

    def _clean_orphans(self) -> None:
        base = f"{self.root}/{STAGING_DIR}"
        if not self.fs.exists(base):
            return
        # Every record was finished under the lock just before, so any staging folder of a run
        # this old holds only files no record names.
        for d in self.fs.ls(base, detail=False):
            run = d.rstrip("/").rsplit("/", 1)[-1]
            if run != self.run_id and _age_s(run) > ORPHAN_AGE_S:
                logger.info("removing staging files of run %s", run)
                self.fs.rm(d, recursive=True)

    # -- commits ---------------------------------------------------------------------------
    def final_path(self, staged: str) -> str:
        return self.root + staged[len(self.staging) :]

    def commit(self, group: list[StagedFile]) -> None:
        """Make ``group`` visible, replacing older rows for the same ids."""
        if not group:
            return
        with self.lock():
            self._catch_up()
            group = self._drop_duplicates_within(group)
            keys = np.concatenate([g.keys for g in group]) if group else np.empty(0, np.uint64)
            replaced = self.index.contains(keys)
            add: list[tuple[str, str]] = [(g.path, self.final_path(g.path)) for g in group]
            remove: list[str] = []
            rewritten: list[tuple[str, str, pa.Table]] = []
            if replaced.any():
                old_keys = keys[replaced]
                for path in self.index.files_holding(old_keys):
                    table_name = _table_of(path, self.root)
                    kept = self._without(path, old_keys)
                    remove.append(path)
                    if kept.num_rows:
                        src = self._staged_beside(path)
                        write_parquet(self.fs, src, kept)
                        add.append((src, self.final_path(src)))
                        rewritten.append((self.final_path(src), table_name, kept))
                self.stats.replaced += int(replaced.sum())
            self._seq += 1
            name = f"{self.run_id}-{self._seq:06d}-{uuid.uuid4().hex[:6]}.json"
            record_path = f"{self.root}/{COMMITS_DIR}/{name}"
            record = {"run_id": self.run_id, "state": "pending", "add": add, "remove": remove}
            self.fs.makedirs(f"{self.root}/{COMMITS_DIR}", exist_ok=True)
            self.fs.pipe_file(record_path, json.dumps(record).encode())
            self._apply(record)
            record["state"] = "done"
            self.fs.pipe_file(record_path, json.dumps(record).encode())
            self._seen_records.add(record_path)
            for path in remove:
                self.index.drop_file(path)
            kinds = {"captions": FRESH, "errors": FAILED}
            for g in group:
                kind = np.full(len(g.keys), kinds[g.table], np.int8)
                self.index.add_keys(self.final_path(g.path), g.keys, kind)
            for path, table_name, kept in rewritten:
                self.index.add_file(path, table_name, kept)
            self.index.compact()
        self.stats.commits += 1
        self.stats.files += len(group)
        self.stats.rows += int(sum(len(g.keys) for g in group))
        for g in group:
            self.stats.by_table[g.table] += len(g.keys)

    def _staged_beside(self, old_final: str) -> str:
        """A staging path that lands in the same table/partition folder as ``old_final``."""
        rel = old_final[len(self.root) + 1 :]  # captions/dt=.../part.parquet
        folder = rel.rsplit("/", 1)[0]
        return f"{self.staging}/{folder}/rewrite-{uuid.uuid4().hex[:12]}.parquet"

    def _without(self, path: str, keys: np.ndarray) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        keep = ~np.isin(id_keys(table.column("image_id")), keys)
        return table.filter(pa.array(keep))

    def _drop_duplicates_within(self, group: list[StagedFile]) -> list[StagedFile]:
        """Keep the first row of an id that appears in two files of one group."""
        seen: set[int] = set()
        out = []
        for g in group:
            dup = np.array([int(k) in seen for k in g.keys], dtype=bool)
            seen.update(int(k) for k in g.keys)
            if not dup.any():
                out.append(g)
                continue
            self.stats.duplicates_dropped += int(dup.sum())
            with self.fs.open(g.path, "rb") as f:
                table = pq.read_table(f)
            # Drop the keys seen in earlier files, and repeats inside this file.
            _, first = np.unique(g.keys, return_index=True)
            keep = np.zeros(len(g.keys), dtype=bool)
            keep[first] = True
            keep &= ~dup
            table = table.filter(pa.array(keep))
            self.fs.rm(g.path)
            if table.num_rows:
                path = g.path.replace(".parquet", "-dedup.parquet")
                write_parquet(self.fs, path, table)
                out.append(StagedFile(path, g.table, g.keys[keep]))
        return out

    def _catch_up(self) -> None:
        """Apply commits other runs made since this run loaded its index."""
        for path in self._records():
            if path in self._seen_records:
                continue
            record = self._read_record(path)
            for p in record["remove"]:
                self.index.drop_file(p)
            for _, dst in record["add"]:
                if self.scope is None or any(f"/{s}/" in dst for s in self.scope):
                    table_name = _table_of(dst, self.root)
                    with self.fs.open(dst, "rb") as f:
                        cols = pq.read_table(f, columns=["image_id"])
                    self.index.add_file(dst, table_name, cols)
            self._seen_records.add(path)
        self.index.compact()

    # -- end of run ------------------------------------------------------------------------
    def ensure_tables(self, schemas: dict[str, pa.Schema]) -> None:
        """An empty file keeps a table readable (with its schema) when it has no rows."""
        for table, schema in schemas.items():
            base = f"{self.root}/{table}"
            if storage.parquet_files(self.fs, base):
                continue
            write_parquet(self.fs, f"{base}/part-{self.run_id}-empty.parquet", schema.empty_table())

    def finish(self) -> None:
        """Remove this run's staging folder: anything left there was never committed."""
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        base = f"{self.root}/{STAGING_DIR}"
        if storage.is_local(self.fs) and os.path.isdir(base) and not os.listdir(base):
            os.rmdir(base)

    def success_path(self) -> str:
        return f"{self.root}/{SUCCESS_FILE}"

    def clear_success(self) -> None:
        if self.fs.exists(self.success_path()):
            self.fs.rm(self.success_path())

    def write_success(self, text: str) -> None:
        self.fs.pipe_file(self.success_path(), text.encode())


def _table_of(path: str, root: str) -> str:
    return path[len(root) + 1 :].split("/", 1)[0]


def write_parquet(
    fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, fault_point: str | None = None
) -> None:
    """One Parquet file, in the dialect plain pyarrow, DuckDB and Spark all read.

    Written in two row groups so a fault injected between them (tests) leaves exactly the
    half-written object a crashing writer leaves in real life.
    """
    from raycaption import faults

    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    half = table.num_rows // 2
    with fs.open(path, "wb") as f:
        writer = pq.ParquetWriter(
            f,
            table.schema,
            compression="snappy",
            coerce_timestamps="us",  # Spark cannot read nanosecond timestamps
            allow_truncated_timestamps=True,
        )
        writer.write_table(table.slice(0, half))
        if fault_point:
            f.flush()
            faults.maybe_fault(fault_point)
        writer.write_table(table.slice(half))
        writer.close()


def _age_s(run_id: str) -> float:
    """Seconds since a run id's timestamp (``20261122T101500Z-…``); 0 when unparseable."""
    import datetime as dt

    try:
        started = dt.datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=dt.timezone.utc
        )
    except ValueError:
        return 0.0
    return time.time() - started.timestamp()
