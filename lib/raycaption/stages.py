"""Ray Data stages: the only code that knows the batch format.

Batches are Arrow tables. Every row carries three status columns, ``stage``, ``error_code``
and ``error_message``, null while the row is healthy. A stage that fails on a row fills them
in and later stages pass the row through untouched, so each input reaches the sink exactly
once, as a caption or as an error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image

from raycaption import faults, storage
from raycaption.config import (
    ClipConfig,
    EmbedConfig,
    ModelConfig,
    StorageConfig,
    TagConfig,
    prompt_fields,
)
from raycaption.errors import RecordError
from raycaption.images import DecodeLimits, ResizeSpec, decode_image

if TYPE_CHECKING:  # the CPU stages (read, decode) must not pay for importing torch
    from raycaption.models import ModelInfo
    from raycaption.tags import Vocabulary

logger = logging.getLogger(__name__)

STATUS_COLUMNS = ("stage", "error_code", "error_message")
_READ_THREADS = 16


def _status(table: pa.Table) -> tuple[list, list, list]:
    if "stage" not in table.column_names:
        if "input_error" not in table.column_names:  # a table from outside the pipeline
            return [None] * table.num_rows, [None] * table.num_rows, [None] * table.num_rows
        errors = table.column("input_error").to_pylist()
        stage = ["input" if e else None for e in errors]
        code = ["invalid_uri" if e else None for e in errors]
        return stage, code, errors
    return tuple(table.column(c).to_pylist() for c in STATUS_COLUMNS)  # type: ignore[return-value]


def _with_status(table: pa.Table, stage: list, code: list, message: list) -> pa.Table:
    for name, values in zip(STATUS_COLUMNS, (stage, code, message), strict=True):
        arr = pa.array(values, pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def only_todo(table: pa.Table) -> pa.Table:
    """Keep the listing rows the run still has to process (the resume filter)."""
    return table.filter(table.column("todo")).drop_columns(["todo"])


def read_batch(
    table: pa.Table,
    storage_cfg: StorageConfig,
    max_bytes: int,
    retries: int,
    content_ids: bool = False,
    done_content: np.ndarray | None = None,
) -> pa.Table:
    """Fetch each object's bytes (threads overlap storage latency); failures -> error rows.

    Adds ``content_sha256``. With ``content_ids`` the image id becomes the content hash, and a
    row whose content already has a current caption (``done_content`` keys) is marked
    ``skipped`` so no model sees it again.
    """
    stage, code, message = _status(table)
    shown = table.column("source_uri").to_pylist()
    fetch = table.column("fetch_uri").to_pylist()
    uris = [f or u for f, u in zip(fetch, shown, strict=True)]
    sizes = table.column("input_size").to_pylist()
    todo = [i for i in range(len(uris)) if stage[i] is None]
    data: list[bytes | None] = [None] * len(uris)

    def fetch(i: int) -> None:
        try:
            data[i] = storage.read_bytes(uris[i], storage_cfg, max_bytes, sizes[i], retries)
        except RecordError as err:
            stage[i], code[i], message[i] = "read", err.code, err.message
        except Exception as exc:  # noqa: BLE001 - one record's boundary
            stage[i], code[i], message[i] = "read", "read_failed", storage.redact_text(repr(exc))

    if len(todo) > 1:
        with ThreadPoolExecutor(min(_READ_THREADS, len(todo))) as pool:
            list(pool.map(fetch, todo))
    else:
        for i in todo:
            fetch(i)
    digests = [hashlib.sha256(d).hexdigest() if d is not None else None for d in data]
    table = table.append_column("data", pa.array(data, pa.large_binary()))
    table = table.append_column("content_sha256", pa.array(digests, pa.string()))
    if content_ids:
        ids = table.column("image_id").to_pylist()
        ids = [d[:32] if d else i for d, i in zip(digests, ids, strict=True)]
        col = table.column_names.index("image_id")
        table = table.set_column(col, "image_id", pa.array(ids, pa.string()))
        if done_content is not None and len(done_content):
            from raycaption.commit import id_keys

            seen = np.isin(id_keys(ids), done_content)
            for i in np.flatnonzero(seen):
                if stage[i] is None:
                    stage[i], code[i], message[i] = "skipped", "same_content", None
    return _with_status(table, stage, code, message)


def decode_batch(table: pa.Table, spec: ResizeSpec, limits: DecodeLimits) -> pa.Table:
    """Decode and resize each image to the model's geometry; bytes are dropped afterwards."""
    # Pillow's own bomb threshold (89.5 MP by default) must follow --max-image-pixels, or
    # raising the limit would have no effect. Set per worker process, before any open().
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    stage, code, message = _status(table)
    n = table.num_rows
    pixels = np.zeros((n, *spec.shape), dtype=np.uint8)
    width: list[int | None] = [None] * n
    height: list[int | None] = [None] * n
    blobs = table.column("data")
    for i in range(n):
        if stage[i] is not None:
            continue
        try:
            img = decode_image(blobs[i].as_py() or b"", spec, limits)
        except RecordError as err:
            stage[i], code[i], message[i] = "decode", err.code, err.message
            continue
        pixels[i] = img.pixels
        width[i], height[i] = img.width, img.height
    table = table.drop_columns(["data"])
    table = table.append_column("width", pa.array(width, pa.int32()))
    table = table.append_column("height", pa.array(height, pa.int32()))
    table = table.append_column("pixels", pixels_to_arrow(pixels))
    return _with_status(table, stage, code, message)


def embeddings_to_arrow(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(N, dim) float32 -> fixed_size_list<float32>[dim], null where ``valid`` is False."""
    dim = vectors.shape[1]
    values = pa.array(vectors.reshape(-1), pa.float32())
    mask = pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


def pixels_to_arrow(pixels: np.ndarray) -> pa.Array:
    """(N, H, W, 3) uint8 -> fixed-size binary: compact, no tensor extension type needed."""
    width = int(np.prod(pixels.shape[1:]))
    buf = pa.py_buffer(np.ascontiguousarray(pixels).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(pixels), [None, buf])


def pixels_from_arrow(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pixels_to_arrow` (zero-copy when the column is one chunk)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = int(np.prod(shape))
    flat = np.frombuffer(
        arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width
    )
    return flat.reshape((len(arr), *shape))


class TextEnricher:
    """Tags and text embedding for captioned rows, with the small text model loaded once.

    Used by the caption actor (right after captioning) and by the re-tag job. Keyword tags
    come first; the embedding is of "tags. caption".
    """

    def __init__(
        self,
        embed_cfg: EmbedConfig | None,
        tag_cfg: TagConfig | None,
        vocabulary: Vocabulary | None,
    ):
        self.embed_cfg = embed_cfg if embed_cfg and embed_cfg.enabled else None
        self.tag_cfg = tag_cfg if tag_cfg and tag_cfg.enabled else None
        self.embedder = self.tagger = None
        if self.embed_cfg or self.tag_cfg:
            from raycaption.models.embedder import TextEmbedder

            self.embedder = TextEmbedder((embed_cfg or EmbedConfig()).text_model)
        from raycaption.tags import Vocabulary

        self.vocabulary = vocabulary or Vocabulary((), "none")
        if self.tag_cfg:
            from raycaption.tags import Tagger

            self.tagger = Tagger(self.embedder, self.vocabulary, self.tag_cfg)

    @property
    def active(self) -> bool:
        return self.embedder is not None

    def enrich(self, table: pa.Table, captions: list, stage, code, message) -> pa.Table:
        """Append tags/tag_scores/tag_vocabulary and embedding columns as configured."""
        tags: list[list[str] | None] = [None] * table.num_rows
        if self.tagger is not None:
            table = self._add_tags(table, captions, tags, stage, code, message)
        if self.embed_cfg is not None:
            texts = [
                None if c is None else (f"{', '.join(t)}. {c}" if t else c)
                for c, t in zip(captions, tags, strict=True)
            ]
            table = table.append_column("embedding", self._embed(texts, stage, code, message))
        return table

    def _add_tags(self, table, captions, tags, stage, code, message) -> pa.Table:
        idx = [i for i, c in enumerate(captions) if c is not None and stage[i] is None]
        context = [table.column(c).to_pylist() for c in self.tag_cfg.context_columns]
        texts = [
            " ".join([captions[i], *(str(col[i]) for col in context if col[i] is not None)])
            for i in idx
        ]
        scores: list[list[float] | None] = [None] * table.num_rows
        try:
            for i, (t, s) in zip(idx, self.tagger.tag(texts), strict=True):
                tags[i], scores[i] = t, s
        except Exception as exc:  # noqa: BLE001 - the tagging call is a record boundary
            text = storage.redact_text(f"{type(exc).__name__}: {exc}")[:500]
            for i in idx:
                stage[i], code[i], message[i] = "tag", "tagging_error", text
                tags[i] = scores[i] = None
        version = [self.vocabulary.version if t is not None else None for t in tags]
        table = table.append_column("tags", pa.array(tags, pa.list_(pa.string())))
        table = table.append_column("tag_scores", pa.array(scores, pa.list_(pa.float32())))
        return table.append_column("tag_vocabulary", pa.array(version, pa.string()))

    def _embed(self, texts, stage, code, message) -> pa.Array:
        dim = self.embedder.dim
        idx = [i for i, t in enumerate(texts) if t is not None and stage[i] is None]
        vectors = np.zeros((len(texts), dim), dtype=np.float32)
        valid = np.zeros(len(texts), dtype=bool)
        try:
            vectors[idx] = self.embedder.embed([texts[i] for i in idx], self.embed_cfg.batch_size)
            valid[idx] = True
        except Exception as exc:  # noqa: BLE001 - the embedding call is a record boundary
            text = storage.redact_text(f"{type(exc).__name__}: {exc}")[:500]
            for i in idx:
                stage[i], code[i], message[i] = "embed", "embedding_error", text
        return embeddings_to_arrow(vectors, valid)


# Columns the enricher writes; a re-tag replaces them.
ENRICHED_COLUMNS = ("tags", "tag_scores", "tag_vocabulary", "embedding")


class TagActor:
    """Re-tag stage: recomputes tags and embeddings of existing captions on CPU workers."""

    def __init__(self, embed_cfg: EmbedConfig, tag_cfg: TagConfig, vocabulary: Vocabulary | None):
        self.enricher = TextEnricher(embed_cfg, tag_cfg, vocabulary)

    def __call__(self, table: pa.Table) -> pa.Table:
        table = table.drop_columns([c for c in ENRICHED_COLUMNS if c in table.column_names])
        stage, code, message = _status(table)
        captions = table.column("caption").to_pylist()
        for i, c in enumerate(captions):
            if c is None and stage[i] is None:
                stage[i], code[i], message[i] = "tag", "tagging_error", "row has no caption"
        table = self.enricher.enrich(table, captions, stage, code, message)
        return _with_status(table, stage, code, message)


class CaptionActor:
    """Caption stage: loads the model once per actor, then captions batches; tags and the
    text embedding follow in the same actor (a small model beside the captioner rather than
    another actor pool competing for CPUs).

    A failing model call is retried on halves of the batch, so one bad image costs one error
    row (``model_error``) and never the rest of its batch.
    """

    def __init__(
        self,
        info: ModelInfo,
        model_cfg: ModelConfig,
        storage_cfg: StorageConfig,
        embed_cfg: EmbedConfig | None = None,
        tag_cfg: TagConfig | None = None,
        vocabulary: Vocabulary | None = None,
        clip_cfg: ClipConfig | None = None,
    ):
        started = time.perf_counter()
        self.info = info
        self.clip_cfg = clip_cfg if clip_cfg and clip_cfg.model else None
        self.clip = None
        if self.clip_cfg:
            from raycaption.models.clip import ClipScorer

            self.clip = ClipScorer(self.clip_cfg.model, vocabulary.words if vocabulary else ())
        from raycaption.models import load_captioner

        self.captioner = load_captioner(info, model_cfg, storage_cfg)
        self.prompt = model_cfg.prompt
        self.prompt_fields = prompt_fields(self.prompt) if self.prompt else []
        self.enricher = TextEnricher(embed_cfg, tag_cfg, vocabulary)
        logger.info("caption actor ready in %.1fs", time.perf_counter() - started)

    def __call__(self, table: pa.Table) -> pa.Table:
        faults.maybe_fault("caption")
        stage, code, message = _status(table)
        captions: list[str | None] = [None] * table.num_rows
        todo = [i for i in range(table.num_rows) if stage[i] is None]
        if todo:
            pixels = pixels_from_arrow(table.column("pixels"), self.info.resize_spec.shape)
            prompts = self._prompts(table) if self.prompt else None
            self._caption(todo, pixels, prompts, captions, stage, code, message)
        if self.clip is not None:
            table = self._add_clip(table, stage, code, message)
        table = table.drop_columns(["pixels"])
        table = table.append_column("caption", pa.array(captions, pa.string()))
        table = self.enricher.enrich(table, captions, stage, code, message)
        return _with_status(table, stage, code, message)

    def _add_clip(self, table, stage, code, message) -> pa.Table:
        n = table.num_rows
        idx = [i for i in range(n) if stage[i] is None]
        tags: list = [None] * n
        scores: list = [None] * n
        vectors = np.zeros((n, self.clip.dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        if idx:
            pixels = pixels_from_arrow(table.column("pixels"), self.info.resize_spec.shape)
            try:
                t, s, v = self.clip.score(pixels[idx], self.clip_cfg.threshold, self.clip_cfg.top_k)
                for j, i in enumerate(idx):
                    tags[i], scores[i] = t[j], s[j]
                vectors[idx], valid[idx] = v, True
            except Exception as exc:  # noqa: BLE001 - the CLIP call is a record boundary
                text = storage.redact_text(f"{type(exc).__name__}: {exc}")[:500]
                for i in idx:
                    stage[i], code[i], message[i] = "tag", "tagging_error", text
        table = table.append_column("image_tags", pa.array(tags, pa.list_(pa.string())))
        table = table.append_column("image_tag_scores", pa.array(scores, pa.list_(pa.float32())))
        return table.append_column("image_embedding", embeddings_to_arrow(vectors, valid))

    def _prompts(self, table: pa.Table) -> list[str]:
        cols = {f: table.column(f).to_pylist() for f in self.prompt_fields}
        return [
            self.prompt.format(**{f: ("" if v[i] is None else v[i]) for f, v in cols.items()})
            for i in range(table.num_rows)
        ]

    def _caption(self, idx, pixels, prompts, captions, stage, code, message) -> None:
        try:
            texts = self.captioner.caption(
                pixels[idx], [prompts[i] for i in idx] if prompts else None
            )
            if len(texts) != len(idx):
                raise RuntimeError(f"model returned {len(texts)} captions for {len(idx)} images")
        except Exception as exc:  # noqa: BLE001 - the model call is a record boundary
            _free_accelerator_memory()
            if len(idx) > 1:
                half = len(idx) // 2
                self._caption(idx[:half], pixels, prompts, captions, stage, code, message)
                self._caption(idx[half:], pixels, prompts, captions, stage, code, message)
                return
            i = idx[0]
            stage[i], code[i] = "caption", "model_error"
            message[i] = storage.redact_text(f"{type(exc).__name__}: {exc}")[:500]
            logger.warning("model call failed for one image: %s", message[i])
            return
        for i, text in zip(idx, texts, strict=True):
            captions[i] = text


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort only
        pass
