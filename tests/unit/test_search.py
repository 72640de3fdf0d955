"""Search streams the embedding column across files and keeps the true top-k."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycaption.config import DEFAULT_TEXT_EMBEDDING_MODEL
from raycaption.errors import ConfigError
from raycaption.models.embedder import TextEmbedder
from raycaption.search import search
from raycaption.sink import caption_schema
from raycaption.stages import embeddings_to_arrow

CAPTIONS = [
    "a black metal side table",
    "a red wooden chair",
    "a blue ceramic vase",
    "a green leather sofa",
    "a white porcelain teapot",
    "a yellow rubber duck",
    "a silver laptop on a desk",
]


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder(DEFAULT_TEXT_EMBEDDING_MODEL)


def write_index(folder, embedder, captions, per_file=3, null_at=()):
    schema = caption_schema(pa.schema([]), (DEFAULT_TEXT_EMBEDDING_MODEL, embedder.dim))
    vectors = embedder.embed(captions)
    (folder / "captions").mkdir(parents=True)
    for start in range(0, len(captions), per_file):
        idx = list(range(start, min(start + per_file, len(captions))))
        valid = np.array([i not in null_at for i in idx])
        table = pa.Table.from_arrays(
            [
                pa.array([f"id{i}" for i in idx]),
                pa.array([f"/img/{i}.jpg" for i in idx]),
                pa.array([captions[i] for i in idx]),
                pa.array([10] * len(idx), pa.int32()),
                pa.array([10] * len(idx), pa.int32()),
                pa.array(["m"] * len(idx)),
                pa.array(["r"] * len(idx)),
                pa.array(["fp"] * len(idx)),
                pa.nulls(len(idx), pa.string()),
                embeddings_to_arrow(vectors[idx], valid),
            ],
            schema=schema,
        )
        pq.write_table(table, folder / "captions" / f"part-{start}.parquet")


def test_top_k_across_files_matches_a_full_sort(tmp_path, embedder):
    write_index(tmp_path, embedder, CAPTIONS, per_file=3)
    hits = search(str(tmp_path), "black metal side table", k=3)
    assert hits[0].caption == "a black metal side table"
    assert hits[0].score > 0.95
    expected = np.argsort(
        -(embedder.embed(CAPTIONS) @ embedder.embed(["black metal side table"])[0])
    )
    assert [h.image_id for h in hits] == [f"id{i}" for i in expected[:3]]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_rows_without_embedding_are_skipped(tmp_path, embedder):
    write_index(tmp_path, embedder, CAPTIONS, null_at={0})
    hits = search(str(tmp_path), "black metal side table", k=len(CAPTIONS))
    assert "id0" not in [h.image_id for h in hits]
    assert len(hits) == len(CAPTIONS) - 1


def test_index_without_embeddings_or_captions_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no captions/ table"):
        (tmp_path / "captions").mkdir()
        search(str(tmp_path), "anything")
    pq.write_table(
        pa.table({"image_id": ["a"], "caption": ["x"]}), tmp_path / "captions" / "p.parquet"
    )
    with pytest.raises(ConfigError, match="no embedding column"):
        search(str(tmp_path), "anything")
