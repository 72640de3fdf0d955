"""Driver side of ``raycaption finetune`` and ``raycaption evaluate``.

finetune: check options, model, pairs and output (seconds, before Ray starts) -> seeded
split + fingerprint -> Ray Train TorchTrainer (N workers, checkpoints in ``storage_path``,
``FailureConfig``) -> export the best checkpoint to ``--output`` -> evaluate it on the whole
test split -> eval card in ``--output``.

A run is named (``--run-name``, by default the output folder's name) and lives in
``<storage_path>/<run name>/``. Rerunning the same command after a driver crash finds the
run there and resumes from its latest checkpoint; ``raycaption_run.json`` in that folder
records the data fingerprint and the settings that shape training, so a rerun with other
data or settings is refused instead of silently mixing two trainings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import re
import time
import types
from dataclasses import dataclass
from typing import Any

from raycaption import storage
from raycaption.config import ComputeConfig, EvalConfig, FinetuneConfig, ModelConfig
from raycaption.errors import ConfigError
from raycaption.images import DecodeLimits
from raycaption.train.data import PairSet, fingerprint, load_pairs, split_indices
from raycaption.train.evaluate import (
    EvalResult,
    GenerationSettings,
    build_card,
    evaluate_on_ray,
    write_card,
)
from raycaption.train.export import check_output, export_checkpoint
from raycaption.train.family import family_for
from raycaption.train.loop import PROGRESS_FILE, train_loop_per_worker

logger = logging.getLogger(__name__)

RUN_RECORD = "raycaption_run.json"
FAULTS_ENV = "RAYCAPTION_TEST_FAULTS"
# Settings that shape the training trajectory: a resumed run must use the same ones.
_RESUME_KEYS = (
    "model",
    "batch_size",
    "grad_accum",
    "num_workers",
    "lr",
    "weight_decay",
    "schedule",
    "max_text_tokens",
)


@dataclass
class FinetuneResult:
    """What ``run_finetune`` did (printed by the CLI; the card holds the rest)."""

    output: str
    run_name: str
    storage_path: str
    total_steps: int
    best_step: int
    metrics: dict[str, float]
    starts: list[int]
    card: dict[str, Any]
    seconds: float


def default_run_name(output: str) -> str:
    """The output folder's name, reduced to the characters a run name may hold."""
    base = posixpath.basename(output.split("?")[0].rstrip("/")) or "finetune"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("._-")[:128] or "finetune"


def default_storage_path(output: str) -> str:
    """``_finetune_runs`` beside the output folder (same store, so shared when it is)."""
    clean = output.rstrip("/")
    if storage.protocol_of(clean) == "file":
        return os.path.join(os.path.dirname(os.path.abspath(clean)), "_finetune_runs")
    return posixpath.join(posixpath.dirname(clean), "_finetune_runs")


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune, export the best checkpoint and write its eval card; see the module doc."""
    started = time.perf_counter()
    cfg, family, spec, pairs, train_rows, test_rows = _prepare(cfg)
    fp = fingerprint(pairs.table, cfg.pairs.seed, cfg.pairs.test_fraction)
    run_name = cfg.run_name or default_run_name(cfg.output)
    storage_path = cfg.storage_path or default_storage_path(cfg.output)
    per_step = cfg.batch_size * cfg.grad_accum * cfg.num_workers
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_rows) / per_step))
    warmup = round(total * cfg.warmup_ratio)
    record = {
        "fingerprint": fp,
        "total_steps": total,
        "warmup_steps": warmup,
        **{k: getattr(cfg, k) for k in _RESUME_KEYS},
    }
    _check_run_record(storage_path, run_name, record, cfg)
    logger.info(
        "fine-tuning %s (%s) on %d train / %d test images of %s, %d steps, run %s in %s",
        cfg.model, family, len(train_rows), len(test_rows), pairs.source, total, run_name,
        storage.redact(storage_path),
    )  # fmt: skip

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycaption.pipeline import _ensure_ray

    _ensure_ray(types.SimpleNamespace(compute=ComputeConfig(ray_address=cfg.ray_address)))
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    fs_path, fs = _ray_storage(storage_path, cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "family": family,
            "resize_spec": spec,
            "decode_limits": DecodeLimits(max_pixels=cfg.max_image_pixels),
            "pairs": ray.put(pairs.table),
            "train_rows": train_rows,
            "test_rows": test_rows,
            "total_steps": total,
            "warmup_steps": warmup,
            "faults": json.loads(os.environ.get(FAULTS_ENV, "null")),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=fs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute=cfg.metric_key,
                checkpoint_score_order=cfg.metric_mode,
            ),
        ),
    )
    result = trainer.fit()
    best, best_metrics = _best_checkpoint(result, cfg)
    progress = _read_progress(result.checkpoint or best)
    export_checkpoint(best, cfg.output, cfg.storage)
    settings = _settings(cfg)
    evaluation = evaluate_on_ray(best, pairs.table, test_rows, settings, cfg.storage, use_gpu)
    training = {
        "base_model": storage.redact(cfg.model),
        "family": family,
        "run_name": run_name,
        "storage_path": storage.redact(storage_path),
        "total_steps": total,
        "warmup_steps": warmup,
        "effective_batch_size": per_step,
        "num_workers": cfg.num_workers,
        "use_gpu": use_gpu,
        "best_checkpoint": {
            "step": int(best_metrics["step"]),
            "metric": cfg.metric,
            "mode": cfg.metric_mode,
            "value": best_metrics[cfg.metric_key],
        },
        "history": progress.get("history", []),
        "starts": progress.get("starts", []),
        "seconds": round(time.perf_counter() - started, 1),
        "config": _redacted_config(cfg),
    }
    card = build_card(evaluation, cfg.output, _data_section(pairs, fp, cfg, "test"), training)
    card["data"].update(train_images=len(train_rows), test_images=len(test_rows))
    card["data"]["skipped_in_training"] = progress.get("skipped", {})
    write_card(cfg.output, card, evaluation, cfg.storage)
    return FinetuneResult(
        output=storage.redact(cfg.output),
        run_name=run_name,
        storage_path=storage.redact(storage_path),
        total_steps=total,
        best_step=int(best_metrics["step"]),
        metrics=evaluation.metrics,
        starts=list(progress.get("starts", [])),
        card=card,
        seconds=training["seconds"],
    )


def run_evaluate(cfg: EvalConfig) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a model on pairs (one split or all); write the card when ``cfg.output``."""
    from raycaption.models import inspect_model

    cfg.validate()
    cfg = dataclasses.replace(cfg, storage=storage.resolve_storage(cfg.storage))
    inspect_model(ModelConfig(name=cfg.model), cfg.storage)
    pairs = load_pairs(cfg.pairs, cfg.storage)
    ids = pairs.table.column("image_id").to_pylist()
    rows = list(range(len(ids)))
    if cfg.split != "all":
        train_rows, test_rows = split_indices(ids, cfg.pairs.test_fraction, cfg.pairs.seed)
        rows = test_rows if cfg.split == "test" else train_rows
    if cfg.output:
        storage.filesystem(cfg.output, cfg.storage)  # an unknown protocol fails here
    import ray

    from raycaption.pipeline import _ensure_ray

    _ensure_ray(types.SimpleNamespace(compute=ComputeConfig(ray_address=cfg.ray_address)))
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    settings = GenerationSettings(
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
        max_image_bytes=cfg.max_image_bytes,
        max_image_pixels=cfg.max_image_pixels,
        read_retries=cfg.read_retries,
    )
    result = evaluate_on_ray(cfg.model, pairs.table, rows, settings, cfg.storage, use_gpu)
    fp = fingerprint(pairs.table, cfg.pairs.seed, cfg.pairs.test_fraction)
    card = build_card(result, cfg.model, _data_section(pairs, fp, cfg, cfg.split))
    if cfg.output:
        write_card(cfg.output, card, result, cfg.storage)
    return result, card


def _prepare(cfg: FinetuneConfig):
    """Everything that can fail fast, before Ray starts: options, model, pairs, output."""
    from raycaption.models import inspect_model

    cfg.validate()
    cfg = dataclasses.replace(cfg, storage=storage.resolve_storage(cfg.storage))
    info = inspect_model(ModelConfig(name=cfg.model), cfg.storage)
    family_for(info.family)  # GIT and BLIP only
    pairs = load_pairs(cfg.pairs, cfg.storage)
    ids = pairs.table.column("image_id").to_pylist()
    train_rows, test_rows = split_indices(ids, cfg.pairs.test_fraction, cfg.pairs.seed)
    if not train_rows or not test_rows:
        raise ConfigError(
            f"{pairs.images} image(s) in {pairs.source}: fine-tuning needs at least 2 "
            "(one to train on, one to evaluate)"
        )
    if len(train_rows) < cfg.num_workers:
        raise ConfigError(
            f"{len(train_rows)} training images cannot be shared by {cfg.num_workers} workers"
        )
    check_output(cfg.output, cfg.storage)
    return cfg, info.family, info.resize_spec, pairs, train_rows, test_rows


def _ray_storage(storage_path: str, cfg: FinetuneConfig):
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are, object
    storage through our fsspec filesystem (endpoint and options of ``--s3-endpoint-url`` /
    ``--storage-option`` included)."""
    if storage.protocol_of(storage_path) == "file":
        return os.path.abspath(storage_path.removeprefix("file://")), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(storage_path, cfg.storage)
    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def _check_run_record(storage_path: str, name: str, record: dict, cfg: FinetuneConfig) -> None:
    url = storage.join(storage_path, name, RUN_RECORD)
    try:
        fs, path = storage.filesystem(url, cfg.storage)
        old = json.loads(fs.cat_file(path)) if fs.exists(path) else None
        if old is None:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with fs.open(path, "w") as f:
                f.write(json.dumps(record, indent=2) + "\n")
            return
    except Exception as exc:  # noqa: BLE001 - any backend failure means "cannot write"
        raise ConfigError(
            f"--storage-path {storage.redact(storage_path)} is not usable: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    changed = sorted(k for k in record if old.get(k) != record[k])
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {record[k]!r}" for k in changed)
        raise ConfigError(
            f"run {name!r} in {storage.redact(storage_path)} was started with other data or "
            f"settings ({details}); resuming it would mix two trainings. Pass a new --run-name "
            "to start afresh (or delete that run folder)."
        )
    logger.info("run %s exists: resuming from its latest checkpoint", name)


def _best_checkpoint(result, cfg: FinetuneConfig):
    key = cfg.metric_key
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if key in m]
    if not candidates:
        raise RuntimeError("training reported no checkpoint with metric " + key)
    sign = 1 if cfg.metric_mode == "min" else -1
    # Ties go to the later step: as good, and trained longer.
    return min(candidates, key=lambda cm: (sign * cm[1][key], -cm[1]["step"]))


def _read_progress(checkpoint) -> dict[str, Any]:
    path = f"{checkpoint.path.rstrip('/')}/{PROGRESS_FILE}"
    with checkpoint.filesystem.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _settings(cfg: FinetuneConfig) -> GenerationSettings:
    return GenerationSettings(
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
        max_image_bytes=cfg.max_image_bytes,
        max_image_pixels=cfg.max_image_pixels,
        read_retries=cfg.read_retries,
    )


def _data_section(pairs: PairSet, fp: str, cfg, split: str) -> dict[str, Any]:
    return {
        "source": pairs.source,
        "fingerprint": fp,
        "images": pairs.images,
        "captions": pairs.captions,
        "rows_read": pairs.rows_read,
        "rows_dropped": pairs.rows_dropped,
        "split": split,
        "split_seed": cfg.pairs.seed,
        "test_fraction": cfg.pairs.test_fraction,
    }


def _redacted_config(cfg: FinetuneConfig) -> dict[str, Any]:
    out = cfg.to_dict()
    out["output"] = storage.redact(cfg.output)
    out["model"] = storage.redact(cfg.model)
    out["pairs"]["uri"] = storage.redact(cfg.pairs.uri)
    if cfg.storage_path:
        out["storage_path"] = storage.redact(cfg.storage_path)
    return out
