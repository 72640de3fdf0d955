"""Build the tiny GIT captioning model bundled for the ``demo`` command, with ``finetune``.

The model captions the synthetic images of :mod:`raycaption.synthetic` ("a red circle on a
blue background"). Everything is created locally, with no network access:

* a BERT-style WordPiece tokenizer whose vocabulary is the five BERT special tokens plus
  :func:`raycaption.synthetic.caption_vocabulary` (``[CLS]`` is GIT's bos, ``[SEP]`` its eos);
* a ``CLIPImageProcessor`` that resizes/crops to a small square (32 px by default);
* a freshly initialised ``GitForCausalLM`` with a few hundred thousand parameters, saved as
  the base model folder;
* synthetic training pairs (a Parquet manifest of JPEG bytes + captions);

and then the model is trained by the same Ray Train fine-tuning job users run
(:func:`raycaption.train.run_finetune`), which exports the best checkpoint and its eval card.
Rebuild the shipped copy with::

    python -m raycaption.demo_model --output lib/raycaption/data/demo-model

The training seeds never overlap the seed of the shipped sample images
(:data:`raycaption.synthetic.SAMPLES_SEED`) or of the held-out evaluation set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from transformers import (
    AutoProcessor,
    BertTokenizer,
    GenerationConfig,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
)

from raycaption.synthetic import SAMPLES_SEED, caption_vocabulary, make_example

__all__ = [
    "DEMO_MODEL_DIR",
    "EVAL_SEED",
    "SAMPLES_DIR",
    "SPECIAL_TOKENS",
    "TRAIN_SEED_BASE",
    "DemoModelSpec",
    "TrainingSpec",
    "build_demo_model",
    "build_processor",
    "build_tokenizer",
    "caption_images",
    "evaluate_exact_match",
    "load_demo_model",
    "main",
    "new_model",
    "vocab_tokens",
    "write_training_pairs",
    "write_untrained_model",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_MODEL_DIR = DATA_DIR / "demo-model"
"""Where the shipped demo model lives (inside the package)."""
SAMPLES_DIR = DATA_DIR / "samples"
"""Where the shipped sample images and their ``captions.csv`` live."""

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT special tokens, first in the vocabulary (ids 0-4)."""

TRAIN_SEED_BASE = 1_000_000
"""Training examples are drawn from ``random.Random(TRAIN_SEED_BASE + seed)``."""
EVAL_SEED = 999_999
"""Seed of the held-out evaluation examples."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class DemoModelSpec:
    """Architecture of the demo GIT (vision tower + text decoder)."""

    image_size: int = 32
    patch_size: int = 4
    vision_hidden_size: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 192
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 32
    initializer_range: float = 0.02
    max_new_tokens: int = 12


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """Settings of the demo fine-tuning run (passed to :class:`FinetuneConfig`).

    Training images are drawn at ``train_image_size`` (cheaper than the 256 px of the shipped
    samples; the decode step downsizes both to the model's ``image_size`` anyway).
    A from-scratch model needs a far larger learning rate than fine-tuning a pretrained one.
    """

    steps: int = 2500
    train_images: int = 10_000
    batch_size: int = 32
    train_image_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.04
    schedule: str = "cosine"
    eval_every: int = 500
    eval_examples: int = 100


def build_tokenizer(model_max_length: int = 32) -> BertTokenizer:
    """Return a lower-casing BERT WordPiece tokenizer over the caption vocabulary.

    The vocabulary is ``SPECIAL_TOKENS`` followed by ``caption_vocabulary()``, written to a
    temporary ``vocab.txt`` and loaded from there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab_tokens()) + "\n", encoding="utf-8")
        return BertTokenizer(
            vocab=str(vocab_file), do_lower_case=True, model_max_length=model_max_length
        )


def vocab_tokens() -> list[str]:
    """Return the tokenizer vocabulary, in id order."""
    return [*SPECIAL_TOKENS, *caption_vocabulary()]


def build_processor(image_size: int = DemoModelSpec.image_size) -> GitProcessor:
    """Return a ``GitProcessor``: CLIP-style image processor at ``image_size`` + the tokenizer."""
    try:  # the PIL backend of CLIPImageProcessor: no torchvision needed, no fallback warning
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - depends on the installed transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return GitProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def new_model(spec: DemoModelSpec, tokenizer: BertTokenizer) -> GitForCausalLM:
    """Return a freshly initialised ``GitForCausalLM`` for ``spec`` and ``tokenizer``."""
    config = GitConfig(
        vision_config={
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "hidden_size": spec.vision_hidden_size,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "intermediate_size": spec.vision_intermediate_size,
            "initializer_range": spec.initializer_range,
        },
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = GitForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=None,
        max_new_tokens=spec.max_new_tokens,
        num_beams=1,
        do_sample=False,
    )
    return model


@torch.no_grad()
def caption_images(
    model: GitForCausalLM,
    processor: Any,
    images: Sequence[Image.Image],
    batch_size: int = 32,
) -> list[str]:
    """Caption ``images`` greedily with ``model`` (its saved generation config applies)."""
    was_training = model.training
    model.eval()
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = [im.convert("RGB") for im in images[start : start + batch_size]]
        pixel_values = processor(images=chunk, return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=pixel_values.to(model.dtype))
        captions.extend(c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True))
    model.train(was_training)
    return captions


def evaluate_exact_match(
    model: GitForCausalLM, processor: Any, n: int = 100, seed: int = EVAL_SEED
) -> float:
    """Return the fraction of ``n`` held-out examples whose caption is reproduced exactly."""
    rng = random.Random(seed)
    examples = [make_example(rng) for _ in range(n)]
    predicted = caption_images(model, processor, [image for image, _ in examples])
    hits = sum(p == caption for p, (_, caption) in zip(predicted, examples, strict=True))
    return hits / n


def load_demo_model(path: str | Path = DEMO_MODEL_DIR) -> tuple[Any, GitForCausalLM]:
    """Load ``(processor, model)`` from a folder written by :func:`build_demo_model`."""
    processor = AutoProcessor.from_pretrained(str(path))
    model = GitForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return processor, model


def write_untrained_model(
    folder: str | Path, spec: DemoModelSpec | None = None, seed: int = 0
) -> Path:
    """Save a freshly initialised demo GIT with its processor (the fine-tuning base model)."""
    spec = spec or DemoModelSpec()
    folder = Path(folder)
    torch.manual_seed(seed)
    processor = build_processor(spec.image_size)
    model = new_model(spec, processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_training_pairs(
    path: str | Path, n: int, seed: int = 0, size: int = 128, quality: int = 90
) -> Path:
    """Write ``n`` synthetic examples as a Parquet manifest of JPEG bytes + caption.

    The examples come from ``random.Random(TRAIN_SEED_BASE + seed)``, never from the seeds of
    the shipped samples or of the held-out evaluation set.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    train_seed = TRAIN_SEED_BASE + seed
    if train_seed in (SAMPLES_SEED, EVAL_SEED):
        raise ValueError(f"seed {seed} would train on held-out images")
    rng = random.Random(train_seed)
    images, captions = [], []
    for _ in range(n):
        image, caption = make_example(rng, size=size)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        images.append(buf.getvalue())
        captions.append(caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": captions}), path)
    return path


def build_demo_model(
    output_dir: str | Path,
    steps: int = TrainingSpec.steps,
    seed: int = 0,
    spec: DemoModelSpec | None = None,
    training: TrainingSpec | None = None,
    workers: int = 1,
    log: Any = None,
) -> dict[str, Any]:
    """Fine-tune a fresh demo GIT on synthetic pairs with Ray Train; save it to ``output_dir``.

    The base model and the training pairs are written to a temporary folder, the model is
    trained with :func:`raycaption.train.run_finetune` (which exports the best checkpoint to
    ``output_dir`` with its eval card), and the exported model is then scored by exact-match
    caption accuracy on ``training.eval_examples`` examples drawn with ``EVAL_SEED`` and on the
    shipped samples.

    Args:
        output_dir: Folder to write (created if missing; an earlier export is replaced).
        steps: Optimizer steps.
        seed: Seed for the weights initialisation, the training pairs and the split.
        spec: Model architecture; ``DemoModelSpec()`` by default.
        training: Fine-tuning settings; ``TrainingSpec(steps=steps)`` by default.
        workers: Ray Train workers (one CPU each).
        log: Called with one progress string at a time (default: print and flush).

    Returns:
        Metrics: ``exact_match``, ``samples_exact_match``, ``wer``, ``steps``, ``seconds``,
        ``params``.
    """
    from raycaption.config import FinetuneConfig, PairsConfig
    from raycaption.train.run import run_finetune

    log = log or functools.partial(print, flush=True)
    spec = spec or DemoModelSpec()
    training = dataclasses.replace(training or TrainingSpec(), steps=steps)
    output_dir = Path(output_dir)
    if (output_dir / "training.json").is_file():  # an earlier demo build: replaced whole
        for old in output_dir.iterdir():
            if old.is_file():
                old.unlink()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raycaption-demo-") as tmp:
        base = write_untrained_model(Path(tmp) / "base", spec, seed)
        pairs = write_training_pairs(
            Path(tmp) / "pairs.parquet", training.train_images, seed, training.train_image_size
        )
        log(
            f"base model and {training.train_images} training pairs in {time.perf_counter() - start:.0f}s"
        )
        cfg = FinetuneConfig(
            pairs=PairsConfig(uri=str(pairs), seed=seed),
            output=str(output_dir),
            model=str(base),
            run_name="demo-model",
            storage_path=str(Path(tmp) / "runs"),
            steps=training.steps,
            batch_size=training.batch_size,
            grad_accum=1,
            lr=training.lr,
            weight_decay=training.weight_decay,
            warmup_ratio=training.warmup_ratio,
            schedule=training.schedule,
            eval_every=training.eval_every,
            max_new_tokens=spec.max_new_tokens,
            num_workers=workers,
            use_gpu=False,
            ray_address="local",  # a fresh local Ray, as `raycaption demo` uses
        )
        result = run_finetune(cfg)
    (output_dir / "vocab.txt").write_text("\n".join(vocab_tokens()) + "\n", encoding="utf-8")
    processor, model = load_demo_model(output_dir)
    exact_match = evaluate_exact_match(model, processor, training.eval_examples)
    samples = _samples_exact_match(model, processor)
    seconds = time.perf_counter() - start
    metrics = {
        "exact_match": exact_match,
        "eval_examples": training.eval_examples,
        "samples_exact_match": samples,
        "wer": result.metrics["wer"],
        "steps": training.steps,
        "best_step": result.best_step,
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    record = {
        "command": f"python -m raycaption.demo_model --output {output_dir} "
        f"--steps {training.steps} --seed {seed} --workers {workers}",
        "seed": seed,
        "train_seed": TRAIN_SEED_BASE + seed,
        "eval_seed": EVAL_SEED,
        "samples_seed": SAMPLES_SEED,
        "model": dataclasses.asdict(spec),
        "training": {**dataclasses.asdict(training), "workers": workers},
        "metrics": metrics,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    log(
        f"exact match {exact_match:.1%} on {training.eval_examples} held-out examples, "
        f"{samples:.0%} on the shipped samples; {training.steps} steps, {seconds:.0f}s; "
        f"saved to {output_dir}"
    )
    return metrics


def _samples_exact_match(model: GitForCausalLM, processor: Any) -> float:
    import csv

    with open(SAMPLES_DIR / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = [Image.open(SAMPLES_DIR / r["filename"]).convert("RGB") for r in rows]
    predicted = caption_images(model, processor, images)
    return sum(p == r["caption"] for p, r in zip(predicted, rows, strict=True)) / len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m raycaption.demo_model --output DIR [--steps N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m raycaption.demo_model",
        description="Fine-tune the tiny demo GIT captioner on synthetic shapes with Ray Train "
        "(raycaption finetune) and export it with its eval card.",
    )
    parser.add_argument("--output", default=str(DEMO_MODEL_DIR), help="output folder")
    parser.add_argument("--steps", type=int, default=TrainingSpec.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("raycaption").setLevel(logging.INFO)
    metrics = build_demo_model(args.output, steps=args.steps, seed=args.seed, workers=args.workers)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
