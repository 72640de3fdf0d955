"""Image-caption pairs: loading, the seeded train/test split, the fingerprint, and images.

Pairs come from Parquet, JSONL or CSV manifests (one file, or a folder of them such as a
Hugging Face ``imagefolder`` with ``metadata.jsonl`` beside the images), or from a caption
run's output folder (its ``captions/`` table: ``source_uri`` + ``caption``). Each row names an
image (a URI, relative to the manifest's folder or absolute on any fsspec protocol, or the
image bytes themselves) and one caption or a list of captions. Rows of the same image are
merged, so an image can have several captions; training samples one per step.

The driver loads the pairs into one small Arrow table (``PAIRS_SCHEMA``) that every worker
receives; workers read and decode their own shard of the images with the caption job's
``storage.read_bytes`` and ``images.decode_image``, so training sees exactly the pixels the
caption job will see at inference time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raycaption import storage
from raycaption.config import (
    CAPTION_COLUMN_CANDIDATES,
    IMAGE_COLUMN_CANDIDATES,
    MANIFEST_SUFFIXES,
    PairsConfig,
    StorageConfig,
)
from raycaption.errors import ConfigError, RecordError
from raycaption.images import DecodeLimits, ResizeSpec, decode_image

logger = logging.getLogger(__name__)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        # Redacted URI, safe to log and to record; None for images given as bytes.
        pa.field("source_uri", pa.string()),
        # URI as given (signed URLs keep their parameters: needed to fetch); None for bytes.
        pa.field("fetch_uri", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("captions", pa.list_(pa.string())),
    ]
)


@dataclass
class PairSet:
    """The pairs of one input, one row per distinct image.

    Attributes:
        table: Rows in ``PAIRS_SCHEMA``, sorted by ``image_id``.
        source: The input URI, redacted.
        rows_read: Manifest rows read.
        rows_dropped: Rows left out, by reason (``no_image``, ``no_caption``, ``invalid_uri``).
    """

    table: pa.Table
    source: str
    rows_read: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.table.num_rows

    @property
    def captions(self) -> int:
        return sum(len(c) for c in self.table.column("captions").to_pylist())


def load_pairs(cfg: PairsConfig, storage_cfg: StorageConfig) -> PairSet:
    """Read every manifest of ``cfg.uri`` into one table; ConfigError when unusable."""
    files = manifest_files(cfg.uri, storage_cfg)
    rows: dict[str, tuple[str | None, str | None, bytes | None, list[str]]] = {}
    dropped: Counter[str] = Counter()
    read = 0
    for url, fmt, caption_output in files:
        table = _read_manifest(url, fmt, storage_cfg)
        image_col, caption_col = _pick_columns(table, cfg, url, caption_output)
        base = posixpath.dirname(url.split("?")[0])
        if caption_output:  # source_uri values of a caption run are already absolute
            base = ""
        images, captions = table[image_col], table[caption_col]
        read += len(images)
        for image, caption in zip(images, captions, strict=True):
            texts = _captions_of(caption)
            entry, reason = _image_of(image, base)
            if reason:
                dropped[reason] += 1
                continue
            if not texts:
                dropped["no_caption"] += 1
                continue
            image_id, shown, fetch, data = entry
            if image_id in rows:
                known = rows[image_id][3]
                known.extend(t for t in texts if t not in known)
            else:
                rows[image_id] = (shown, fetch, data, list(dict.fromkeys(texts)))
    ids = sorted(rows)
    if cfg.limit is not None:
        ids = ids[: cfg.limit]
    table = pa.table(
        {
            "image_id": ids,
            "source_uri": [rows[i][0] for i in ids],
            "fetch_uri": [rows[i][1] for i in ids],
            "image": [rows[i][2] for i in ids],
            "captions": [rows[i][3] for i in ids],
        },
        schema=PAIRS_SCHEMA,
    )
    if dropped:
        logger.warning("pairs: rows left out: %s", dict(dropped))
    if table.num_rows == 0:
        raise ConfigError(
            f"no usable image-caption pairs in {storage.redact(cfg.uri)} "
            f"({read} rows read, left out: {dict(dropped) or 'none'})"
        )
    return PairSet(table, storage.redact(cfg.uri), read, dict(dropped))


def manifest_files(uri: str, storage_cfg: StorageConfig) -> list[tuple[str, str, bool]]:
    """``(url, format, is_caption_output)`` of every manifest ``uri`` stands for."""
    try:
        fs, path = storage.filesystem(uri, storage_cfg)
        proto = storage.protocol_of(uri)
        if fs.isfile(path):
            fmt = _format_of(path)
            if fmt is None:
                raise ConfigError(
                    f"{storage.redact(uri)} is not a manifest "
                    f"({', '.join(sorted(MANIFEST_SUFFIXES))})"
                )
            return [(uri, fmt, False)]
        if not fs.isdir(path):
            raise ConfigError(f"pairs {storage.redact(uri)} do not exist")
        captions = storage.parquet_files(fs, f"{path.rstrip('/')}/captions")
        if captions:  # a caption run's output folder
            return [(storage.unstrip(proto, p), "parquet", True) for p in captions]
        found = [p for p in sorted(fs.find(path)) if _format_of(p)]
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend failure means "unreachable"
        raise ConfigError(
            f"pairs {storage.redact(uri)} are unreachable: {type(exc).__name__}: {exc}"
        ) from None
    if not found:
        raise ConfigError(
            f"no manifest (.parquet, .jsonl, .csv) and no captions/ table under "
            f"{storage.redact(uri)}"
        )
    return [(storage.unstrip(proto, p), _format_of(p), False) for p in found]


def _format_of(path: str) -> str | None:
    return MANIFEST_SUFFIXES.get(posixpath.splitext(path.split("?")[0])[1].lower())


def _read_manifest(url: str, fmt: str, storage_cfg: StorageConfig) -> dict[str, list]:
    """A manifest as ``{column: values}``. JSONL is parsed line by line, so a caption column
    may mix single captions and lists of captions."""
    fs, path = storage.filesystem(url, storage_cfg)
    try:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.read_table(f).to_pydict()
            if fmt == "csv":
                return pacsv.read_csv(f).to_pydict()
            records = [json.loads(line) for line in f if line.strip()]
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read manifest {storage.redact(url)}: {exc}") from None
    if not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"manifest {storage.redact(url)}: every line must be a JSON object")
    names = list(dict.fromkeys(k for r in records for k in r))
    return {n: [r.get(n) for r in records] for n in names}


def _pick_columns(
    table: dict[str, list], cfg: PairsConfig, url: str, caption_output: bool
) -> tuple[str, str]:
    names = list(table)
    if caption_output:
        return "source_uri", "caption"
    image = cfg.image_column or next((c for c in IMAGE_COLUMN_CANDIDATES if c in names), None)
    caption = cfg.caption_column or next((c for c in CAPTION_COLUMN_CANDIDATES if c in names), None)
    problems = []
    if image is None or image not in names:
        problems.append(
            f"no image column {image!r}"
            if image
            else "no image column (tried "
            f"{', '.join(IMAGE_COLUMN_CANDIDATES)}; name one with --image-column)"
        )
    if caption is None or caption not in names:
        problems.append(
            f"no caption column {caption!r}"
            if caption
            else "no caption column (tried "
            f"{', '.join(CAPTION_COLUMN_CANDIDATES)}; name one with --caption-column)"
        )
    if problems:
        raise ConfigError(
            f"manifest {storage.redact(url)}: {'; '.join(problems)}; its columns are {names}"
        )
    return image, caption


def _captions_of(cell: object) -> list[str]:
    if cell is None:
        return []
    texts = [cell] if isinstance(cell, str) else list(cell) if isinstance(cell, list) else []
    return [" ".join(t.split()) for t in texts if isinstance(t, str) and t.strip()]


def _image_of(cell: object, base: str) -> tuple[tuple | None, str | None]:
    """A manifest cell -> ((image_id, shown uri, fetch uri, bytes), None) or (None, reason)."""
    if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        if not cell:
            return None, "no_image"
        digest = hashlib.sha256(cell).hexdigest()[:32]
        return (digest, None, None, bytes(cell)), None
    if not isinstance(cell, str) or not cell.strip():
        return None, "no_image"
    uri = cell.strip()
    if "://" in uri:
        try:
            fsspec.get_filesystem_class(uri.split("://", 1)[0].lower())
        except (ValueError, ImportError):
            return None, "invalid_uri"
    elif not uri.startswith("/") and base:
        uri = posixpath.join(base, uri)
    shown = storage.redact(uri)
    return (storage.image_id_for(uri), shown, uri if uri != shown else None, None), None


def split_indices(
    image_ids: Sequence[str], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded train/test split by image: ``(train, test)`` row indices, each ascending.

    Images are ordered by sha256 of ``seed:image_id`` and the first
    ``round(n * test_fraction)`` (at least 1 when there are 2 or more images) form the test
    split. The split depends only on the seed and the image ids, never on row order, and an
    image keeps its side when others are added (unless it sits at the boundary).
    """
    n = len(image_ids)
    n_test = 0 if n < 2 or test_fraction <= 0 else max(1, min(n - 1, round(n * test_fraction)))
    order = sorted(
        range(n), key=lambda i: hashlib.sha256(f"{seed}:{image_ids[i]}".encode()).digest()
    )
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return train, test


def fingerprint(table: pa.Table, seed: int, test_fraction: float) -> str:
    """``sha256:…`` over the sorted (image id, caption) pairs, the split seed and fraction.

    Image ids are hashes of the redacted URI (or of the bytes), so the fingerprint never
    contains a secret and changes whenever an image, a caption or the split changes.
    """
    h = hashlib.sha256(f"split:{seed}:{test_fraction!r}\n".encode())
    ids = table.column("image_id").to_pylist()
    caps = table.column("captions").to_pylist()
    for image_id, caption in sorted((i, c) for i, cs in zip(ids, caps, strict=True) for c in cs):
        h.update(f"{image_id}\t{caption}\n".encode())
    return f"sha256:{h.hexdigest()}"


def pick_caption(captions: Sequence[str], seed: int, step: int, image_id: str) -> str:
    """One of an image's captions, chosen by (seed, step, image): reproducible on resume."""
    if len(captions) == 1:
        return captions[0]
    return random.Random(f"{seed}:{step}:{image_id}").choice(list(captions))


class EpochSampler:
    """Seeded, resumable order over a worker's shard of ``n`` images.

    Sample ``k`` (counted from the start of training) is position ``perm_e[k % n]`` with
    ``e = k // n`` and ``perm_e`` a permutation seeded by ``(seed, rank, e)``. Because the
    order depends only on ``k``, training that resumes at step ``s`` continues with exactly
    the samples it would have seen.
    """

    def __init__(self, n: int, seed: int, rank: int):
        if n < 1:
            raise ValueError("a worker's shard has no usable images")
        self.n, self.seed, self.rank = n, seed, rank
        self._epoch, self._perm = -1, list(range(n))

    def positions(self, first_sample: int, count: int) -> list[int]:
        """Shard positions of samples ``first_sample`` .. ``first_sample + count - 1``."""
        out = []
        for k in range(first_sample, first_sample + count):
            epoch = k // self.n
            if epoch != self._epoch:
                self._perm = list(range(self.n))
                random.Random(f"{self.seed}:{self.rank}:{epoch}").shuffle(self._perm)
                self._epoch = epoch
            out.append(self._perm[k % self.n])
        return out


class ImageSource:
    """Reads and decodes the images of a pairs table, keeping a bounded in-memory cache.

    Failures (not found, unreadable, not an image, too large) are remembered per row so a
    bad image is read once, skipped and counted, never retried every epoch.
    """

    def __init__(
        self,
        table: pa.Table,
        spec: ResizeSpec,
        storage_cfg: StorageConfig,
        limits: DecodeLimits,
        max_bytes: int,
        retries: int,
        cache_mb: int,
        threads: int = 8,
    ):
        self.table = table
        self.spec = spec
        self.storage_cfg = storage_cfg
        self.limits = limits
        self.max_bytes = max_bytes
        self.retries = retries
        self.max_cached = int(cache_mb * 2**20 // max(1, int(np.prod(spec.shape))))
        self.cache: dict[int, np.ndarray] = {}
        self.failures: dict[int, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads)

    def load(self, rows: Iterable[int]) -> dict[int, np.ndarray]:
        """Decoded pixels of the given rows that are usable (failed rows are left out)."""
        rows = list(dict.fromkeys(rows))
        todo = [r for r in rows if r not in self.cache and r not in self.failures]
        out: dict[int, np.ndarray] = {}
        for row, result in zip(todo, self._pool.map(self._decode, todo), strict=True):
            if isinstance(result, str):
                self.failures[row] = result
                logger.warning("skipping image %s: %s", self._name(row), result)
                continue
            out[row] = result
            if len(self.cache) < self.max_cached:
                self.cache[row] = result
        out.update((r, self.cache[r]) for r in rows if r in self.cache)
        return out

    def _name(self, row: int) -> str:
        return self.table.column("source_uri")[row].as_py() or (
            f"<bytes {self.table.column('image_id')[row].as_py()}>"
        )

    def _decode(self, row: int) -> np.ndarray | str:
        """Pixels, or the error code when this image cannot be used (one image's boundary)."""
        try:
            data = self.table.column("image")[row].as_py()
            if data is None:
                uri = self.table.column("fetch_uri")[row].as_py() or self._name(row)
                data = storage.read_bytes(uri, self.storage_cfg, self.max_bytes, None, self.retries)
            elif len(data) > self.max_bytes:
                raise RecordError("file_too_large", f"{len(data)} bytes > {self.max_bytes}")
            return decode_image(data, self.spec, self.limits).pixels
        except RecordError as exc:
            return exc.code
        except Exception as exc:  # noqa: BLE001 - one image's boundary: skip and count it
            logger.debug("image %s failed: %s", self._name(row), storage.redact_text(str(exc)))
            return "read_failed"

    def failure_counts(self) -> dict[str, int]:
        """Skipped images so far, by error code."""
        return dict(Counter(self.failures.values()))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
