"""`raycaption demo` (what `make demo` runs) on a fresh local Ray instance: bundled images,
bundled model, no network; prints captions a person can check and leaves both tables."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycaption.cli import bundled

pytestmark = pytest.mark.integration


def test_demo_prints_mostly_correct_captions_and_writes_tables(tmp_path):
    raycaption = Path(sys.executable).with_name("raycaption")
    # A fresh local Ray instance, as on a user's machine: no cluster address inherited.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [str(raycaption), "demo", "--output", str(tmp_path / "out"), "--show", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with (bundled("samples") / "captions.csv").open() as f:
        truth = {row["filename"]: row["caption"] for row in csv.DictReader(f)}
    table = pq.read_table(tmp_path / "out" / "captions").to_pylist()
    assert len(table) == len(truth)
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 0
    got = {Path(r["source_uri"]).name: r["caption"] for r in table}
    right = sum(got[name] == caption for name, caption in truth.items())
    assert right >= len(truth) - 2, f"only {right}/{len(truth)} demo captions are right: {got}"
    # The printed table shows each image with its caption next to the expected one.
    for name in truth:
        assert name in proc.stdout
    assert f"{len(truth)} captioned, 0 errors" in proc.stdout

    # Tags name the shape and colours of each image; every tag is new without a vocabulary.
    for row in table:
        words = set(row["caption"].split())
        assert row["tags"] and set(row["tags"]) <= words, row
        assert len(row["tag_scores"]) == len(row["tags"])
        assert row["tag_vocabulary"] == "none"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["new_tags"]["background"] == len(truth)

    # Embeddings ride in the same rows; text search finds the image by its caption.
    schema = pq.read_schema(next((tmp_path / "out" / "captions").glob("*.parquet")))
    assert schema.field("embedding").type.list_size == 384
    assert schema.metadata[b"raycaption.text_embedding_model"].endswith(b"all-MiniLM-L6-v2")
    vectors = np.array([r["embedding"] for r in table], dtype=np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    name, caption = sorted(truth.items())[3]
    found = subprocess.run(
        [str(raycaption), "search", "--index", str(tmp_path / "out"), caption, "-k", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    first = found.stdout.splitlines()[0].split()
    assert first[0] == "1" and first[2].endswith(name), found.stdout
    assert len(found.stdout.splitlines()) == 3

    # Image -> image: the query image is captioned with the index's model, then searched.
    query = sorted(truth)[7]
    by_image = subprocess.run(
        [
            str(raycaption), "search", "--index", str(tmp_path / "out"),
            "--image", str(bundled("samples") / query), "-k", "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert by_image.returncode == 0, by_image.stderr[-2000:]
    lines = by_image.stdout.splitlines()
    assert lines[0] == f"query image captioned as: {truth[query]}"
    assert lines[1].split()[2].endswith(query)
