"""The commit protocol without Ray: staged files, replacement, roll-forward, the lock."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycaption import faults, storage
from raycaption.commit import (
    FAILED,
    FRESH,
    STALE,
    CommitLock,
    Committer,
    TableIndex,
    id_keys,
    write_parquet,
)
from raycaption.config import StorageConfig
from raycaption.sink import ERROR_SCHEMA, WriteSpec, WriteTotals, caption_schema, write_block

STORE = StorageConfig()
SCHEMA = caption_schema(pa.schema([]))


def ids(*names: str) -> list[str]:
    return [storage.image_id_for(f"/img/{n}.jpg") for n in names]


def block(names, fail=(), partition=None) -> pa.Table:
    """Rows as they leave the caption stage."""
    n = len(names)
    stage = ["decode" if x in fail else None for x in names]
    table = pa.table(
        {
            "image_id": ids(*names),
            "source_uri": [f"/img/{x}.jpg" for x in names],
            "caption": [None if x in fail else f"caption of {x}" for x in names],
            "width": pa.array([4] * n, pa.int32()),
            "height": pa.array([4] * n, pa.int32()),
            "content_sha256": ["0" * 64] * n,
            "stage": pa.array(stage, pa.string()),
            "error_code": pa.array(["decode_failed" if s else None for s in stage], pa.string()),
            "error_message": pa.array(["bad" if s else None for s in stage], pa.string()),
        }
    )
    if partition is not None:
        table = table.append_column("partition", pa.array([partition] * n, pa.string()))
    return table


def stage_rows(out: str, run_id: str, names, fail=(), fingerprint="fp1", partition=None):
    spec = WriteSpec(out, run_id, "m", SCHEMA, STORE, fingerprint)
    totals = WriteTotals()
    return totals.staged_files(write_block(block(names, fail, partition), spec)), totals


def open_committer(out: str, run_id: str, fingerprint="fp1", scope=None) -> Committer:
    c = Committer(out, STORE, run_id, TableIndex(fingerprint), scope)
    c.open()
    return c


def visible(out: str, table: str = "captions") -> pa.Table:
    files = sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(os.path.join(out, table))
        for f in fs
        if f.endswith(".parquet")
    )
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else SCHEMA.empty_table()


def all_ids(out: str) -> Counter:
    return Counter(
        visible(out, "captions").column("image_id").to_pylist()
        + visible(out, "errors").column("image_id").to_pylist()
    )


def test_staged_files_are_invisible_until_committed(tmp_path):
    out = str(tmp_path / "out")
    c = open_committer(out, "20261122T000000Z-a")
    files, totals = stage_rows(out, c.run_id, ["a", "b", "c"], fail=["c"])
    assert totals.captioned == 2 and totals.error_codes == {"decode_failed": 1}
    assert not (tmp_path / "out" / "captions").exists()
    c.commit(files)
    assert sorted(visible(out).column("caption").to_pylist()) == ["caption of a", "caption of b"]
    assert visible(out, "errors").column("image_id").to_pylist() == ids("c")
    record = json.loads(next((tmp_path / "out" / "_commits").iterdir()).read_text())
    assert record["state"] == "done" and len(record["add"]) == 2
    assert not (tmp_path / "out" / "_commit.lock").exists()
    assert set(visible(out).column("fingerprint").to_pylist()) == {"fp1"}


def test_a_redo_replaces_older_rows_in_either_table(tmp_path):
    out = str(tmp_path / "out")
    first = open_committer(out, "20261122T000000Z-a")
    files, _ = stage_rows(out, first.run_id, ["a", "b", "c", "d"], fail=["d"])
    first.commit(files)
    # A later run redoes b (new fingerprint) and d (retry succeeds) and adds e.
    second = open_committer(out, "20261122T000001Z-b", fingerprint="fp2")
    index = second.index
    assert index.contains(id_keys(ids("a", "d", "z")), (STALE,)).tolist() == [True, False, False]
    assert index.contains(id_keys(ids("d")), (FAILED,)).tolist() == [True]
    files, _ = stage_rows(out, second.run_id, ["b", "d", "e"], fingerprint="fp2")
    second.commit(files)
    counts = all_ids(out)
    assert set(counts.values()) == {1}, counts
    assert set(counts) == set(ids("a", "b", "c", "d", "e"))
    assert visible(out, "errors").num_rows == 0
    fp = dict(
        zip(*[visible(out).column(c).to_pylist() for c in ("image_id", "fingerprint")], strict=True)
    )
    assert fp[ids("a")[0]] == "fp1" and fp[ids("b")[0]] == "fp2"
    assert second.stats.replaced == 2
    # The index follows the commit: b is now fresh, d is a caption.
    assert second.index.contains(id_keys(ids("b", "d", "e")), (FRESH,)).all()


def test_an_id_written_twice_in_one_group_is_kept_once(tmp_path):
    out = str(tmp_path / "out")
    c = open_committer(out, "20261122T000000Z-a")
    f1, _ = stage_rows(out, c.run_id, ["a", "b"])
    f2, _ = stage_rows(out, c.run_id, ["b", "c"])  # a re-executed block, or same content
    c.commit(f1 + f2)
    assert sorted(all_ids(out).values()) == [1, 1, 1]
    assert c.stats.duplicates_dropped == 1


def test_an_interrupted_commit_is_finished_by_the_next_run(tmp_path):
    out = str(tmp_path / "out")
    c = open_committer(out, "20261122T000000Z-a")
    c.commit(stage_rows(out, c.run_id, ["a", "b"])[0])
    redo = open_committer(out, "20261122T000001Z-b", fingerprint="fp2")
    files, _ = stage_rows(out, redo.run_id, ["a"], fingerprint="fp2")

    # Crash inside _apply after the first move: the record is pending, the replaced file
    # is still there, so `a` is visible twice until someone rolls forward.
    real_apply = redo._apply

    def crash_after_first_move(record):
        src, dst = record["add"][0]
        redo.fs.makedirs(os.path.dirname(dst), exist_ok=True)
        redo.fs.mv(src, dst)
        raise KeyboardInterrupt("driver killed")

    redo._apply = crash_after_first_move
    with pytest.raises(KeyboardInterrupt):
        redo.commit(files)
    redo._apply = real_apply
    assert all_ids(out)[ids("a")[0]] == 2

    open_committer(out, "20261122T000002Z-c", fingerprint="fp2")
    counts = all_ids(out)
    assert set(counts.values()) == {1} and set(counts) == set(ids("a", "b"))
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_commits").iterdir()]
    assert {r["state"] for r in records} == {"done"}


def test_two_attempts_committing_the_same_ids_at_once_keep_one_row_each(tmp_path):
    out = str(tmp_path / "out")
    names = [f"i{n}" for n in range(40)]
    runs = [open_committer(out, f"20261122T00000{k}Z-{k}") for k in range(2)]
    staged = [stage_rows(out, r.run_id, names[k * 10 :] + names[:5])[0] for k, r in enumerate(runs)]
    errors = []

    def commit(run, files):
        try:
            for f in files:  # file by file, interleaving with the other attempt
                run.commit([f])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=commit, args=(r, f)) for r, f in zip(runs, staged, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = all_ids(out)
    assert set(counts) == set(ids(*names)) and set(counts.values()) == {1}


def test_a_writer_that_fails_mid_file_leaves_nothing_visible(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    c = open_committer(out, "20261122T000000Z-a")
    monkeypatch.setenv(faults.ENV, "write_raise:1")
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path / "faults"))
    with pytest.raises(faults.InjectedFault):
        stage_rows(out, c.run_id, ["a", "b", "c", "d"])
    partial = [p for p in (tmp_path / "out" / "_staging").rglob("*.parquet")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # fsspec uploaded half a file
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(partial[0])
    files, _ = stage_rows(out, c.run_id, ["a", "b", "c", "d"])  # Ray's retry of the task
    c.commit(files)
    c.finish()
    assert sorted(all_ids(out).values()) == [1, 1, 1, 1]
    assert not (tmp_path / "out" / "_staging" / c.run_id).exists()


def test_partitions_land_in_their_folder_and_scope_limits_the_index(tmp_path):
    out = str(tmp_path / "out")
    c = open_committer(out, "20261122T000000Z-a")
    c.commit(stage_rows(out, c.run_id, ["a", "b"], partition="dt=2026-11-20")[0])
    c.commit(stage_rows(out, c.run_id, ["c"], partition="dt=2026-11-21")[0])
    assert sorted(os.listdir(tmp_path / "out" / "captions")) == ["dt=2026-11-20", "dt=2026-11-21"]
    scoped = open_committer(out, "20261122T000001Z-b", scope=["dt=2026-11-21"])
    assert len(scoped.index) == 1
    table = pq.read_table(tmp_path / "out" / "captions")  # hive partitioning adds dt
    assert sorted(table.column("dt").to_pylist()) == ["2026-11-20", "2026-11-20", "2026-11-21"]


def test_lock_is_exclusive_and_a_stale_lock_is_broken(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    path = str(tmp_path / "_commit.lock")
    with CommitLock(fs, path, "a"), pytest.raises(TimeoutError), CommitLock(fs, path, "b", 0.3):
        pass
    assert not os.path.exists(path)
    fs.pipe_file(path, json.dumps({"run_id": "dead", "time": time.time() - 3600}).encode())
    with CommitLock(fs, path, "c", wait_s=1):
        assert json.loads(fs.cat_file(path))["run_id"] == "c"


def test_lock_is_exclusive_on_s3(s3):
    fs = s3.fs()
    path = f"{s3.bucket}/locktest/_commit.lock"
    with CommitLock(fs, path, "a"), pytest.raises(TimeoutError), CommitLock(fs, path, "b", 0.3):
        pass
    with CommitLock(fs, path, "c", wait_s=1):
        pass


def test_old_orphaned_staging_is_removed_and_recent_staging_kept(tmp_path):
    out = tmp_path / "out"
    old = out / "_staging" / "20200101T000000Z-old" / "captions"
    recent = out / "_staging" / "20991231T000000Z-new" / "captions"
    for d in (old, recent):
        d.mkdir(parents=True)
        write_parquet(
            __import__("fsspec").filesystem("file"),
            str(d / "x.parquet"),
            ERROR_SCHEMA.empty_table(),
        )
    open_committer(str(out), "20261122T000000Z-a")
    assert not old.parent.exists() and recent.exists()


def test_index_marks_fresh_stale_and_failed_rows(tmp_path):
    out = str(tmp_path / "out")
    c = open_committer(out, "20261122T000000Z-a")
    c.commit(stage_rows(out, c.run_id, ["a", "b"], fail=["b"])[0])
    index = open_committer(out, "20261122T000001Z-b").index
    keys = id_keys(ids("a", "b", "c"))
    assert index.contains(keys, (FRESH,)).tolist() == [True, False, False]
    assert index.contains(keys, (FAILED,)).tolist() == [False, True, False]
    assert np.array_equal(index.keys_of_kind((FRESH,)), id_keys(ids("a")))
