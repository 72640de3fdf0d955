"""Wire the stages into one streaming Ray Data job and return a run summary.

check config, input and model (seconds, no weights)  ->  list inputs into shards
read (CPU tasks) -> decode + resize (CPU tasks) -> caption (actor pool) -> commit
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import pyarrow as pa

import raycaption
from raycaption import storage
from raycaption.config import CaptionConfig, TagRunConfig
from raycaption.errors import ConfigError
from raycaption.images import DecodeLimits
from raycaption.listing import ListingReport, write_listing
from raycaption.models import ModelInfo, inspect_model

logger = logging.getLogger(__name__)


class AccountingError(RuntimeError):
    """Inputs and output rows do not add up: a bug, never silently accepted."""


@dataclasses.dataclass
class RunSummary:
    """The run's outcome, printed and saved as JSON next to the tables."""

    run_id: str
    status: str
    output: str
    model: str
    model_family: str
    inputs: int
    captioned: int
    errors: int
    errors_by_code: dict[str, int]
    errors_by_stage: dict[str, int]
    duplicates_skipped: int
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


def run_caption(cfg: CaptionConfig) -> RunSummary:
    """Run one caption job end to end; raise ConfigError before any work on bad input."""
    started = time.perf_counter()
    cfg, info = prepare(cfg)
    embedding, vocabulary = text_models(cfg)
    image_embedding = clip_spec(cfg)
    run_dir = storage.join(cfg.output, "_runs", cfg.run_id)
    listing = write_listing(cfg, storage.join(run_dir, "listing"))
    logger.info("model %s (%s); %d inputs", cfg.model.name, info.family, listing.rows)
    from raycaption.sink import CommitDatasink, commit

    sink = CommitDatasink(
        cfg.output,
        cfg.run_id,
        cfg.model.name,
        listing.extra_schema,
        cfg.storage,
        embedding,
        frozenset(vocabulary.words) if vocabulary and cfg.tags.enabled else None,
        image_embedding,
    )
    actors: dict[str, Any] = {}
    if listing.rows:
        actors = _execute(cfg, info, sink, listing, vocabulary)
        committed = sink.committed
    else:
        logger.warning("no inputs matched under %s", storage.redact(cfg.input.uri))
        committed = commit(sink, [])
    seconds = time.perf_counter() - started
    captioned = committed.captioned
    errors = sum(committed.error_codes.values())
    summary = RunSummary(
        run_id=cfg.run_id,
        status="succeeded",
        output=storage.redact(cfg.output),
        model=cfg.model.name,
        model_family=info.family,
        inputs=listing.rows,
        captioned=captioned,
        errors=errors,
        errors_by_code=dict(committed.error_codes),
        errors_by_stage=dict(committed.error_stages),
        duplicates_skipped=listing.duplicates_skipped,
        new_tags=dict(committed.new_tags.most_common(100)),
        tag_vocabulary=vocabulary.version if vocabulary else None,
        seconds=round(seconds, 3),
        images_per_second=round(listing.rows / seconds, 3) if seconds else 0.0,
        caption_actors=actors,
        versions=_versions(),
        config=cfg.to_dict(),
    )
    if captioned + errors != listing.rows:
        summary.status = "failed"
        _save_summary(cfg, run_dir, summary)
        raise AccountingError(
            f"{listing.rows} inputs but {captioned} captions + {errors} errors were written"
        )
    _save_summary(cfg, run_dir, summary)
    return summary


def _execute(cfg: CaptionConfig, info: ModelInfo, sink, listing: ListingReport, vocabulary):
    import ray
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from raycaption.stages import CaptionActor, decode_batch, read_batch

    _ensure_ray(cfg)
    c = cfg.compute
    num_gpus = c.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    fs, _ = storage.filesystem(listing.shards[0], cfg.storage)
    shards = [storage.filesystem(s, cfg.storage)[1] for s in listing.shards]
    ds = ray.data.read_parquet(
        shards, filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning=None
    )
    # Small blocks so decode spreads over every CPU even when the listing is one shard.
    ds = ds.repartition(target_num_rows_per_block=c.decode_batch_size)
    ds = ds.map_batches(
        read_batch,
        batch_format="pyarrow",
        batch_size=c.decode_batch_size,
        fn_kwargs={
            "storage_cfg": cfg.storage,
            "max_bytes": c.max_image_bytes,
            "retries": c.read_retries,
        },
    )
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=c.decode_batch_size,
        fn_kwargs={"spec": info.resize_spec, "limits": DecodeLimits(max_pixels=c.max_image_pixels)},
    )
    lo, hi = c.concurrency
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
    ds.write_datasink(sink)
    if sink.committed is None:
        raise RuntimeError("the write finished but the commit step did not run")
    return {"num_gpus": num_gpus, "num_cpus": c.num_cpus, "min": lo, "max": hi}


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
