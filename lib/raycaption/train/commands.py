"""``raycaption finetune`` and ``raycaption evaluate``: options -> config -> run -> summary.

Registered by :mod:`raycaption.cli` (same error boundary and exit codes as every command).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from raycaption.config import (
    EVAL_METRICS,
    EVAL_SPLITS,
    PRECISIONS,
    SCHEDULES,
    EvalConfig,
    FinetuneConfig,
    PairsConfig,
    StorageConfig,
)

_F, _P, _V = FinetuneConfig(), PairsConfig(), EvalConfig()
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_commands(sub: Any) -> None:
    """Add the ``finetune`` and ``evaluate`` subcommands to the CLI's subparsers."""
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a GIT or BLIP captioner on image-caption pairs with Ray Train",
        description="Fine-tune a captioning model (GIT or BLIP) on image-caption pairs on a Ray "
        "cluster: a seeded train/test split, N data-parallel workers, periodic evaluation and "
        "checkpoints in --storage-path, automatic restarts from the latest checkpoint. The best "
        "checkpoint is exported to --output (save_pretrained model + processor) with an eval "
        "card (eval.json, EVAL.md, eval_predictions.jsonl), ready for "
        "`raycaption caption --model OUTPUT`. Rerunning the same command resumes the run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ft.add_argument_group("data")
    g.add_argument(
        "--train",
        required=True,
        metavar="URI",
        help="image-caption pairs: a .parquet/.jsonl/.csv manifest, a folder of them (e.g. "
        "images + metadata.jsonl), or a caption run's output folder; local or any fsspec URL",
    )
    _add_pair_options(g)
    g = ft.add_argument_group("model and output")
    g.add_argument(
        "--model",
        default=_F.model,
        metavar="NAME",
        help="base model: hub id (microsoft/git-base, Salesforce/blip-image-captioning-base) or "
        "a save_pretrained folder, local or on object storage",
    )
    g.add_argument(
        "--output",
        required=True,
        metavar="URI",
        help="folder for the best model + processor + eval card (empty, new, or an earlier "
        "export); local or object storage",
    )
    g.add_argument(
        "--run-name",
        metavar="NAME",
        help="Ray Train run name; the same name and storage path resume a run "
        "(default: the output folder's name)",
    )
    g.add_argument(
        "--storage-path",
        metavar="URI",
        help="where checkpoints live, shared storage on multi-node clusters "
        "(default: _finetune_runs beside --output)",
    )
    g = ft.add_argument_group("optimisation")
    g.add_argument(
        "--steps", type=int, metavar="N", help="optimizer steps (default: from --epochs)"
    )
    g.add_argument(
        "--epochs", type=float, default=_F.epochs, metavar="X", help="passes over the train split"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=_F.batch_size,
        metavar="N",
        help="images per worker per pass",
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=_F.grad_accum,
        metavar="N",
        help="passes per optimizer step (effective batch = batch x accum x workers)",
    )
    g.add_argument("--lr", type=float, default=_F.lr, metavar="X", help="peak AdamW learning rate")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=_F.weight_decay,
        metavar="X",
        help="AdamW weight decay",
    )
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=_F.warmup_ratio,
        metavar="X",
        help="share of steps with linear warmup",
    )
    g.add_argument("--schedule", default=_F.schedule, choices=SCHEDULES, help="decay after warmup")
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=_F.max_grad_norm,
        metavar="X",
        help="gradient clipping (0 = off)",
    )
    g.add_argument(
        "--precision",
        default=_F.precision,
        choices=PRECISIONS,
        help="auto = bf16 (fp16 without bf16) mixed precision on GPU, fp32 on CPU",
    )
    g.add_argument(
        "--max-text-tokens",
        type=int,
        default=_F.max_text_tokens,
        metavar="N",
        help="captions are truncated to this many tokens for training",
    )
    g = ft.add_argument_group("evaluation and checkpoints")
    g.add_argument(
        "--eval-every",
        type=int,
        default=_F.eval_every,
        metavar="N",
        help="evaluate, report and checkpoint every N steps (and at the end)",
    )
    g.add_argument(
        "--eval-max-images",
        type=int,
        default=_F.eval_max_images,
        metavar="N",
        help="test images used by the periodic evaluation (the final one uses all)",
    )
    g.add_argument(
        "--metric",
        default=_F.metric,
        choices=tuple(EVAL_METRICS),
        help="metric that picks the best checkpoint (wer, cer, loss: lower is better)",
    )
    g.add_argument(
        "--num-to-keep",
        type=int,
        default=_F.num_to_keep,
        metavar="N",
        help="best checkpoints kept in storage (the latest is always kept too)",
    )
    _add_generation_options(g, _F.max_new_tokens, _F.num_beams)
    g = ft.add_argument_group("compute")
    g.add_argument(
        "--num-workers",
        type=int,
        default=_F.num_workers,
        metavar="N",
        help="Ray Train workers, one DDP process (and one GPU with --use-gpu) each",
    )
    g.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per worker (default: when the cluster has GPUs)",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=_F.cpus_per_worker,
        metavar="X",
        help="CPUs reserved per worker (its torch threads on CPU)",
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=_F.max_failures,
        metavar="N",
        help="restarts from the latest checkpoint after a worker dies (-1 = forever)",
    )
    g.add_argument(
        "--image-cache-mb",
        type=int,
        default=_F.image_cache_mb,
        metavar="MB",
        help="decoded images kept in memory per worker; the rest are re-read each epoch",
    )
    _add_common(ft)

    ev = sub.add_parser(
        "evaluate",
        help="score a captioning model on image-caption pairs (WER, CER, BLEU, ROUGE-L, CIDEr)",
        description="Caption image-caption pairs with a model exactly as `raycaption caption` "
        "would, in one Ray task (on a GPU when the cluster has one), and score the captions: "
        "WER and CER (jiwer), BLEU (sacrebleu), ROUGE-L (rouge-score), CIDEr-D (pycocoevalcap).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument(
        "--model",
        required=True,
        metavar="NAME",
        help="hub id or save_pretrained folder, local or object storage",
    )
    ev.add_argument(
        "--pairs",
        required=True,
        metavar="URI",
        help="image-caption pairs, in any form --train of finetune takes",
    )
    g = ev.add_argument_group("data")
    _add_pair_options(g)
    g.add_argument(
        "--split",
        default=_V.split,
        choices=EVAL_SPLITS,
        help="all pairs, or one side of finetune's split (same --seed and --test-fraction)",
    )
    ev.add_argument(
        "--output",
        metavar="URI",
        help="folder for the eval card (eval.json, EVAL.md, eval_predictions.jsonl); "
        "default: print the metrics only",
    )
    g = ev.add_argument_group("generation")
    g.add_argument(
        "--batch-size",
        type=int,
        default=_V.batch_size,
        metavar="N",
        help="images per generate call",
    )
    _add_generation_options(g, _V.max_new_tokens, _V.num_beams)
    g.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run on one GPU (default: when the cluster has GPUs)",
    )
    _add_common(ev)


def _add_pair_options(g: Any) -> None:
    g.add_argument(
        "--image-column",
        metavar="NAME",
        help="manifest column with image URIs (relative to the manifest) or bytes "
        "(default: the first of image, image_uri, image_url, uri, url, file_name, filename, "
        "path, source_uri, image_path)",
    )
    g.add_argument(
        "--caption-column",
        metavar="NAME",
        help="column with a caption or a list of captions (default: the first of caption, "
        "captions, text, sentences)",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=_P.test_fraction,
        metavar="X",
        help="share of images held out for evaluation",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=_P.seed,
        metavar="N",
        help="seed of the split, the batch order and the caption sampling",
    )
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N images (trials)")


def _add_generation_options(g: Any, max_new_tokens: int, num_beams: int) -> None:
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help="caption length limit when generating",
    )
    g.add_argument(
        "--num-beams", type=int, default=num_beams, metavar="N", help="beam width (1 = greedy)"
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument(
        "--max-image-bytes",
        type=int,
        default=_F.max_image_bytes,
        metavar="N",
        help="larger images are skipped and counted",
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=_F.max_image_pixels,
        metavar="N",
        help="larger images are skipped and counted (decompression bombs)",
    )
    g.add_argument(
        "--read-retries",
        type=int,
        default=_F.read_retries,
        metavar="N",
        help="attempts per image on transient storage errors",
    )
    g = p.add_argument_group("cluster and storage (credentials come from the environment)")
    g.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: auto)")
    from raycaption.cli import add_storage_options  # cli imports this module lazily

    add_storage_options(g)
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=_LOG_LEVELS,
        help="log level of raycaption's messages",
    )


def _storage(args: argparse.Namespace) -> StorageConfig:
    from raycaption.cli import storage_from_args

    return storage_from_args(args)


def _pairs(args: argparse.Namespace, uri: str) -> PairsConfig:
    return PairsConfig(
        uri=uri,
        image_column=args.image_column,
        caption_column=args.caption_column,
        test_fraction=args.test_fraction,
        seed=args.seed,
        limit=args.limit,
    )


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig the ``finetune`` options describe."""
    return FinetuneConfig(
        pairs=_pairs(args, args.train),
        output=args.output,
        model=args.model,
        run_name=args.run_name,
        storage_path=args.storage_path,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        max_grad_norm=args.max_grad_norm,
        precision=args.precision,
        eval_every=args.eval_every,
        eval_max_images=args.eval_max_images,
        metric=args.metric,
        num_to_keep=args.num_to_keep,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        max_text_tokens=args.max_text_tokens,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        image_cache_mb=args.image_cache_mb,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        read_retries=args.read_retries,
        ray_address=args.ray_address,
        storage=_storage(args),
    )


def evaluate_config(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig the ``evaluate`` options describe."""
    return EvalConfig(
        pairs=_pairs(args, args.pairs),
        model=args.model,
        split=args.split,
        output=args.output,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        use_gpu=args.use_gpu,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        read_retries=args.read_retries,
        ray_address=args.ray_address,
        storage=_storage(args),
    )


def run_command(args: argparse.Namespace, guarded: Callable) -> int:
    """Run ``finetune`` or ``evaluate`` inside the CLI's error boundary; print a summary."""
    from raycaption.train import run as train_run

    if args.command == "finetune":
        result, code = guarded(lambda: train_run.run_finetune(finetune_config(args)))
        if result is None:
            return code
        resumed = [s for s in result.starts if s > 0]
        print(
            f"run {result.run_name}: {result.total_steps} steps"
            + (f" (resumed at step {', '.join(map(str, resumed))})" if resumed else "")
            + f", best checkpoint at step {result.best_step}; {result.seconds:.0f}s"
        )
        data = result.card["data"]
        print(f"test split ({data['evaluated_images']} images): {_metrics_line(result.metrics)}")
        print(f"model: {result.output} (eval card: EVAL.md, eval.json)")
        print(f"caption with: raycaption caption --model {result.output} --input … --output …")
        return code
    out, code = guarded(lambda: train_run.run_evaluate(evaluate_config(args)))
    if out is None:
        return code
    evaluation, card = out
    skipped = sum(evaluation.skipped.values())
    print(
        f"{card['data']['split']} pairs ({len(evaluation.predictions)} images, {skipped} "
        f"skipped): {_metrics_line(evaluation.metrics)}"
    )
    if args.output:
        print(f"eval card: {args.output}/EVAL.md, eval.json, eval_predictions.jsonl")
    return code


def _metrics_line(metrics: dict[str, float]) -> str:
    order = ("wer", "cer", "bleu", "rouge_l", "cider")
    return "  ".join(f"{k} {metrics[k]:.4g}" for k in order if k in metrics) or "no images"
