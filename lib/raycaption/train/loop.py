"""The Ray Train loop that runs in every worker (one DDP process each).

Per optimizer step each worker draws ``grad_accum`` micro-batches from its own shard of the
training images (a seeded order that depends on the step number only, so a resumed run
continues with exactly the batches it would have seen), samples one caption per image, and
steps AdamW with a warmup + decay schedule, mixed precision on GPU. Every ``eval_every``
steps the workers caption their shard of the test images, rank 0 computes the metrics, and
the workers report them with a checkpoint: the model as a complete ``save_pretrained``
folder (processor included, so any checkpoint can be captioned with as is) plus the
optimizer, scheduler, grad scaler, step and RNG states needed to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycaption.train.data import EpochSampler, ImageSource, pick_caption
from raycaption.train.family import TrainFamily, decode_captions, family_for, pixel_values
from raycaption.train.metrics import compute_metrics

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
MODEL_DIR = "model"
METRIC_KEYS = ("wer", "cer", "bleu", "rouge_l", "cider")


def checkpoint_name(step: int) -> str:
    """Checkpoint folder name for an optimizer step (sorts by step)."""
    return f"checkpoint_step_{step:07d}"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is built by :func:`raycaption.train.run.run_finetune`."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    family = family_for(config["family"])
    table = config["pairs"]
    if isinstance(table, ray.ObjectRef):
        table = ray.get(table)

    model, processor, state = _load(config, family)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": family.find_unused_parameters}
    )
    core = getattr(model, "module", model)
    amp_dtype = _amp_dtype(cfg.precision, device)
    optimizer = _optimizer(core, cfg)
    scheduler = _scheduler(optimizer, cfg.schedule, config["warmup_steps"], config["total_steps"])
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    progress: dict[str, Any] = {"history": [], "starts": [], "skipped": {}}
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        progress = state["progress"]
        _set_rng(state["rng"][rank] if rank < len(state["rng"]) else None)
    else:
        _seed_everything(cfg.pairs.seed + rank)
    progress["starts"].append(step)
    logger.info("worker %d/%d on %s starts at step %d", rank, world, device, step)

    images = ImageSource(
        table,
        config["resize_spec"],
        cfg.storage,
        config["decode_limits"],
        cfg.max_image_bytes,
        cfg.read_retries,
        cfg.image_cache_mb,
    )
    loop = _Loop(config, family, model, core, processor, images, device, amp_dtype, rank, world)
    usable = loop.usable_train_rows()
    sampler = EpochSampler(len(usable), cfg.pairs.seed, rank)
    faults = config.get("faults") or {}
    if step == 0 and not progress["history"]:
        # The untrained model's scores: the card shows where training started from.
        metrics = loop.evaluate(step)
        progress["history"].append(metrics)
        ray.train.report(metrics)

    running: list[float] = []
    total = config["total_steps"]
    while step < total:
        model.train()
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * cfg.batch_size
            rows = [usable[p] for p in sampler.positions(first, cfg.batch_size)]
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync:
                loss = loop.loss(rows, step) / cfg.grad_accum
                scaler.scale(loss).backward()
            running.append(float(loss.item()) * cfg.grad_accum)
        if cfg.max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        _maybe_inject_fault(faults, step, rank)
        if step % 10 == 0 and rank == 0:
            logger.info("step %d/%d loss %.4f", step, total, float(np.mean(running[-10:])))
        if step % cfg.eval_every == 0 or step == total:
            metrics = loop.evaluate(step)
            metrics["train_loss"] = float(np.mean(running)) if running else float("nan")
            metrics["lr"] = float(scheduler.get_last_lr()[0])
            running = []
            progress["history"].append(metrics)
            progress["skipped"] = loop.skipped
            _report_with_checkpoint(
                metrics, progress, core, processor, optimizer, scheduler, scaler, step, rank
            )
    images.close()


class _Loop:
    """Batches, loss and evaluation of one worker (state the loop body shares)."""

    def __init__(self, config, family: TrainFamily, model, core, processor, images, device,
                 amp_dtype, rank: int, world: int):  # fmt: skip
        self.cfg = config["cfg"]
        self.config = config
        self.family, self.model, self.core, self.processor = family, model, core, processor
        self.images, self.device, self.amp_dtype = images, device, amp_dtype
        self.rank, self.world = rank, world
        table = images.table
        self.image_ids = table.column("image_id").to_pylist()
        self.captions = table.column("captions").to_pylist()
        self.max_tokens = family.text_limit(core, self.cfg.max_text_tokens)
        test = config["test_rows"][: self.cfg.eval_max_images]
        self.test_rows = test[rank::world]
        self.skipped: dict[str, int] = {}

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def usable_train_rows(self) -> list[int]:
        """This worker's shard of training rows whose images decode (reads each once)."""
        shard = self.config["train_rows"][self.rank :: self.world]
        usable = []
        for start in range(0, len(shard), 256):
            chunk = shard[start : start + 256]
            loaded = self.images.load(chunk)
            usable.extend(r for r in chunk if r in loaded)
        if not usable:
            raise RuntimeError(
                f"worker {self.rank}: none of its {len(shard)} training images decode"
            )
        return usable

    def batch(
        self, rows: list[int], step: int | None
    ) -> tuple[dict[str, torch.Tensor] | None, list[int]]:
        """(model inputs, rows used) for the rows whose images decode; ``step`` None takes
        every image's first caption."""
        pixels = self.images.load(rows)
        rows = [r for r in rows if r in pixels]
        if not rows:
            return None, rows
        seed = self.cfg.pairs.seed
        texts = [
            self.captions[r][0] if step is None
            else pick_caption(self.captions[r], seed, step, self.image_ids[r])
            for r in rows
        ]  # fmt: skip
        inputs = self.family.text_inputs(
            self.processor.tokenizer, self.core, texts, self.max_tokens
        )
        inputs["pixel_values"] = pixel_values(self.processor, [pixels[r] for r in rows])
        return {k: v.to(self.device) for k, v in inputs.items()}, rows

    def loss(self, rows: list[int], step: int) -> torch.Tensor:
        inputs, _ = self.batch(rows, step)
        if inputs is None:  # every image of this micro-batch failed: a zero-gradient step
            return sum(p.sum() * 0.0 for p in self.model.parameters())
        with self.autocast():
            return self.model(**inputs).loss

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and caption metrics on the (first ``eval_max_images``) test images."""
        self.core.eval()
        preds, refs, loss_sum, loss_n = [], [], 0.0, 0
        bs = self.cfg.batch_size
        for start in range(0, len(self.test_rows), bs):
            rows = self.test_rows[start : start + bs]
            inputs, rows = self.batch(rows, None)
            if inputs is None:
                continue
            with self.autocast():
                out = self.core(**inputs)
                ids = self.core.generate(
                    pixel_values=inputs["pixel_values"],
                    max_new_tokens=self.cfg.max_new_tokens,
                    num_beams=self.cfg.num_beams,
                )
            n = inputs["pixel_values"].shape[0]
            loss_sum += float(out.loss) * n
            loss_n += n
            preds.extend(decode_captions(self.processor, ids))
            refs.extend(self.captions[r] for r in rows)
        gathered = _gather(
            (preds, refs, loss_sum, loss_n, self.images.failure_counts()), self.world
        )
        self.skipped = _sum_counts(g[4] for g in gathered)
        all_preds = [p for g in gathered for p in g[0]]
        all_refs = [r for g in gathered for r in g[1]]
        total_n = sum(g[3] for g in gathered)
        metrics = {"step": step}
        metrics.update(compute_metrics(all_preds, all_refs))
        metrics["eval_loss"] = sum(g[2] for g in gathered) / total_n if total_n else float("nan")
        metrics["images_skipped"] = sum(self.skipped.values())
        worst = math.inf if self.cfg.metric_mode == "min" else -math.inf
        for key in (self.cfg.metric_key, *METRIC_KEYS):  # no test image decoded: worst scores
            metrics.setdefault(key, worst if key == self.cfg.metric_key else math.nan)
        if self.rank == 0:
            logger.info("eval at step %d: %s", step, _short(metrics))
        return metrics


def _load(config: dict[str, Any], family: TrainFamily):
    """(model, processor, resume state or None): from the latest checkpoint when there is one."""
    import ray.train
    from transformers import AutoProcessor

    from raycaption.models import materialize

    cfg = config["cfg"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        source = materialize(cfg.model, cfg.storage)
        model = family.model_class().from_pretrained(source, dtype=torch.float32)
        return model, AutoProcessor.from_pretrained(source), None
    with checkpoint.as_directory() as folder:
        source = str(Path(folder) / MODEL_DIR)
        model = family.model_class().from_pretrained(source, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(source)
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    logger.info("resuming from %s at step %d", checkpoint.path, state["step"])
    return model, processor, state


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            logger.warning("--precision %s ignored: mixed precision runs on GPU only", precision)
        return None
    if precision == "fp32":
        return None
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # No decay on biases and norms (the usual AdamW recipe).
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n.lower()]
    rest = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scheduler(optimizer, schedule: str, warmup: int, total: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _report_with_checkpoint(metrics, progress, core, processor, optimizer, scheduler, scaler,
                            step: int, rank: int) -> None:  # fmt: skip
    import ray.train

    rng = _gather(_get_rng(), int(ray.train.get_context().get_world_size()))
    with tempfile.TemporaryDirectory(prefix="raycaption-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            folder = Path(tmp)
            core.save_pretrained(folder / MODEL_DIR)
            processor.save_pretrained(folder / MODEL_DIR)
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "rng": rng,
                "progress": progress,
            }
            torch.save(state, folder / STATE_FILE)
            (folder / PROGRESS_FILE).write_text(json.dumps({"step": step, **progress}, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step))


def _gather(obj: Any, world: int) -> list[Any]:
    """Every worker's ``obj``, in rank order (no collective with one worker)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sum_counts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _maybe_inject_fault(faults: dict[str, Any], step: int, rank: int) -> None:
    """Test hook (``RAYCAPTION_TEST_FAULTS`` on the driver): slow steps down, or kill this
    worker process once at a given step, the way a lost node or an OOM kill would.

    ``exit_delay`` seconds pass first: Ray Train collects reports at its health check (every
    2 s), and a real worker dies long after its last checkpoint, not milliseconds after."""
    if faults.get("step_sleep"):
        time.sleep(float(faults["step_sleep"]))
    marker = faults.get("marker")
    due = faults.get("exit_at_step") == step and rank == faults.get("rank", 0)
    if due and marker and not os.path.exists(marker):
        time.sleep(float(faults.get("exit_delay", 5.0)))
        Path(marker).write_text(f"worker {rank} exited at step {step}\n")
        logger.warning("fault injection: worker %d exits at step %d", rank, step)
        os._exit(1)


def _short(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
