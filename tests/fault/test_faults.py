"""Fault tests: processes die, nodes go away, drivers are killed, writers fail mid-file,
attempts race, object storage misbehaves. After each, every input id is in exactly one row
of the captions or errors table, no partial file is ever visible, and a rerun finishes the
work without redoing what was committed.

Run them on their own with ``make fault`` (``pytest -m fault``).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycaption import storage
from tests.helpers.faulty_proxy import FaultyProxy

pytestmark = [pytest.mark.integration, pytest.mark.fault]
RAYCAPTION = str(Path(sys.executable).with_name("raycaption"))


def jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def make_images(folder: Path, n: int) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img{i:03d}.jpg").write_bytes(jpeg(i))
    return {storage.image_id_for(str(folder / f"img{i:03d}.jpg")) for i in range(n)}


def command(inp: str, out: str, model: Path, *extra: str) -> list[str]:
    return [
        RAYCAPTION, "caption",
        "--input", inp,
        "--output", out,
        "--model", str(model),
        "--max-new-tokens", "4",
        "--no-embeddings", "--no-tags",
        "--num-gpus", "0",
        "--batch-size", "4",
        "--decode-batch-size", "4",
        "--rows-per-file", "4",
        "--commit-every", "0",
        "--ray-address", "local",
        *extra,
    ]  # fmt: skip


def fault_env(tmp_path: Path, spec: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    if spec:
        env["RAYCAPTION_FAULTS"] = spec
        env["RAYCAPTION_FAULT_DIR"] = str(tmp_path / "faults")
    return env


def run(cmd, env, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def read_visible(out: Path, table: str) -> pa.Table:
    """What a plain reader of ``<table>/**/*.parquet`` sees; fails on any partial file."""
    files = sorted((out / table).rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def assert_exactly_once(out: Path, expected: set[str]) -> None:
    counts = Counter(
        read_visible(out, "captions").column("image_id").to_pylist()
        + read_visible(out, "errors").column("image_id").to_pylist()
    )
    assert {i for i, n in counts.items() if n > 1} == set(), "an id has two rows"
    assert set(counts) == expected


def claimed(tmp_path: Path, point: str) -> int:
    folder = tmp_path / "faults"
    return len(list(folder.glob(f"{point}-*"))) if folder.exists() else 0


def test_caption_actor_dies_mid_run(tiny_models, tmp_path):
    expected = make_images(tmp_path / "images", 24)
    out = tmp_path / "out"
    proc = run(
        command(str(tmp_path / "images"), str(out), tiny_models["git"]),
        fault_env(tmp_path, "caption_exit:2"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert claimed(tmp_path, "caption_exit") == 2  # two actor processes really died
    assert_exactly_once(out, expected)
    assert read_visible(out, "errors").num_rows == 0


def test_writers_fail_mid_file_and_die_mid_upload(tiny_models, tmp_path):
    expected = make_images(tmp_path / "images", 16)
    out = tmp_path / "out"
    seen_files: set[Path] = set()
    stop = threading.Event()

    def watch():  # a reader polling captions/ the whole time never meets a partial file
        while not stop.is_set():
            for f in (out / "captions").rglob("*.parquet") if (out / "captions").exists() else ():
                if f not in seen_files:
                    try:
                        pq.read_metadata(f)
                    except FileNotFoundError:
                        continue  # replaced by a later commit
                    seen_files.add(f)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = run(
            command(str(tmp_path / "images"), str(out), tiny_models["git"]),
            fault_env(tmp_path, "write_raise:1,write_exit:1"),
        )
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert claimed(tmp_path, "write_raise") == 1 and claimed(tmp_path, "write_exit") == 1
    assert seen_files, "the watcher saw no committed file"
    assert_exactly_once(out, expected)
    assert not (out / "_staging").exists()  # the half-written objects were cleaned up


def test_driver_sigkilled_then_rerun_processes_only_the_remainder(tiny_models, tmp_path):
    expected = make_images(tmp_path / "images", 40)
    out = tmp_path / "out"
    cmd = command(str(tmp_path / "images"), str(out), tiny_models["git"])
    proc = subprocess.Popen(
        cmd,
        env=fault_env(tmp_path, "caption_delay:1000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the driver and the Ray processes it started
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        records = list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else []
        if len(records) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = read_visible(out, "captions").column("image_id").to_pylist()
    assert 0 < len(committed) < 40 and len(set(committed)) == len(committed)
    assert not (out / "_SUCCESS").exists()

    rerun = run(cmd, fault_env(tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = summary_of(out)
    assert summary["already_done"] == len(set(committed))
    assert summary["processed"] == 40 - len(set(committed))
    assert_exactly_once(out, expected)
    assert len(list(out.glob("_SUCCESS"))) == 1

    again = run(cmd, fault_env(tmp_path))
    # Zero images reach the model: the run stops after the listing, before Ray starts.
    assert again.returncode == 0 and "nothing to do, all 40 inputs" in again.stdout


def test_two_attempts_finishing_at_once(tiny_models, tmp_path):
    expected = make_images(tmp_path / "images", 24)
    out = tmp_path / "out"
    cmd = command(str(tmp_path / "images"), str(out), tiny_models["git"])
    procs = [
        subprocess.Popen(cmd, env=fault_env(tmp_path), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    codes = [p.wait(timeout=420) for p in procs]
    assert codes == [0, 0]
    assert_exactly_once(out, expected)
    assert [p.name for p in out.iterdir() if p.name.startswith("_SUCCESS")] == ["_SUCCESS"]
    records = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    assert {r["state"] for r in records} == {"done"}


def test_transient_object_storage_errors_are_retried(s3, tiny_models, tmp_path):
    fs = s3.fs()
    root = f"{s3.bucket}/flaky"
    for i in range(20):
        fs.pipe(f"{root}/images/img{i:03d}.jpg", jpeg(i))
    expected = {storage.image_id_for(f"s3://{root}/images/img{i:03d}.jpg") for i in range(20)}
    with FaultyProxy(s3.url, rate=0.1) as proxy:
        proc = run(
            command(f"s3://{root}/images/", f"s3://{root}/out", tiny_models["git"]),
            fault_env(tmp_path, AWS_ENDPOINT_URL=proxy.url),
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.counts["503"] + proxy.counts["500"] + proxy.counts["reset"] >= 5, proxy.counts
    captions = pa.concat_tables(
        pq.read_table(fs.open(p, "rb")) for p in storage.parquet_files(fs, f"{root}/out/captions")
    )
    ids = captions.column("image_id").to_pylist()
    assert set(ids) == expected and len(ids) == 20  # every row captioned, none twice
    assert fs.exists(f"{root}/out/_SUCCESS")


def test_worker_node_removed_and_another_added_mid_run(tiny_models, tmp_path, monkeypatch):
    """The caption actor needs a GPU; its node goes away mid-run and a new one joins."""
    import ray
    from ray.cluster_utils import Cluster

    from raycaption.config import (
        BackfillConfig,
        CaptionConfig,
        ComputeConfig,
        EmbedConfig,
        InputConfig,
        ModelConfig,
        TagConfig,
    )
    from raycaption.pipeline import run_caption

    expected = make_images(tmp_path / "images", 60)
    out = tmp_path / "out"
    monkeypatch.setenv("RAYCAPTION_FAULTS", "caption_delay:1000")
    monkeypatch.setenv("RAYCAPTION_FAULT_DIR", str(tmp_path / "faults"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    first = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    cfg = CaptionConfig(
        input=InputConfig(uri=str(tmp_path / "images")),
        output=str(out),
        model=ModelConfig(name=str(tiny_models["git"]), max_new_tokens=4),
        embed=EmbedConfig(enabled=False),
        tags=TagConfig(enabled=False),
        compute=ComputeConfig(batch_size=2, decode_batch_size=4, rows_per_file=4),
        backfill=BackfillConfig(commit_every_s=0),
    )
    result: dict = {}

    def caption():  # the driver's work; node changes must come from the main thread
        try:
            result["summary"] = run_caption(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    driver = threading.Thread(target=caption, daemon=True)
    driver.start()
    swapped = False
    try:
        deadline = time.monotonic() + 300
        while driver.is_alive() and time.monotonic() < deadline:
            records = list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else []
            if len(records) >= 2:
                cluster.remove_node(first)  # the actor's node goes away mid-run
                cluster.add_node(num_cpus=1, num_gpus=1)  # and a new GPU node joins
                swapped = True
                break
            time.sleep(0.2)
        driver.join(timeout=300)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert swapped, "the run ended before the node was removed"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.processed == 60 and summary.status == "succeeded"
    assert_exactly_once(out, expected)
