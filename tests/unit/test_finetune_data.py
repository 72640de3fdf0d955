"""Pairs for fine-tuning: manifests of every supported shape, the seeded split, the data
fingerprint, the resumable sampler and the image source (bad images skipped and counted)."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycaption import storage
from raycaption.cli import bundled
from raycaption.config import PairsConfig, StorageConfig
from raycaption.errors import ConfigError
from raycaption.images import DecodeLimits, ResizeSpec
from raycaption.synthetic import make_example
from raycaption.train.data import (
    EpochSampler,
    ImageSource,
    fingerprint,
    load_pairs,
    pick_caption,
    split_indices,
)

NO_S3 = StorageConfig()
SPEC = ResizeSpec(mode="exact", height=16, width=16)


def jpeg(seed: int) -> tuple[bytes, str]:
    image, caption = make_example(random.Random(seed), size=48)
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue(), caption


def load(uri: str, **kwargs):
    return load_pairs(PairsConfig(uri=uri, **kwargs), NO_S3)


def test_jsonl_folder_with_relative_uris_list_captions_and_repeated_rows(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i)[0])
    rows = [
        {"file_name": "img/0.jpg", "text": "first caption"},
        {"file_name": "img/0.jpg", "text": ["second caption", "first caption"]},
        {"file_name": "img/1.jpg", "text": ["  spaced   out  "]},
        {"file_name": "img/2.jpg", "text": ""},  # no caption: left out
        {"file_name": None, "text": "no image"},  # no image: left out
        {"file_name": "ftp2://x/y.jpg", "text": "unknown protocol"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load(str(tmp_path))
    by_uri = dict(
        zip(
            pairs.table.column("source_uri").to_pylist(),
            pairs.table.column("captions").to_pylist(),
            strict=True,
        )
    )
    assert by_uri == {
        str(tmp_path / "img" / "0.jpg"): ["first caption", "second caption"],
        str(tmp_path / "img" / "1.jpg"): ["spaced out"],
    }
    assert pairs.rows_read == 6
    assert pairs.rows_dropped == {"no_caption": 1, "no_image": 1, "invalid_uri": 1}
    assert pairs.images == 2 and pairs.captions == 3


def test_parquet_with_image_bytes_and_hf_image_structs(tmp_path):
    a, cap_a = jpeg(1)
    b, cap_b = jpeg(2)
    pq.write_table(pa.table({"image": [a], "caption": [cap_a]}), tmp_path / "bytes.parquet")
    hf = pa.table({"image": [{"bytes": b, "path": "b.jpg"}], "caption": [cap_b]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    pairs = load(str(tmp_path))
    assert sorted(pairs.table.column("captions").to_pylist()) == sorted([[cap_a], [cap_b]])
    assert pairs.table.column("source_uri").to_pylist() == [None, None]
    assert all(len(i) == 32 for i in pairs.table.column("image_id").to_pylist())


def test_the_bundled_samples_folder_is_a_pairs_folder():
    # filename,caption in captions.csv next to the images
    pairs = load(str(bundled("samples")))
    assert pairs.images == 12
    assert "a purple triangle on a yellow background" in [
        c[0] for c in pairs.table.column("captions").to_pylist()
    ]


def test_a_caption_runs_output_folder(tmp_path):
    (tmp_path / "captions").mkdir()
    table = pa.table(
        {
            "image_id": ["x"],
            "source_uri": ["s3://bucket/a.jpg"],
            "caption": ["a red circle"],
            "model": ["m"],
        }
    )
    pq.write_table(table, tmp_path / "captions" / "part-1.parquet")
    (tmp_path / "summary.json").write_text("{}")
    pairs = load(str(tmp_path))
    assert pairs.table.column("source_uri").to_pylist() == ["s3://bucket/a.jpg"]
    assert pairs.table.column("captions").to_pylist() == [["a red circle"]]


def test_explicit_columns_and_clear_errors(tmp_path):
    pq.write_table(pa.table({"img": ["a.jpg"], "desc": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match=r"no image column .*columns are \['img', 'desc'\]"):
        load(str(tmp_path / "m.parquet"))
    pairs = load(str(tmp_path / "m.parquet"), image_column="img", caption_column="desc")
    assert pairs.images == 1
    with pytest.raises(ConfigError, match="no caption column 'nope'"):
        load(str(tmp_path / "m.parquet"), image_column="img", caption_column="nope")
    with pytest.raises(ConfigError, match="do not exist"):
        load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no manifest"):
        load(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a manifest"):
        load(str(tmp_path / "notes.txt"))
    (tmp_path / "e").mkdir()
    pq.write_table(pa.table({"image": ["a.jpg"], "caption": [" "]}), tmp_path / "e" / "m.parquet")
    with pytest.raises(ConfigError, match="no usable image-caption pairs"):
        load(str(tmp_path / "e"))


def test_signed_urls_are_fetched_as_given_but_recorded_redacted(tmp_path):
    signed = "https://example.com/a.jpg?X-Amz-Signature=abc123&v=1"
    (tmp_path / "m.jsonl").write_text(json.dumps({"url": signed, "caption": "c"}) + "\n")
    pairs = load(str(tmp_path / "m.jsonl"))
    row = pairs.table.to_pylist()[0]
    assert "abc123" not in row["source_uri"] and row["fetch_uri"] == signed
    assert row["image_id"] == storage.image_id_for(signed)
    assert "abc123" not in fingerprint(pairs.table, 0, 0.1)


def test_split_is_seeded_disjoint_and_independent_of_row_order():
    ids = [f"id{i:03d}" for i in range(200)]
    train, test = split_indices(ids, 0.1, seed=7)
    assert len(test) == 20 and len(train) == 180
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(200))
    assert split_indices(ids, 0.1, seed=7) == (train, test)
    shuffled = ids[::-1]
    _, test_rev = split_indices(shuffled, 0.1, seed=7)
    assert {shuffled[i] for i in test_rev} == {ids[i] for i in test}
    assert split_indices(ids, 0.1, seed=8)[1] != test
    assert split_indices(["a", "b"], 0.1, 0) in (([0], [1]), ([1], [0]))
    assert split_indices(["a"], 0.1, 0) == ([0], [])


def test_fingerprint_tracks_images_captions_and_split():
    def table(captions):
        return pa.table({"image_id": ["b", "a"], "captions": captions})

    base = fingerprint(table([["x"], ["y", "z"]]), 0, 0.1)
    assert base.startswith("sha256:") and len(base) == 71
    reordered = pa.table({"image_id": ["a", "b"], "captions": [["z", "y"], ["x"]]})
    assert fingerprint(reordered, 0, 0.1) == base
    assert fingerprint(table([["x"], ["y", "changed"]]), 0, 0.1) != base
    assert fingerprint(table([["x"], ["y", "z"]]), 1, 0.1) != base
    assert fingerprint(table([["x"], ["y", "z"]]), 0, 0.2) != base


def test_sampler_walks_epochs_and_resumes_exactly():
    sampler = EpochSampler(10, seed=3, rank=0)
    first_epoch = sampler.positions(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert sorted(sampler.positions(10, 10)) == list(range(10))
    assert sampler.positions(10, 10) != first_epoch  # a fresh permutation per epoch
    run = sampler.positions(0, 37)
    resumed = EpochSampler(10, seed=3, rank=0)
    assert run[20:] == resumed.positions(20, 17)
    assert EpochSampler(10, seed=3, rank=1).positions(0, 10) != first_epoch
    with pytest.raises(ValueError):
        EpochSampler(0, 0, 0)


def test_pick_caption_is_seeded_by_step_and_uses_every_caption():
    caps = ["one", "two", "three"]
    assert pick_caption(caps, 0, 5, "img") == pick_caption(caps, 0, 5, "img")
    assert {pick_caption(caps, 0, s, "img") for s in range(50)} == set(caps)
    assert pick_caption(["only"], 0, 1, "img") == "only"


def test_image_source_skips_and_counts_bad_images(tmp_path):
    from tests.helpers.bad_images import make_image_cases

    cases = make_image_cases()
    good = tmp_path / "good.jpg"
    good.write_bytes(cases["ok_rgb_jpeg"][0])
    table = pa.table(
        {
            "image_id": ["a", "b", "c", "d"],
            "source_uri": [str(good), str(tmp_path / "missing.jpg"), None, None],
            "fetch_uri": [None, None, None, None],
            "image": [None, None, cases["garbage"][0], cases["ok_png"][0]],
            "captions": [["x"]] * 4,
        }
    )
    source = ImageSource(table, SPEC, NO_S3, DecodeLimits(), 10**8, 1, cache_mb=1)
    pixels = source.load([0, 1, 2, 3, 0])
    assert sorted(pixels) == [0, 3]
    assert pixels[0].shape == (16, 16, 3)
    assert source.failure_counts() == {"not_found": 1, "unrecognized_format": 1}
    assert sorted(source.load([1, 2, 3])) == [3]  # failures are remembered, not retried
    assert source.failure_counts() == {"not_found": 1, "unrecognized_format": 1}
    source.close()


def test_pairs_and_images_on_s3(s3, tmp_path):
    fs = s3.fs()
    root = f"{s3.bucket}/pairs-unit"
    data, caption = jpeg(5)
    fs.pipe(f"{root}/images/p.jpg", data)
    fs.pipe(
        f"{root}/train.jsonl",
        (json.dumps({"uri": "images/p.jpg", "caption": caption}) + "\n").encode(),
    )
    cfg = storage.resolve_storage(StorageConfig())
    pairs = load_pairs(PairsConfig(uri=f"s3://{root}/train.jsonl"), cfg)
    assert pairs.table.column("source_uri").to_pylist() == [f"s3://{root}/images/p.jpg"]
    source = ImageSource(pairs.table, SPEC, cfg, DecodeLimits(), 10**8, 2, cache_mb=1)
    assert list(source.load([0])) == [0]
    source.close()
    Image.open(io.BytesIO(data)).verify()
