"""Text -> image search over a caption output's embedding column.

The embeddings are streamed in batches (pyarrow dataset scan) and only the running top-k is
kept, so memory stays flat at millions of rows; a brute-force dot product over unit vectors
is exact and, at 384 dimensions, scans on the order of a million rows per second per core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from raycaption import storage
from raycaption.config import StorageConfig
from raycaption.errors import ConfigError

MODEL_KEY = b"raycaption.text_embedding_model"


@dataclass
class Hit:
    """One search result."""

    score: float
    image_id: str
    source_uri: str
    caption: str


def search(
    index: str, query: str, k: int = 5, storage_cfg: StorageConfig | None = None
) -> list[Hit]:
    """The ``k`` captions closest to ``query`` (cosine similarity) in ``index``/captions/."""
    if k < 1:
        raise ConfigError("-k must be >= 1")
    storage_cfg = storage.resolve_storage(storage_cfg or StorageConfig())
    fs, root = storage.filesystem(storage.join(index, "captions"), storage_cfg)
    try:
        files = storage.parquet_files(fs, root)
    except Exception as exc:  # noqa: BLE001 - any backend failure means "no index here"
        raise ConfigError(f"cannot list {storage.redact(index)}/captions: {exc}") from None
    if not files:
        raise ConfigError(f"{storage.redact(index)} has no captions/ table to search")
    with fs.open(files[-1], "rb") as f:
        schema = pq.read_schema(f)
    model = (schema.metadata or {}).get(MODEL_KEY)
    if "embedding" not in schema.names or not model:
        raise ConfigError(
            f"{storage.redact(index)} has no embedding column; caption without --no-embeddings"
        )
    from raycaption.models.embedder import TextEmbedder

    q = TextEmbedder(model.decode()).embed([query])[0]
    dataset = pads.dataset(files, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
    best_scores = np.empty(0, dtype=np.float32)
    best_rows: list[tuple[str, str, str]] = []
    columns = ["image_id", "source_uri", "caption", "embedding"]
    for batch in dataset.to_batches(columns=columns, batch_size=65_536):
        emb = batch.column("embedding")
        if emb.null_count:
            batch = batch.filter(emb.is_valid())
            emb = batch.column("embedding")
        if batch.num_rows == 0:
            continue
        vectors = emb.flatten().to_numpy().reshape(batch.num_rows, -1)
        scores = vectors @ q
        top = np.argsort(-scores)[:k] if len(scores) <= k else np.argpartition(-scores, k)[:k]
        ids, uris, caps = (batch.column(c).to_pylist() for c in columns[:3])
        best_scores = np.concatenate([best_scores, scores[top]])
        best_rows += [(ids[i], uris[i], caps[i]) for i in top]
        keep = np.argsort(-best_scores, kind="stable")[:k]
        best_scores, best_rows = best_scores[keep], [best_rows[i] for i in keep]
    return [Hit(float(s), *row) for s, row in zip(best_scores, best_rows, strict=True)]


def caption_query_image(
    index: str, image: str, storage_cfg: StorageConfig | None = None, model: str | None = None
) -> str:
    """Caption a query image with the index's own captioning model (the ``model`` column of
    its captions, unless ``model`` is given), so image -> image search compares like with like."""
    from raycaption.config import ModelConfig
    from raycaption.images import decode_image
    from raycaption.models import inspect_model, load_captioner

    storage_cfg = storage.resolve_storage(storage_cfg or StorageConfig())
    if model is None:
        fs, root = storage.filesystem(storage.join(index, "captions"), storage_cfg)
        for path in storage.parquet_files(fs, root):
            with fs.open(path, "rb") as f:
                column = pq.read_table(f, columns=["model"]).column("model")
            if len(column):
                model = column[0].as_py()
                break
        if not model:
            raise ConfigError(f"{storage.redact(index)} has no captions to take the model from")
    cfg = ModelConfig(name=model)
    info = inspect_model(cfg, storage_cfg)
    fs, path = storage.filesystem(image, storage_cfg)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except Exception as exc:  # noqa: BLE001 - any backend failure means "unreadable"
        raise ConfigError(f"cannot read query image {storage.redact(image)}: {exc}") from None
    from raycaption.errors import RecordError

    try:
        pixels = decode_image(data, info.resize_spec).pixels
    except RecordError as err:
        raise ConfigError(f"query image {storage.redact(image)}: {err}") from None
    return load_captioner(info, cfg, storage_cfg).caption(pixels[None])[0]
