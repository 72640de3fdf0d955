"""Backfill behaviour on a local Ray cluster: resume, skip, fingerprints, --force,
--retry-failed, the error budget, partitions, replays, content ids, missing GPUs."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycaption.cli import main
from raycaption.config import (
    BackfillConfig,
    CaptionConfig,
    ComputeConfig,
    EmbedConfig,
    InputConfig,
    ModelConfig,
    TagConfig,
)
from raycaption.pipeline import OverBudgetError, ResourceError, run_caption

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # "local": a fresh instance even when a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


def jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def make_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.jpg"
        p.write_bytes(jpeg(i))
        paths.append(p)
    return paths


def config(inp, out, model, **backfill) -> CaptionConfig:
    return CaptionConfig(
        input=InputConfig(uri=str(inp)),
        output=str(out),
        model=ModelConfig(name=str(model), max_new_tokens=4),
        embed=EmbedConfig(enabled=False),
        tags=TagConfig(enabled=False),
        compute=ComputeConfig(batch_size=4, rows_per_file=4, num_gpus=0),
        backfill=BackfillConfig(commit_every_s=0, **backfill),
    )


def ids_in(out: Path, table: str) -> Counter:
    return Counter(pq.read_table(out / table).column("image_id").to_pylist())


def snapshot(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_resume_skips_committed_rows_and_a_finished_run_is_a_no_op(
    local_ray, tiny_models, tmp_path
):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, 10)
    first = run_caption(config(images, out, tiny_models["git"]))
    assert (first.processed, first.captioned, first.status) == (10, 10, "succeeded")
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == first.run_id

    make_images(images, 3, start=10)  # a new day's images land in the same prefix
    second = run_caption(config(images, out, tiny_models["git"]))
    assert (second.inputs, second.processed, second.already_done) == (13, 3, 10)
    counts = ids_in(out, "captions")
    assert len(counts) == 13 and set(counts.values()) == {1}

    before = snapshot(out)
    third = run_caption(config(images, out, tiny_models["git"]))
    assert third.status == "up_to_date" and third.processed == 0 and not third.caption_actors
    assert snapshot(out) == before, "a no-op rerun wrote something"
    assert not (out / "_runs" / third.run_id).exists()


def test_a_changed_fingerprint_redoes_stale_rows_and_force_redoes_all(
    local_ray, tiny_models, tmp_path
):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, 6)
    base = run_caption(config(images, out, tiny_models["git"]))
    cfg = config(images, out, tiny_models["git"])
    cfg.model.max_new_tokens = 6  # a generation setting is part of the fingerprint
    redo = run_caption(cfg)
    assert redo.fingerprint != base.fingerprint
    assert (redo.processed, redo.replaced) == (6, 6)
    table = pq.read_table(out / "captions")
    assert table.num_rows == 6 and set(table.column("fingerprint").to_pylist()) == {
        redo.fingerprint
    }
    same = config(images, out, tiny_models["git"])
    same.model.max_new_tokens = 6
    assert run_caption(same).status == "up_to_date"
    forced = config(images, out, tiny_models["git"], force=True)
    forced.model.max_new_tokens = 6
    summary = run_caption(forced)
    assert (summary.processed, summary.replaced) == (6, 6)
    assert set(ids_in(out, "captions").values()) == {1}
    assert set(pq.read_table(out / "captions").column("run_id").to_pylist()) == {summary.run_id}


def test_retry_failed_processes_only_the_errors_and_removes_them(local_ray, tiny_models, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, 4)
    (images / "bad1.jpg").write_bytes(b"not a jpeg")
    (images / "bad2.jpg").write_bytes(jpeg(99)[:40])  # truncated
    first = run_caption(config(images, out, tiny_models["git"]))
    assert (first.captioned, first.errors) == (4, 2)
    # The upstream system re-delivers the two objects intact.
    (images / "bad1.jpg").write_bytes(jpeg(101))
    (images / "bad2.jpg").write_bytes(jpeg(102))
    assert run_caption(config(images, out, tiny_models["git"])).status == "up_to_date"
    retry = run_caption(config(images, out, tiny_models["git"], retry_failed=True))
    assert (retry.processed, retry.captioned, retry.errors, retry.replaced) == (2, 2, 0, 2)
    assert pq.read_table(out / "errors").num_rows == 0
    counts = ids_in(out, "captions")
    assert len(counts) == 6 and set(counts.values()) == {1}


def test_over_the_error_budget_keeps_good_rows_writes_no_success_and_exits_3(
    local_ray, tiny_models, tmp_path
):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, 6)
    for i in range(2):
        (images / f"bad{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(OverBudgetError) as info:
        run_caption(config(images, out, tiny_models["git"], max_error_rate=0.1))
    assert info.value.summary.status == "over_budget"
    assert pq.read_table(out / "captions").num_rows == 6
    assert pq.read_table(out / "errors").num_rows == 2
    assert not (out / "_SUCCESS").exists()
    args = ["caption", "--input", str(images), "--output", str(out), "--model"]
    args += [str(tiny_models["git"]), "--no-embeddings", "--no-tags", "--num-gpus", "0"]
    assert main([*args, "--max-error-rate", "0.1"]) == 3  # still over: errors are rows
    assert main([*args, "--max-error-rate", "0.5"]) == 0
    assert (out / "_SUCCESS").exists()


def test_partitions_select_folders_partition_the_output_and_replay_the_listing(
    local_ray, tiny_models, tmp_path
):
    images, out = tmp_path / "images", tmp_path / "out"
    for k, day in enumerate(("2026-11-20", "2026-11-21", "2026-11-22")):
        make_images(images / f"dt={day}", 2, start=10 * k)
    cfg = config(images, out, tiny_models["git"], since="2026-11-21")
    first = run_caption(cfg)
    assert first.processed == 4 and first.partitions == ["dt=2026-11-21", "dt=2026-11-22"]
    assert sorted(p.name for p in (out / "captions").iterdir() if p.is_dir()) == [
        "dt=2026-11-21",
        "dt=2026-11-22",
    ]
    rows = duckdb.sql(
        f"select dt, count(*) from read_parquet('{out}/captions/**/*.parquet', "
        "hive_partitioning=true) group by dt order by dt"
    ).fetchall()
    assert [(str(d), n) for d, n in rows] == [("2026-11-21", 2), ("2026-11-22", 2)]
    older = run_caption(config(images, out, tiny_models["git"], partitions=("2026-11-20",)))
    assert older.processed == 2 and older.partitions == ["dt=2026-11-20"]

    make_images(images / "dt=2026-11-22", 1, start=90)  # arrives after the first run
    replay = run_caption(config(images, out, tiny_models["git"], replay=first.run_id, force=True))
    assert replay.inputs == 4 and replay.processed == 4  # exactly the first run's inputs
    counts = ids_in(out, "captions")
    assert len(counts) == 6 and set(counts.values()) == {1}


def test_content_ids_skip_a_renamed_object(local_ray, tiny_models, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, 3)
    first = run_caption(config(images, out, tiny_models["git"], image_id="content"))
    assert first.captioned == 3
    shutil.copy(images / "img000.jpg", images / "renamed.jpg")
    second = run_caption(config(images, out, tiny_models["git"], image_id="content"))
    assert (second.processed, second.same_content, second.captioned) == (1, 1, 0)
    table = pq.read_table(out / "captions")
    assert table.num_rows == 3
    assert all(
        i == h[:32]
        for i, h in zip(
            *[table.column(c).to_pylist() for c in ("image_id", "content_sha256")], strict=True
        )
    )


def test_missing_gpus_fail_fast_with_a_clear_message(local_ray, tiny_models, tmp_path):
    images = tmp_path / "images"
    make_images(images, 2)
    cfg = config(images, tmp_path / "out", tiny_models["git"], gpu_wait_s=2)
    cfg.compute.num_gpus = 1
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"needs 1 GPU.*cluster has 0"):
        run_caption(cfg)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert os.environ.get("RAYCAPTION_FAULTS") is None


def test_actors_that_would_take_every_cpu_fail_fast_instead_of_hanging(
    local_ray, tiny_models, tmp_path
):
    # Two 1-CPU actors on a 2-CPU cluster leave nothing for the read/decode/write tasks:
    # Ray Data would wait for a free CPU forever.
    images = tmp_path / "images"
    make_images(images, 2)
    cfg = config(images, tmp_path / "out", tiny_models["git"], gpu_wait_s=2)
    cfg.compute.concurrency = (2, 2)
    with pytest.raises(ResourceError, match=r"2 caption actor\(s\) x 1 CPU.*need 3 CPUs.*has 2"):
        run_caption(cfg)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    cfg.compute.concurrency = (1, 2)  # one actor leaves a CPU free: the pool may grow later
    assert run_caption(cfg).captioned == 2


def test_decode_runs_as_tasks_apart_from_the_caption_actor(
    local_ray, tiny_models, tmp_path, monkeypatch
):
    # On a CPU-only cluster decode and the actor both ask for 1 CPU; Ray Data fuses stages
    # with equal requests, which would put decode inside the actor, in series with the model.
    import raycaption.pipeline as pipeline

    executed = []
    stream = pipeline.stream_commits

    def keep_stats(ds, *args, **kwargs):
        stream(ds, *args, **kwargs)
        executed.append(ds.stats())

    monkeypatch.setattr(pipeline, "stream_commits", keep_stats)
    images = tmp_path / "images"
    make_images(images, 4)
    assert run_caption(config(images, tmp_path / "out", tiny_models["git"])).captioned == 4
    (stats,) = executed
    assert "MapBatches(read_batch)->MapBatches(decode_batch)" in stats
    assert "MapBatches(CaptionActor)" in stats
    assert "decode_batch)->MapBatches(CaptionActor)" not in stats
