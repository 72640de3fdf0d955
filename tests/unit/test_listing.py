"""Listing a prefix or a manifest into Parquet shards (raycaption.listing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycaption import listing, storage
from raycaption.config import CaptionConfig, InputConfig, ModelConfig, StorageConfig
from raycaption.errors import ConfigError
from raycaption.listing import BASE_FIELDS, manifest_format, write_listing


def make_cfg(uri: str, tmp_path: Path, prompt: str | None = None, **input_opts) -> CaptionConfig:
    return CaptionConfig(
        input=InputConfig(uri=uri, **input_opts),
        output=str(tmp_path / "out"),
        model=ModelConfig(name="x", prompt=prompt),
    )


def run(cfg: CaptionConfig, tmp_path: Path) -> tuple[listing.ListingReport, pa.Table]:
    report = write_listing(cfg, str(tmp_path / "listing"))
    assert report.shards, "no shard written"
    tables = [pq.read_table(p) for p in report.shards]
    table = pa.concat_tables(tables)
    assert table.num_rows == report.rows
    return report, table


def rows_by_uri(table: pa.Table) -> dict[str, dict]:
    return {r["source_uri"]: r for r in table.to_pylist()}


def check_ids(table: pa.Table) -> None:
    for row in table.to_pylist():
        assert row["image_id"] == storage.image_id_for(row["source_uri"])


def write_csv(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, table: pa.Table) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


# -- prefixes --------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "images"
    files = {
        "a.jpg": 3,
        "b.JPG": 4,
        "notes.txt": 5,
        "sub/c.png": 6,
        "sub/deep/d.jpeg": 7,
        "sub/deep/readme.md": 8,
        "e.WebP": 9,
        "noext": 10,
    }
    for rel, size in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * size)
    return root


def test_prefix_filters_by_extension_case_insensitively(tmp_path, image_tree):
    report, table = run(make_cfg(str(image_tree), tmp_path), tmp_path)
    got = {uri: row["input_size"] for uri, row in rows_by_uri(table).items()}
    root = str(image_tree)
    assert got == {
        f"{root}/a.jpg": 3,
        f"{root}/b.JPG": 4,
        f"{root}/sub/c.png": 6,
        f"{root}/sub/deep/d.jpeg": 7,
        f"{root}/e.WebP": 9,
    }
    assert table.column("input_error").null_count == table.num_rows
    assert report.rows == 5
    assert report.invalid == 0
    assert report.duplicates_skipped == 0
    assert table.schema == pa.schema(BASE_FIELDS)
    check_ids(table)


def test_prefix_custom_extensions(tmp_path, image_tree):
    cfg = make_cfg(str(image_tree) + "/", tmp_path, extensions=(".JPG", "txt"))
    _, table = run(cfg, tmp_path)
    root = str(image_tree)
    assert sorted(table.column("source_uri").to_pylist()) == [
        f"{root}/a.jpg",
        f"{root}/b.JPG",
        f"{root}/notes.txt",
    ]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("sub/*", ["sub/c.png", "sub/deep/d.jpeg"]),
        ("*.png", ["sub/c.png"]),
        ("sub/deep/*", ["sub/deep/d.jpeg"]),
        ("?.jpg", ["a.jpg"]),
        ("*.JPG", ["b.JPG"]),
    ],
)
def test_prefix_glob_on_relative_path(tmp_path, image_tree, pattern, expected):
    _, table = run(make_cfg(str(image_tree), tmp_path, glob=pattern), tmp_path)
    assert sorted(table.column("source_uri").to_pylist()) == [
        f"{image_tree}/{rel}" for rel in expected
    ]


def test_prefix_limit(tmp_path, image_tree):
    report, table = run(make_cfg(str(image_tree), tmp_path, limit=2), tmp_path)
    assert table.num_rows == 2
    assert report.rows == 2


def test_prefix_prompt_cannot_use_columns(tmp_path, image_tree):
    with pytest.raises(ConfigError, match="label"):
        write_listing(make_cfg(str(image_tree), tmp_path, prompt="a {label}"), str(tmp_path / "l"))


def test_prefix_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "_ROWS_PER_WRITE", 2)
    root = tmp_path / "many"
    root.mkdir()
    for i in range(11):
        (root / f"{i:02d}.png").write_bytes(b"x" * i)
    cfg = make_cfg(str(root), tmp_path)
    cfg.compute.listing_shard_rows = 3
    report, table = run(cfg, tmp_path)
    assert len(report.shards) >= 3
    assert len(set(report.shards)) == len(report.shards)
    uris = table.column("source_uri").to_pylist()
    assert sorted(uris) == [f"{root}/{i:02d}.png" for i in range(11)]
    for shard in report.shards:
        assert Path(shard).is_file()
        assert 0 < pq.read_metadata(shard).num_rows <= 4


# -- manifests: URI column -------------------------------------------------------------------


@pytest.mark.parametrize("column", ["uri", "url", "image_uri", "image_url", "source_uri", "path"])
def test_manifest_uri_column_auto_detected(tmp_path, column):
    m = write_csv(tmp_path / "m.csv", f"label,{column}\ncat,/img/a.jpg\ndog,/img/b.jpg\n")
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    assert rows_by_uri(table).keys() == {"/img/a.jpg", "/img/b.jpg"}
    assert rows_by_uri(table)["/img/b.jpg"]["label"] == "dog"
    assert report.extra_schema.names == ["label"]


def test_manifest_uri_candidates_in_order(tmp_path):
    m = write_csv(tmp_path / "m.csv", "path,url\n/p.jpg,/u.jpg\n")
    _, table = run(make_cfg(m, tmp_path), tmp_path)
    # "url" comes before "path" in URI_COLUMN_CANDIDATES; "path" is carried as an extra.
    assert table.to_pylist()[0]["source_uri"] == "/u.jpg"
    assert table.to_pylist()[0]["path"] == "/p.jpg"


def test_manifest_with_only_a_uri_column(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri\n/img/a.jpg\n/img/b.jpg\n/img/c.jpg\n")
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    assert table.column("source_uri").to_pylist() == ["/img/a.jpg", "/img/b.jpg", "/img/c.jpg"]
    assert table.schema == pa.schema(BASE_FIELDS)
    assert report.rows == 3


def test_manifest_uri_column_option(tmp_path):
    m = write_csv(tmp_path / "m.csv", "url,file_name\n/not-this.jpg,/this.jpg\n")
    _, table = run(make_cfg(m, tmp_path, uri_column="file_name"), tmp_path)
    row = table.to_pylist()[0]
    assert row["source_uri"] == "/this.jpg"
    assert row["url"] == "/not-this.jpg"


def test_manifest_missing_named_uri_column(tmp_path):
    m = write_csv(tmp_path / "m.csv", "url,label\n/a.jpg,cat\n")
    with pytest.raises(ConfigError, match="--uri-column 'file'") as info:
        write_listing(make_cfg(m, tmp_path, uri_column="file"), str(tmp_path / "l"))
    assert "'url'" in str(info.value)
    assert "'label'" in str(info.value)


def test_manifest_without_uri_column(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"file": "/a.jpg", "label": "cat"}])
    with pytest.raises(ConfigError, match="no URI column") as info:
        write_listing(make_cfg(m, tmp_path), str(tmp_path / "l"))
    assert "'file'" in str(info.value)
    assert "--uri-column" in str(info.value)
    assert not (tmp_path / "l").exists()


# -- manifests: extra columns ----------------------------------------------------------------


def test_parquet_manifest_keeps_types_and_renames_reserved(tmp_path):
    manifest = pa.table(
        {
            "uri": ["/a.jpg", "/b.jpg"],
            "count": pa.array([1, 2], pa.int32()),
            "score": [0.5, 1.5],
            "ok": [True, False],
            "caption": ["old caption", None],
            "image_id": ["mine-1", "mine-2"],
        }
    )
    m = write_parquet(tmp_path / "m.parquet", manifest)
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    assert table.schema == pa.schema(
        [
            *BASE_FIELDS,
            pa.field("count", pa.int32()),
            pa.field("score", pa.float64()),
            pa.field("ok", pa.bool_()),
            pa.field("input_caption", pa.string()),
            pa.field("input_image_id", pa.string()),
        ]
    )
    assert report.extra_schema.names == ["count", "score", "ok", "input_caption", "input_image_id"]
    rows = rows_by_uri(table)
    assert rows["/a.jpg"]["count"] == 1
    assert rows["/b.jpg"]["score"] == 1.5
    assert rows["/b.jpg"]["ok"] is False
    assert rows["/a.jpg"]["input_caption"] == "old caption"
    assert rows["/b.jpg"]["input_caption"] is None
    assert rows["/a.jpg"]["input_image_id"] == "mine-1"
    assert rows["/a.jpg"]["input_size"] is None
    check_ids(table)


def test_jsonl_manifest_keeps_int_types(tmp_path):
    m = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"url": "/a.jpg", "n": 1, "label": "cat", "caption": "x"},
            {"url": "/b.jpg", "n": 22, "label": "dog", "caption": "y"},
        ],
    )
    _, table = run(make_cfg(m, tmp_path), tmp_path)
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("label").type == pa.string()
    assert "caption" not in table.schema.names
    assert rows_by_uri(table)["/b.jpg"]["n"] == 22
    assert rows_by_uri(table)["/b.jpg"]["input_caption"] == "y"


@pytest.mark.parametrize("suffix", [".ndjson", ".json"])
def test_jsonl_manifest_suffixes(tmp_path, suffix):
    m = write_jsonl(tmp_path / f"m{suffix}", [{"uri": "/a.jpg"}])
    _, table = run(make_cfg(m, tmp_path), tmp_path)
    assert table.column("source_uri").to_pylist() == ["/a.jpg"]


def test_csv_manifest_columns_are_strings(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri,n,score,caption\n/a.jpg,1,0.5,old\n/b.jpg,007,2,\n")
    _, table = run(make_cfg(m, tmp_path), tmp_path)
    for name in ("n", "score", "input_caption"):
        assert table.schema.field(name).type == pa.string()
    rows = rows_by_uri(table)
    assert rows["/a.jpg"]["n"] == "1"
    assert rows["/b.jpg"]["n"] == "007"  # not coerced to 7
    assert rows["/a.jpg"]["input_caption"] == "old"


# -- manifests: URI resolution and bad rows --------------------------------------------------


def test_manifest_relative_uris_resolve_against_manifest_folder(tmp_path):
    m = write_csv(
        tmp_path / "data" / "manifest.csv",
        "uri\nimgs/a.jpg\n/abs/b.jpg\ns3://bucket/c.jpg\nhttps://h.example/d.jpg\n  e.jpg  \n",
    )
    _, table = run(make_cfg(m, tmp_path), tmp_path)
    folder = tmp_path / "data"
    assert table.column("source_uri").to_pylist() == [
        f"{folder}/imgs/a.jpg",
        "/abs/b.jpg",
        "s3://bucket/c.jpg",
        "https://h.example/d.jpg",
        f"{folder}/e.jpg",
    ]
    assert table.column("input_error").null_count == 5


def test_manifest_bad_rows_are_kept_with_input_error(tmp_path):
    m = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"uri": "/ok.jpg", "k": 1},
            {"uri": None, "k": 2},
            {"uri": "nope://x", "k": 3},
            {"uri": "   ", "k": 4},
        ],
    )
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    rows = {r["k"]: r for r in table.to_pylist()}
    assert rows.keys() == {1, 2, 3, 4}
    assert rows[1]["input_error"] is None
    assert rows[2]["source_uri"] == ""
    assert rows[2]["input_error"] == "empty URI"
    assert rows[3]["source_uri"] == "nope://x"
    assert "unsupported protocol 'nope'" in rows[3]["input_error"]
    assert rows[4]["input_error"] == "empty URI"
    assert report.invalid == 3
    assert report.rows == 4
    check_ids(table)


def test_csv_empty_uri_cell_is_an_input_error(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri,label\n,cat\n/a.jpg,dog\n")
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    rows = {r["label"]: r for r in table.to_pylist()}
    assert rows["cat"]["input_error"] == "empty URI"
    assert rows["dog"]["input_error"] is None
    assert report.invalid == 1


def test_manifest_duplicates_are_skipped_and_counted(tmp_path):
    m = write_csv(
        tmp_path / "m.csv",
        "uri,n\n/a.jpg,1\n/b.jpg,2\n/a.jpg,3\nsub/c.jpg,4\n/b.jpg,5\n/a.jpg,6\n",
    )
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    assert report.duplicates_skipped == 3
    assert report.rows == 3
    # The first occurrence is the one kept.
    assert [r["n"] for r in table.to_pylist()] == ["1", "2", "4"]
    assert len(set(table.column("image_id").to_pylist())) == 3


def test_manifest_duplicates_across_batches_and_signatures(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "_ROWS_PER_WRITE", 2)
    uris = [
        "https://h/a.jpg?X-Amz-Signature=one",
        "/x.jpg",
        "/y.jpg",
        "https://h/a.jpg?X-Amz-Signature=two",  # same object, new signature
        "/x.jpg",
    ]
    m = write_parquet(tmp_path / "m.parquet", pa.table({"uri": uris, "i": list(range(5))}))
    report, table = run(make_cfg(m, tmp_path), tmp_path)
    assert table.column("i").to_pylist() == [0, 1, 2]
    assert report.duplicates_skipped == 2


def test_manifest_limit(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri\n" + "".join(f"/{i}.jpg\n" for i in range(20)))
    report, table = run(make_cfg(m, tmp_path, limit=7), tmp_path)
    assert table.column("source_uri").to_pylist() == [f"/{i}.jpg" for i in range(7)]
    assert report.rows == 7


def test_manifest_limit_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "_ROWS_PER_WRITE", 3)
    m = write_parquet(tmp_path / "m.parquet", pa.table({"uri": [f"/{i}.jpg" for i in range(20)]}))
    report, table = run(make_cfg(m, tmp_path, limit=8), tmp_path)
    assert table.column("source_uri").to_pylist() == [f"/{i}.jpg" for i in range(8)]
    assert report.rows == 8


def test_manifest_shards_hold_every_row_once(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "_ROWS_PER_WRITE", 2)
    n = 25
    manifest = pa.table({"uri": [f"/img/{i}.jpg" for i in range(n)], "i": list(range(n))})
    m = write_parquet(tmp_path / "m.parquet", manifest)
    cfg = make_cfg(m, tmp_path)
    cfg.compute.listing_shard_rows = 3
    report, table = run(cfg, tmp_path)
    assert len(report.shards) >= 5
    assert [Path(s).name for s in report.shards] == [
        f"part-{k:05d}.parquet" for k in range(len(report.shards))
    ]
    per_shard = [pq.read_table(s).column("i").to_pylist() for s in report.shards]
    assert all(0 < len(ids) <= 4 for ids in per_shard)
    flat = [i for ids in per_shard for i in ids]
    assert sorted(flat) == list(range(n))
    assert len(flat) == n
    assert report.rows == n
    check_ids(table)


# -- prompts and unreadable manifests --------------------------------------------------------


def test_prompt_with_missing_column(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri,label\n/a.jpg,cat\n")
    with pytest.raises(ConfigError, match="colour") as info:
        write_listing(make_cfg(m, tmp_path, prompt="a {label} in {colour}"), str(tmp_path / "l"))
    assert "label" in str(info.value)


def test_prompt_with_existing_column(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri,label\n/a.jpg,cat\n")
    report, table = run(make_cfg(m, tmp_path, prompt="a photo of a {label}"), tmp_path)
    assert table.to_pylist()[0]["label"] == "cat"
    assert report.rows == 1


def test_prompt_may_use_renamed_reserved_column(tmp_path):
    m = write_csv(tmp_path / "m.csv", "uri,caption\n/a.jpg,old\n")
    with pytest.raises(ConfigError, match="caption"):
        write_listing(make_cfg(m, tmp_path, prompt="{caption}"), str(tmp_path / "l"))
    report, _ = run(make_cfg(m, tmp_path, prompt="{input_caption}"), tmp_path)
    assert report.rows == 1


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.csv", b""),
        ("header-only.csv", b"uri,label\n"),
        ("empty.jsonl", b""),
        ("empty.parquet", b""),
        ("garbage.parquet", b"this is not parquet"),
    ],
)
def test_empty_or_unreadable_manifest(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="manifest") as info:
        write_listing(make_cfg(str(path), tmp_path), str(tmp_path / "l"))
    assert name in str(info.value)


def test_parquet_manifest_with_no_rows(tmp_path):
    m = write_parquet(tmp_path / "m.parquet", pa.table({"uri": pa.array([], pa.string())}))
    with pytest.raises(ConfigError, match="is empty"):
        write_listing(make_cfg(m, tmp_path), str(tmp_path / "l"))


def test_manifest_format():
    assert manifest_format(InputConfig(uri="s3://b/m.PARQUET")) == "parquet"
    assert manifest_format(InputConfig(uri="s3://b/m.pq")) == "parquet"
    assert manifest_format(InputConfig(uri="https://h/m.csv?sig=abc")) == "csv"
    assert manifest_format(InputConfig(uri="/data/m.ndjson")) == "jsonl"
    assert manifest_format(InputConfig(uri="/data/images/")) is None
    assert manifest_format(InputConfig(uri="/data/m.csv", manifest=False)) is None
    with pytest.raises(ConfigError, match="--manifest"):
        manifest_format(InputConfig(uri="/data/list.txt", manifest=True))


def test_forced_manifest_with_no_suffix_fails_listing(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("uri\n/a.jpg\n")
    with pytest.raises(ConfigError, match="manifest suffix"):
        write_listing(make_cfg(str(path), tmp_path, manifest=True), str(tmp_path / "l"))


# -- S3 ----------------------------------------------------------------------------------------


def test_manifest_on_s3_resolves_relative_keys(s3, tmp_path):
    fs = s3.fs()
    fs.pipe(
        f"{s3.bucket}/manifests/run1/list.csv",
        b"uri,label\nimgs/a.jpg,cat\nb.jpg,dog\n/abs/c.jpg,cow\ns3://other/d.jpg,eel\n",
    )
    cfg = make_cfg(f"s3://{s3.bucket}/manifests/run1/list.csv", tmp_path, prompt="a {label}")
    cfg.storage = storage.resolve_storage(StorageConfig())
    _, table = run(cfg, tmp_path)
    got = {r["label"]: r["source_uri"] for r in table.to_pylist()}
    assert got == {
        "cat": f"s3://{s3.bucket}/manifests/run1/imgs/a.jpg",
        "dog": f"s3://{s3.bucket}/manifests/run1/b.jpg",
        "cow": "/abs/c.jpg",
        "eel": "s3://other/d.jpg",
    }
    check_ids(table)


def test_prefix_on_s3(s3, tmp_path):
    fs = s3.fs()
    fs.pipe(
        {
            f"{s3.bucket}/listing-prefix/a.jpg": b"123",
            f"{s3.bucket}/listing-prefix/x/b.PNG": b"12345",
            f"{s3.bucket}/listing-prefix/x/c.txt": b"1",
        }
    )
    cfg = make_cfg(f"s3://{s3.bucket}/listing-prefix/", tmp_path)
    cfg.storage = storage.resolve_storage(StorageConfig())
    _, table = run(cfg, tmp_path)
    got = {r["source_uri"]: r["input_size"] for r in table.to_pylist()}
    assert got == {
        f"s3://{s3.bucket}/listing-prefix/a.jpg": 3,
        f"s3://{s3.bucket}/listing-prefix/x/b.PNG": 5,
    }


def partitioned_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for day in ("2026-11-20", "2026-11-21", "2026-11-22"):
        (root / f"dt={day}" / "sub").mkdir(parents=True)
        (root / f"dt={day}" / "a.jpg").write_bytes(b"x")
        (root / f"dt={day}" / "sub" / "b.jpg").write_bytes(b"x")
    return root


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({}, ["dt=2026-11-20", "dt=2026-11-21", "dt=2026-11-22"]),
        ({"since": "2026-11-21"}, ["dt=2026-11-21", "dt=2026-11-22"]),
        ({"until": "2026-11-20"}, ["dt=2026-11-20"]),
        ({"since": "2026-11-21", "until": "2026-11-21"}, ["dt=2026-11-21"]),
        ({"partitions": ("2026-11-22", "2026-11-20")}, ["dt=2026-11-20", "dt=2026-11-22"]),
    ],
)
def test_hive_partitions_are_detected_and_selected(tmp_path, selection, expected):
    cfg = make_cfg(str(partitioned_tree(tmp_path)), tmp_path)
    for key, value in selection.items():
        setattr(cfg.backfill, key, value)
    report, table = run(cfg, tmp_path)
    assert report.partition_key == "dt" and report.partitions == expected
    assert sorted(set(table.column("partition").to_pylist())) == expected
    assert report.rows == 2 * len(expected)  # files below sub-folders are listed too
    assert all(table.column("todo").to_pylist())


def test_partition_selection_errors_are_config_errors(tmp_path, image_tree):
    cfg = make_cfg(str(image_tree), tmp_path)
    cfg.backfill.since = "2026-11-01"
    with pytest.raises(ConfigError, match="<key>=<value> folders"):
        write_listing(cfg, str(tmp_path / "listing"))
    cfg = make_cfg(str(partitioned_tree(tmp_path / "other")), tmp_path)
    cfg.backfill.partitions = ("2026-12-31",)
    with pytest.raises(ConfigError, match="not found"):
        write_listing(cfg, str(tmp_path / "listing2"))


def test_the_select_filter_marks_todo_rows(tmp_path, image_tree):
    cfg = make_cfg(str(image_tree), tmp_path)
    report = write_listing(
        cfg, str(tmp_path / "listing"), select=lambda ids: np.arange(len(ids)) % 2 == 0
    )
    table = pq.read_table(report.shards[0])
    assert report.todo == sum(table.column("todo").to_pylist()) == (report.rows + 1) // 2
