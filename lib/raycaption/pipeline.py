"""Wire the stages into one streaming Ray Data job and return a run summary.

check config, input and model (seconds, no weights) -> finish interrupted commits, index the
committed rows -> list inputs into shards, marking what still needs doing ->
read (CPU tasks) -> decode + resize (CPU tasks) -> caption (actor pool) -> write (CPU tasks)
-> the driver commits finished files every few seconds -> account for every input ->
``_SUCCESS``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import raycaption
from raycaption import storage
from raycaption.commit import FAILED, FRESH, STALE, Committer, TableIndex, id_keys
from raycaption.config import BackfillConfig, CaptionConfig, ComputeConfig, TagRunConfig
from raycaption.errors import ConfigError
from raycaption.images import DecodeLimits, ResizeSpec
from raycaption.listing import ListingReport, open_source, write_listing
from raycaption.models import ModelInfo, inspect_model

logger = logging.getLogger(__name__)


# A write that fails (a storage hiccup mid-upload) is retried: a failed attempt leaves at most
# a partial file in staging, which is never committed.
WRITE_TASK_OPTIONS = {"max_retries": 3, "retry_exceptions": True}


class AccountingError(RuntimeError):
    """Inputs and output rows do not add up: a bug, never silently accepted."""


class ResourceError(RuntimeError):
    """The cluster cannot run the job as configured (no GPUs where GPUs were asked for)."""


class OverBudgetError(RuntimeError):
    """More error rows than ``--max-error-rate`` allows; the good rows stay committed."""

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary


@dataclasses.dataclass
class RunSummary:
    """The run's outcome, printed and saved as JSON next to the tables."""

    run_id: str
    status: str  # succeeded | up_to_date | over_budget | failed
    output: str
    model: str
    model_family: str
    fingerprint: str
    inputs: int  # listed (after duplicates were skipped)
    processed: int  # inputs that went through the pipeline in this run
    already_done: int  # inputs skipped because a committed row is kept
    captioned: int
    errors: int
    errors_by_code: dict[str, int]
    errors_by_stage: dict[str, int]
    replaced: int  # older committed rows this run replaced
    same_content: int  # inputs skipped because their bytes were captioned under another URI
    duplicates_skipped: int
    partitions: list[str]
    table_errors: int  # error rows the selected inputs have in the table after this run
    error_rate: float
    commits: int
    new_tags: dict[str, int]
    tag_vocabulary: str | None
    seconds: float
    images_per_second: float
    caption_actors: dict[str, Any]
    versions: dict[str, str]
    config: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


def prepare(cfg: CaptionConfig) -> tuple[CaptionConfig, ModelInfo]:
    """Everything that can fail fast: options, storage settings, input, model reference."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, storage=storage.resolve_storage(cfg.storage))
    storage.check_readable(cfg.input.uri, cfg.storage)
    info = inspect_model(cfg.model, cfg.storage)
    _check_writable(cfg)
    return cfg, info


def text_models(cfg: CaptionConfig | TagRunConfig):
    """Check the tag vocabulary and the text model on the driver (the model is small and
    loading it once also gives the embedding dimension). Returns (embedding spec or None,
    vocabulary or None)."""
    from raycaption.tags import load_vocabulary

    clip = getattr(cfg, "clip", None)
    wanted = cfg.tags.enabled or bool(clip and clip.model)
    vocabulary = load_vocabulary(cfg.tags.vocabulary, cfg.storage) if wanted else None
    if not (cfg.embed.enabled or cfg.tags.enabled):
        return None, None
    from raycaption.models.embedder import TextEmbedder

    dim = TextEmbedder(cfg.embed.text_model).dim
    return ((cfg.embed.text_model, dim) if cfg.embed.enabled else None), vocabulary


def clip_spec(cfg: CaptionConfig) -> tuple[str, int] | None:
    """(model, projection dim) of the CLIP model from its config alone; None when off."""
    if not cfg.clip.model:
        return None
    from transformers import AutoConfig

    try:
        clip_config = AutoConfig.from_pretrained(cfg.clip.model)
    except Exception as exc:  # noqa: BLE001 - hub/network/parse errors all mean "unknown model"
        raise ConfigError(f"cannot load CLIP config for {cfg.clip.model!r}: {exc}") from None
    if clip_config.model_type != "clip":
        raise ConfigError(
            f"--clip-model {cfg.clip.model!r} has model_type {clip_config.model_type!r}, not 'clip'"
        )
    return cfg.clip.model, int(clip_config.projection_dim)


def _check_writable(cfg: CaptionConfig) -> None:
    try:
        fs, path = storage.filesystem(cfg.output, cfg.storage)
        fs.makedirs(path, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - any backend failure means "cannot write"
        raise ConfigError(
            f"output {storage.redact(cfg.output)} is not writable: {type(exc).__name__}: {exc}"
        ) from None


def fingerprint(cfg: CaptionConfig) -> tuple[str, dict[str, Any]]:
    """What makes a caption what it is: model, revision, prompt, generation settings and the
    code version. A committed caption with another fingerprint is stale."""
    spec = {
        "model": cfg.model.name,
        "revision": cfg.model.revision,
        "prompt": cfg.model.prompt,
        "generation": cfg.model.generation_kwargs(),
        "dtype": cfg.model.dtype,
        "raycaption": raycaption.__version__,
    }
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], spec


def select_todo(backfill: BackfillConfig, index: TableIndex):
    """The resume filter: which listed ids still need processing."""
    content = backfill.image_id == "content"

    def select(ids: pa.Array) -> np.ndarray:
        keys = id_keys(ids)
        if backfill.force:
            return np.ones(len(keys), dtype=bool)
        if content:  # listing ids are URI ids; the table knows each row's source URI
            if backfill.retry_failed:
                return index.contains_uri(keys, (FAILED,))
            return ~index.contains_uri(keys, (FRESH, FAILED))
        if backfill.retry_failed:
            return index.contains(keys, (FAILED,))
        return ~index.contains(keys, (FRESH, FAILED))

    return select


def run_caption(cfg: CaptionConfig) -> RunSummary:
    """Run one caption job end to end; raise ConfigError before any work on bad input.

    Resumes by default: inputs with a committed row under the current fingerprint are
    skipped. Raises OverBudgetError (rows kept, no ``_SUCCESS``) past ``--max-error-rate``.
    """
    from raycaption.sink import ERROR_SCHEMA, WriteSpec, WriteTotals, caption_schema

    started = time.perf_counter()
    cfg, info = prepare(cfg)
    embedding, vocabulary = text_models(cfg)
    image_embedding = clip_spec(cfg)
    source = open_source(cfg)
    fp, fp_spec = fingerprint(cfg)
    b = cfg.backfill
    content = b.image_id == "content"
    scope = source.partitions if source.partition_key else None
    committer = Committer(
        cfg.output, cfg.storage, cfg.run_id, TableIndex(fp, with_uris=content), scope
    )
    index = committer.open()
    run_dir = storage.join(cfg.output, "_runs", cfg.run_id)
    listing = write_listing(cfg, storage.join(run_dir, "listing"), select_todo(b, index), source)
    logger.info(
        "model %s (%s); %d inputs, %d to process",
        cfg.model.name,
        info.family,
        listing.rows,
        listing.todo,
    )
    vocab_words = frozenset(vocabulary.words) if vocabulary and cfg.tags.enabled else None
    spec = WriteSpec(
        output=cfg.output,
        run_id=cfg.run_id,
        model=cfg.model.name,
        schema=caption_schema(
            listing.extra_schema, embedding, vocab_words is not None, image_embedding
        ),
        storage_cfg=cfg.storage,
        fingerprint=fp,
        vocabulary=vocab_words,
    )
    totals = WriteTotals()
    actors: dict[str, Any] = {}
    if listing.todo:
        committer.clear_success()
        done_content = index.keys_of_kind((FRESH,)) if content and not b.force else None
        actors = _execute(cfg, info, listing, vocabulary, spec, committer, totals, done_content)
    committer.ensure_tables({"captions": spec.schema, "errors": ERROR_SCHEMA})
    committer.finish()
    seconds = time.perf_counter() - started
    table_errors, missing = _account(cfg, listing, committer, totals)
    rate = table_errors / listing.rows if listing.rows else 0.0
    summary = RunSummary(
        run_id=cfg.run_id,
        status="succeeded",
        output=storage.redact(cfg.output),
        model=cfg.model.name,
        model_family=info.family,
        fingerprint=fp,
        inputs=listing.rows,
        processed=listing.todo,
        already_done=listing.rows - listing.todo,
        captioned=totals.captioned,
        errors=totals.errors,
        errors_by_code=dict(totals.error_codes),
        errors_by_stage=dict(totals.error_stages),
        replaced=committer.stats.replaced,
        same_content=totals.same_content,
        duplicates_skipped=listing.duplicates_skipped,
        partitions=listing.partitions,
        table_errors=table_errors,
        error_rate=round(rate, 6),
        commits=committer.stats.commits,
        new_tags=dict(totals.new_tags.most_common(100)),
        tag_vocabulary=vocabulary.version if vocabulary else None,
        seconds=round(seconds, 3),
        images_per_second=round(listing.todo / seconds, 3) if seconds else 0.0,
        caption_actors=actors,
        versions=_versions(),
        config={**cfg.to_dict(), "fingerprint_spec": fp_spec},
    )
    written = totals.captioned + totals.errors + totals.same_content
    if written != listing.todo or missing:
        summary.status = "failed"
        _save_summary(cfg, run_dir, summary)
        raise AccountingError(
            f"{listing.todo} inputs to process but {totals.captioned} captions + "
            f"{totals.errors} errors + {totals.same_content} same-content skips were written; "
            f"{missing} listed inputs have no committed row"
        )
    if b.max_error_rate is not None and rate > b.max_error_rate:
        summary.status = "over_budget"
        _save_summary(cfg, run_dir, summary)
        raise OverBudgetError(
            f"{table_errors} of {listing.rows} inputs are errors ({rate:.1%}), over "
            f"--max-error-rate {b.max_error_rate:.1%}: good rows are committed, no _SUCCESS",
            summary,
        )
    if listing.todo == 0 and committer.fs.exists(committer.success_path()):
        # Nothing new: leave the output exactly as it was (the listing was only a probe).
        summary.status = "up_to_date"
        fs, path = storage.filesystem(run_dir, cfg.storage)
        fs.rm(path, recursive=True)
        return summary
    _save_summary(cfg, run_dir, summary)
    committer.write_success(summary.to_json())  # last: every input is accounted for
    return summary


def _account(cfg: CaptionConfig, listing: ListingReport, committer: Committer, totals) -> tuple:
    """(error rows the listed inputs have, listed inputs with no committed row) after the
    run, checked id by id against the committed tables."""
    index = committer.index
    if cfg.backfill.image_id == "content":
        # Listing ids are URI ids; the table is keyed by content. Count what this run did
        # plus what the listing found already committed.
        before_errors = 0
        for keys, _todo in _listing_keys(cfg, listing):
            before_errors += int(index.contains_uri(keys[~_todo], (FAILED,)).sum())
        return before_errors + totals.errors, 0
    errors = missing = 0
    for keys, _todo in _listing_keys(cfg, listing):
        caption = index.contains(keys, (FRESH, STALE))
        failed = index.contains(keys, (FAILED,))
        errors += int((failed & ~caption).sum())
        missing += int((~caption & ~failed).sum())
    return errors, missing


def _listing_keys(cfg: CaptionConfig, listing: ListingReport):
    for shard in listing.shards:
        fs, path = storage.filesystem(shard, cfg.storage)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["image_id", "todo"])
        yield id_keys(t.column("image_id")), t.column("todo").to_numpy(zero_copy_only=False)


def _execute(cfg, info, listing, vocabulary, spec, committer, totals, done_content) -> dict:
    import ray
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from raycaption.sink import write_block
    from raycaption.stages import CaptionActor, decode_batch, only_todo, read_batch

    _ensure_ray(cfg)
    c = cfg.compute
    num_gpus = c.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    lo, hi = c.concurrency
    _wait_for_resources(num_gpus, lo, c.num_cpus, cfg.backfill.gpu_wait_s)
    fs, _ = storage.filesystem(listing.shards[0], cfg.storage)
    shards = [storage.filesystem(s, cfg.storage)[1] for s in listing.shards]
    ds = ray.data.read_parquet(
        shards, filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning=None
    )
    ds = ds.map_batches(only_todo, batch_format="pyarrow", batch_size=None)
    # Blocks of one decode batch, so decode spreads over every CPU even when the listing is
    # one shard (Ray Data's cost per block is milliseconds: blocks of a few rows cost more
    # than decoding them, see bench/RESULTS.md).
    ds = ds.repartition(target_num_rows_per_block=c.decode_batch_size)
    decode_mem = decode_memory(c, info.resize_spec)
    ds = ds.map_batches(
        read_batch,
        batch_format="pyarrow",
        batch_size=c.decode_batch_size,
        fn_kwargs={
            "storage_cfg": cfg.storage,
            "max_bytes": c.max_image_bytes,
            "retries": c.read_retries,
            "content_ids": cfg.backfill.image_id == "content",
            "done_content": done_content,
        },
        memory=decode_mem,
    )
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=c.decode_batch_size,
        fn_kwargs={"spec": info.resize_spec, "limits": DecodeLimits(max_pixels=c.max_image_pixels)},
        memory=decode_mem,
    )
    ds = ds.map_batches(
        CaptionActor,
        batch_format="pyarrow",
        batch_size=c.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=num_gpus,
        num_cpus=c.num_cpus,
        fn_constructor_kwargs={
            "info": info,
            "model_cfg": cfg.model,
            "storage_cfg": cfg.storage,
            "embed_cfg": cfg.embed,
            "tag_cfg": cfg.tags,
            "vocabulary": vocabulary,
            "clip_cfg": cfg.clip,
        },
    )
    ds = ds.map_batches(
        write_block,
        batch_format="pyarrow",
        batch_size=c.rows_per_file,
        fn_kwargs={"spec": spec},
        **WRITE_TASK_OPTIONS,
    )
    stream_commits(ds, committer, totals, cfg.backfill.commit_every_s)
    return {"num_gpus": num_gpus, "num_cpus": c.num_cpus, "min": lo, "max": hi}


def decode_memory(compute: ComputeConfig, spec: ResizeSpec) -> int:
    """Bytes one read+decode task reserves: the largest image it may open, decoded as RGBA,
    plus its batch of output pixels and some headroom.

    The reservation keeps decoders from oversubscribing a node's memory. It also keeps decode
    out of the caption actors: Ray Data fuses consecutive stages whose resource requests
    are equal, and on a CPU-only cluster decode (1 CPU) would otherwise run inside each
    actor (1 CPU), in series with the model, instead of as tasks on the other CPUs.
    """
    largest = min(compute.max_image_pixels * 4, 2 << 30)
    pixels = compute.decode_batch_size * spec.height * spec.width * 3
    return int(largest + pixels + (64 << 20))


def stream_commits(ds, committer: Committer, totals, every_s: float) -> None:
    """Pull write outcomes as blocks finish and commit them every ``every_s`` seconds.

    Files whose write task finished are committed even when the run then fails or is
    stopped, so a resubmission only redoes what never reached a file.
    """
    pending = []
    last = time.monotonic()
    try:
        for outcome in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            pending += totals.staged_files(outcome)
            if time.monotonic() - last >= every_s:
                committer.commit(pending)
                pending, last = [], time.monotonic()
    finally:
        committer.commit(pending)


def _wait_for_resources(num_gpus: float, lo: int, num_cpus: float, wait_s: float) -> None:
    """Fail within ``wait_s`` instead of waiting forever for resources that never come.

    Needs GPUs for one caption actor when actors use GPUs, and CPUs for the ``lo`` actors the
    pool starts with plus one CPU for the read, decode and write tasks: actors hold their CPUs
    for the whole run, so a pool that takes every CPU would leave those tasks (and the job)
    waiting forever.
    """
    import ray

    need_cpus = lo * num_cpus + 1
    bundles = [{"CPU": need_cpus}] + ([{"GPU": num_gpus}] if num_gpus > 0 else [])
    deadline = time.monotonic() + wait_s
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)  # lets an autoscaler add nodes
    except Exception:  # noqa: BLE001 - no autoscaler: nothing to ask
        pass
    while True:
        have = ray.cluster_resources()
        gpus, cpus = have.get("GPU", 0), have.get("CPU", 0)
        if gpus >= num_gpus and cpus >= need_cpus:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if gpus < num_gpus:
        raise ResourceError(
            f"each caption actor needs {num_gpus:g} GPU(s) but the cluster has {gpus:g} "
            f"after waiting {wait_s:.0f}s; add GPU nodes, or run on CPU with --num-gpus 0"
        )
    raise ResourceError(
        f"{lo} caption actor(s) x {num_cpus:g} CPU(s) plus 1 CPU for reading, decoding and "
        f"writing need {need_cpus:g} CPUs but the cluster has {cpus:g} after waiting "
        f"{wait_s:.0f}s; lower --concurrency or --num-cpus, or add nodes"
    )


def _ensure_ray(cfg: CaptionConfig | TagRunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {}
    pkg_dir = os.path.dirname(os.path.abspath(raycaption.__file__))
    if not _installed_in_site_packages(pkg_dir) and not _job_sets_py_modules():
        # Running from a source tree (ray job submit --working-dir .): ship the package so
        # workers import the same code as the driver. Ray merges this with the job's env.
        runtime_env["py_modules"] = [pkg_dir]
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False} if cfg.compute.quiet else {}
    ray.init(address=cfg.compute.ray_address, runtime_env=runtime_env or None, **quiet)
    if cfg.compute.quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _installed_in_site_packages(pkg_dir: str) -> bool:
    return "site-packages" in pkg_dir or "dist-packages" in pkg_dir


def _job_sets_py_modules() -> bool:
    """A submitted job that already names py_modules would conflict with ours."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job:
        return False
    try:
        return bool(json.loads(job).get("runtime_env", {}).get("py_modules"))
    except (ValueError, AttributeError):
        return False


def _save_summary(cfg: CaptionConfig, run_dir: str, summary: RunSummary) -> None:
    text = summary.to_json()
    for url in (storage.join(run_dir, "summary.json"), storage.join(cfg.output, "summary.json")):
        fs, path = storage.filesystem(url, cfg.storage)
        with fs.open(path, "w") as f:
            f.write(text)


def _versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {
        "raycaption": raycaption.__version__,
        "python": sys.version.split()[0],
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
    }
