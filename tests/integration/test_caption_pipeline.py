"""End to end on a local Ray cluster whose second node advertises a GPU.

Real parts only: moto's S3 server over HTTP, a real HTTP server for manifest URLs,
ray.cluster_utils.Cluster, tiny models loaded through the same --model PATH code path.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycaption import storage
from raycaption.cli import main
from raycaption.config import CaptionConfig, ComputeConfig, InputConfig, ModelConfig
from raycaption.pipeline import run_caption
from tests.helpers.bad_images import make_image_cases

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gpu_cluster(s3):
    """Head node with 2 CPUs and no GPU; a worker node advertising one GPU."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield gpu_node
    ray.shutdown()
    cluster.shutdown()


def read_table(fs, folder: str) -> pa.Table:
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    assert files, f"no parquet files under {folder}"
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def assert_each_id_once(captions: pa.Table, errors: pa.Table, expected_ids: set[str]) -> None:
    cap_ids = captions.column("image_id").to_pylist()
    err_ids = errors.column("image_id").to_pylist()
    counts = Counter(cap_ids + err_ids)
    assert {i for i, n in counts.items() if n > 1} == set(), "an id appears twice"
    assert set(counts) == expected_ids


def test_s3_input_model_and_output_with_gpu_actor_pool(gpu_cluster, s3, tiny_models):
    """Images and model folder on S3, output to S3; the caption actor asks for a GPU and
    lands on the node that has one; every bad-image case becomes the right error row."""
    import ray

    fs = s3.fs()
    root = f"{s3.bucket}/e2e"
    cases = make_image_cases()
    expected_code = {}
    for i, (name, (data, code)) in enumerate(sorted(cases.items())):
        ext = "jpg" if code in ("empty_file", "unrecognized_format") else _ext(data)
        key = f"{root}/images/{'sub/' if i % 3 == 0 else ''}{name}.{ext}"
        fs.pipe(key, data)
        expected_code[f"s3://{key}"] = code
    fs.pipe(f"{root}/images/notes.txt", b"not an input: filtered by extension")
    fs.put(str(tiny_models["git"]), f"{root}/models/git", recursive=True)

    cfg = CaptionConfig(
        input=InputConfig(uri=f"s3://{root}/images/"),
        output=f"s3://{root}/out",
        model=ModelConfig(name=f"s3://{root}/models/git", max_new_tokens=5),
        compute=ComputeConfig(batch_size=4, num_gpus=1, decode_batch_size=8),
    )
    summary = run_caption(cfg)

    expected_ids = {storage.image_id_for(u) for u in expected_code}
    captions = read_table(fs, f"{root}/out/captions")
    errors = read_table(fs, f"{root}/out/errors")
    assert_each_id_once(captions, errors, expected_ids)
    by_uri = dict(
        zip(
            errors.column("source_uri").to_pylist(),
            errors.column("error_code").to_pylist(),
            strict=True,
        )
    )
    assert by_uri == {u: c for u, c in expected_code.items() if c is not None}
    assert all(c for c in captions.column("caption").to_pylist())
    assert set(captions.column("model").to_pylist()) == {cfg.model.name}
    assert set(captions.column("run_id").to_pylist()) == {cfg.run_id}
    assert summary.inputs == len(expected_code)
    assert summary.errors_by_code == dict(Counter(c for c in expected_code.values() if c))
    saved = json.loads(fs.cat(f"{root}/out/summary.json"))
    assert saved["run_id"] == cfg.run_id and saved["captioned"] == captions.num_rows
    assert "testing-secret-value" not in json.dumps(saved)

    # The pool's actors asked for a GPU; the only GPU in the cluster is on the worker node,
    # so a finished run means Ray scheduled them there (the head could never host them).
    assert summary.caption_actors["num_gpus"] == 1
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    assert gpu_nodes == {gpu_cluster.node_id}
    assert ray.is_initialized()


def _ext(data: bytes) -> str:
    import io

    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - truncated/garbage cases keep a plausible extension
        return "png" if data[:4] == b"\x89PNG" else "jpg"
    return {
        "JPEG": "jpg",
        "PNG": "png",
        "GIF": "gif",
        "TIFF": "tiff",
        "WEBP": "webp",
        "BMP": "bmp",
    }[fmt]


@pytest.fixture(scope="module")
def http_images(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a folder of images."""
    folder = tmp_path_factory.mktemp("http")
    cases = make_image_cases()
    (folder / "remote.jpg").write_bytes(cases["ok_rgb_jpeg"][0])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def manifest_run(gpu_cluster, tiny_models, http_images, tmp_path_factory):
    """A JSONL manifest: relative, absolute and HTTP URIs, bad rows, a duplicate, extra
    columns; captioned by BLIP-2 with a prompt built from a manifest column."""
    root = tmp_path_factory.mktemp("manifest")
    cases = make_image_cases()
    (root / "imgs").mkdir()
    (root / "imgs" / "a.jpg").write_bytes(cases["ok_rgb_jpeg"][0])
    (root / "imgs" / "b.png").write_bytes(cases["rgba_png"][0])
    (root / "imgs" / "c.jpg").write_bytes(cases["truncated_jpeg"][0])
    rows = [
        {"uri": "imgs/a.jpg", "title": "red chair", "sku": 1},
        {"uri": str(root / "imgs" / "b.png"), "title": "blue lamp", "sku": 2},
        {"uri": "imgs/c.jpg", "title": "broken", "sku": 3},
        {"uri": f"{http_images}/remote.jpg", "title": "web shoe", "sku": 4},
        {"uri": f"{http_images}/missing.jpg", "title": "gone", "sku": 5},
        {"uri": "", "title": "no uri", "sku": 6},
        {"uri": "nope://bucket/x.jpg", "title": "bad protocol", "sku": 7},
        {"uri": "imgs/a.jpg", "title": "red chair again", "sku": 8},
        {
            "uri": f"{http_images}/remote.jpg?v=2&X-Amz-Signature=s3cr3t-sig",
            "title": "signed",
            "sku": 9,
        },
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = root / "out"
    cfg = CaptionConfig(
        input=InputConfig(uri=str(manifest)),
        output=str(out),
        model=ModelConfig(
            name=str(tiny_models["blip-2"]),
            prompt="Question: what is the {title}? Answer:",
            max_new_tokens=4,
        ),
        compute=ComputeConfig(batch_size=3, num_gpus=0, decode_batch_size=4),
    )
    summary = run_caption(cfg)
    return root, out, summary, http_images


def test_manifest_rows_extras_http_and_prompt(manifest_run):
    root, out, summary, http_base = manifest_run
    fs = storage.filesystem(str(out), storage.StorageConfig())[0]
    captions = read_table(fs, str(out / "captions"))
    errors = read_table(fs, str(out / "errors"))
    got = {r["source_uri"]: r for r in captions.to_pylist()}
    assert set(got) == {
        str(root / "imgs" / "a.jpg"),
        str(root / "imgs" / "b.png"),
        f"{http_base}/remote.jpg",
        f"{http_base}/remote.jpg?v=2",  # fetched with its signature, stored without it
    }
    # Extra manifest columns ride along with their types; the duplicate row was skipped.
    assert captions.schema.field("sku").type == pa.int64()
    assert got[str(root / "imgs" / "a.jpg")]["title"] == "red chair"
    assert summary.duplicates_skipped == 1
    codes = dict(
        zip(
            errors.column("source_uri").to_pylist(),
            errors.column("error_code").to_pylist(),
            strict=True,
        )
    )
    assert codes == {
        str(root / "imgs" / "c.jpg"): "truncated_image",
        f"{http_base}/missing.jpg": "not_found",
        "": "invalid_uri",
        "nope://bucket/x.jpg": "invalid_uri",
    }
    assert summary.inputs == 8 and summary.captioned == 4 and summary.errors == 4
    for table in ("captions", "errors"):
        for f in (out / table).iterdir():
            assert b"s3cr3t-sig" not in f.read_bytes()
    assert "s3cr3t-sig" not in (out / "summary.json").read_text()
    # The prompt is not echoed into the stored caption.
    assert not any(c.lower().startswith("question") for c in captions.column("caption").to_pylist())


def test_output_readable_by_duckdb_and_spark(manifest_run):
    import duckdb

    _, out, summary, _ = manifest_run
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/captions/**/*.parquet')").fetchall()[
        0
    ][0]
    assert n == summary.captioned
    codes = duckdb.sql(
        f"select error_code, count(*) from read_parquet('{out}/errors/**/*.parquet') group by 1"
    ).fetchall()
    assert dict(codes) == summary.errors_by_code
    dims = duckdb.sql(
        f"select distinct len(embedding), typeof(tags) from read_parquet('{out}/captions/**/*.parquet')"
    ).fetchall()
    assert dims == [(384, "VARCHAR[]")]

    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[1]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    try:
        df = spark.read.parquet(str(out / "captions"))
        assert df.count() == summary.captioned
        assert {"image_id", "caption", "width", "height", "title", "sku"} <= set(df.columns)
        assert {"tags", "tag_scores", "embedding"} <= set(df.columns)
        first = df.select("embedding").first()[0]
        assert len(first) == 384
        errors = spark.read.parquet(str(out / "errors"))
        assert errors.count() == summary.errors
    finally:
        spark.stop()


def test_blip_through_the_cli(gpu_cluster, tiny_models, tmp_path, capsys):
    cases = make_image_cases()
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("ok_rgb_jpeg", "cmyk_jpeg", "exif_rotated_jpeg"):
        (images / f"{name}.jpg").write_bytes(cases[name][0])
    out = tmp_path / "out"
    code = main(
        [
            "caption",
            "--input", str(images),
            "--output", str(out),
            "--model", str(tiny_models["blip"]),
            "--prompt", "a picture of",
            "--max-new-tokens", "4",
            "--num-gpus", "0",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 captioned, 0 errors of 3 inputs" in printed
    table = pq.read_table(out / "captions")
    assert table.num_rows == 3
    rotated = next(r for r in table.to_pylist() if "exif" in r["source_uri"])
    assert (rotated["width"], rotated["height"]) == _oriented_size(cases["exif_rotated_jpeg"][0])


def _oriented_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return img.size


def test_empty_prefix_is_a_successful_noop(gpu_cluster, tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    summary = run_caption(
        CaptionConfig(
            input=InputConfig(uri=str(tmp_path / "empty")),
            output=str(tmp_path / "out"),
            model=ModelConfig(name=str(tiny_models["git"])),
        )
    )
    assert (summary.inputs, summary.captioned, summary.errors) == (0, 0, 0)
    assert Path(tmp_path / "out" / "summary.json").exists()
    # Both tables exist (empty, with their schema) so readers need no special case.
    assert pq.read_table(tmp_path / "out" / "captions").num_rows == 0
    assert pq.read_table(tmp_path / "out" / "errors").schema.names[:3] == [
        "image_id",
        "source_uri",
        "stage",
    ]


def test_storage_settings_from_config_reach_the_workers(gpu_cluster, s3):
    """The workers' own environment points at a dead endpoint; the endpoint given in the
    config (resolved on the driver) is the one the read stage uses on the worker."""
    import ray

    from raycaption.config import StorageConfig
    from raycaption.stages import read_batch

    fs = s3.fs()
    key = f"{s3.bucket}/settings/one.jpg"
    fs.pipe(key, b"\xff\xd8payload")
    table = pa.table(
        {
            "source_uri": [f"s3://{key}"],
            "input_size": pa.array([None], pa.int64()),
            "input_error": pa.array([None], pa.string()),
            "fetch_uri": pa.array([None], pa.string()),
        }
    )
    dead = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    remote_read = ray.remote(read_batch).options(runtime_env={"env_vars": dead})
    good = ray.get(remote_read.remote(table, StorageConfig(endpoint_url=s3.url), 1024, 1))
    assert good.column("data").to_pylist() == [b"\xff\xd8payload"]
    assert good.column("stage").to_pylist() == [None]
    # Control: without the config value the worker's dead endpoint is used, and fails.
    bad = ray.get(remote_read.remote(table, StorageConfig(), 1024, 1))
    assert bad.column("error_code").to_pylist() == ["read_failed"]


def test_retag_existing_captions_with_a_vocabulary_on_s3(manifest_run, s3, tmp_path):
    """`raycaption tag`: new tags from the title column and a vocabulary on S3, no
    captioning model; captions, the model column and manifest columns are kept."""
    from raycaption.cli import main as cli

    _, out, summary, _ = manifest_run
    fs = s3.fs()
    fs.pipe(f"{s3.bucket}/vocab/v1.txt", b"chair\nlamp\nshoe\n")
    retagged = tmp_path / "retagged"
    code = cli(
        [
            "tag",
            "--input", str(out),
            "--output", str(retagged),
            "--tag-vocabulary", f"s3://{s3.bucket}/vocab/v1.txt",
            "--tag-columns", "title",
            "--drop-new-tags",
        ]
    )  # fmt: skip
    assert code == 0
    before = {r["image_id"]: r for r in pq.read_table(out / "captions").to_pylist()}
    after = {r["image_id"]: r for r in pq.read_table(retagged / "captions").to_pylist()}
    assert set(after) == set(before)
    by_title = {r["title"]: r for r in after.values()}
    assert "chair" in by_title["red chair"]["tags"]
    assert "lamp" in by_title["blue lamp"]["tags"]
    assert all(set(r["tags"]) <= {"chair", "lamp", "shoe"} for r in after.values())
    for image_id, row in after.items():
        assert row["caption"] == before[image_id]["caption"]
        assert row["model"] == before[image_id]["model"]
        assert row["sku"] == before[image_id]["sku"]
        assert row["tag_vocabulary"].startswith("sha256:")
        assert len(row["embedding"]) == 384
    saved = json.loads((retagged / "summary.json").read_text())
    assert saved["rows"] == summary.captioned and saved["errors"] == 0


def test_retag_needs_a_caption_column(tmp_path, capsys):
    from raycaption.cli import main as cli

    pq.write_table(pa.table({"image_id": ["a"], "source_uri": ["/a.jpg"]}), tmp_path / "t.parquet")
    code = cli(["tag", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "lacks column(s) ['caption']" in capsys.readouterr().err


def test_zero_shot_image_tags_and_image_embeddings_with_clip(gpu_cluster, tiny_models, tmp_path):
    """--clip-model scores each image against the vocabulary (a random tiny CLIP here, so
    the check is on structure: top-k, threshold, vocabulary words, unit vectors, metadata)."""
    import numpy as np

    from raycaption.config import ClipConfig, TagConfig

    cases = make_image_cases()
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("ok_rgb_jpeg", "cmyk_jpeg", "garbage"):
        (images / f"{name}.jpg").write_bytes(cases[name][0])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("wood\nmetal\nglass\nred\n")
    cfg = CaptionConfig(
        input=InputConfig(uri=str(images)),
        output=str(tmp_path / "out"),
        model=ModelConfig(name=str(tiny_models["git"]), max_new_tokens=3),
        tags=TagConfig(vocabulary=str(vocab)),
        clip=ClipConfig(model=str(tiny_models["clip"]), threshold=0.0, top_k=2),
        compute=ComputeConfig(num_gpus=0),
    )
    summary = run_caption(cfg)
    assert (summary.captioned, summary.errors) == (2, 1)
    table = pq.read_table(tmp_path / "out" / "captions")
    meta = table.schema.metadata
    assert meta[b"raycaption.image_embedding_dim"] == b"16"
    assert meta[b"raycaption.image_embedding_model"] == str(tiny_models["clip"]).encode()
    for row in table.to_pylist():
        assert len(row["image_tags"]) == 2
        assert set(row["image_tags"]) <= {"wood", "metal", "glass", "red"}
        assert row["image_tag_scores"] == sorted(row["image_tag_scores"], reverse=True)
        assert all(0.0 < s <= 1.0 for s in row["image_tag_scores"])
        assert abs(np.linalg.norm(row["image_embedding"]) - 1.0) < 1e-4
    # Re-tagging keeps the CLIP columns and their schema metadata.
    assert main(["tag", "--input", str(tmp_path / "out"), "--output", str(tmp_path / "re")]) == 0
    retagged = pq.read_table(tmp_path / "re" / "captions")
    assert retagged.schema.metadata[b"raycaption.image_embedding_dim"] == b"16"
    by_id = {r["image_id"]: r["image_tags"] for r in table.to_pylist()}
    assert {r["image_id"]: r["image_tags"] for r in retagged.to_pylist()} == by_id
    # A threshold no probability over four words can reach leaves no zero-shot tags.
    cfg.clip.threshold, cfg.output, cfg.run_id = 0.99, str(tmp_path / "out2"), "strict"
    run_caption(cfg)
    strict = pq.read_table(tmp_path / "out2" / "captions").to_pylist()
    assert all(r["image_tags"] == [] for r in strict)


def test_clip_needs_a_vocabulary_and_a_clip_model(tiny_models, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(make_image_cases()["ok_rgb_jpeg"][0])
    base = ["caption", "--input", str(images), "--output", str(tmp_path / "o")]
    base += ["--model", str(tiny_models["git"])]
    assert main([*base, "--clip-model", str(tiny_models["clip"])]) == 2
    assert "--clip-model needs --tag-vocabulary" in capsys.readouterr().err
    vocab = tmp_path / "v.txt"
    vocab.write_text("wood\n")
    args = [*base, "--clip-model", str(tiny_models["git"]), "--tag-vocabulary", str(vocab)]
    assert main(args) == 2
    assert "has model_type 'git', not 'clip'" in capsys.readouterr().err
