"""Build and train the tiny GIT captioning model bundled for the ``demo`` command.

The model captions the synthetic images of :mod:`raycaption.synthetic` ("a red circle on a
blue background"). Everything is created locally, with no network access:

* a BERT-style WordPiece tokenizer whose vocabulary is the five BERT special tokens plus
  :func:`raycaption.synthetic.caption_vocabulary` (``[CLS]`` is GIT's bos, ``[SEP]`` its eos);
* a ``CLIPImageProcessor`` that resizes/crops to a small square (32 px by default);
* a ``GitForCausalLM`` with a few hundred thousand parameters, trained from scratch with a
  plain, seeded PyTorch AdamW loop on examples generated on the fly (a later issue moves the
  loop onto Ray Train).

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
import math
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
    """Optimiser settings of the demo training loop.

    Training images are drawn at ``train_image_size`` (cheaper than the 256 px of the shipped
    samples; the processor downsizes both to the model's ``image_size`` anyway), evaluation
    images at 256 px like the samples.
    """

    steps: int = 2500
    batch_size: int = 32
    train_image_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
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


def _batch(
    processor: GitProcessor, rng: random.Random, n: int, size: int = 256
) -> dict[str, torch.Tensor]:
    """Draw ``n`` examples from ``rng`` and return model inputs with LM ``labels``."""
    images, captions = zip(*(make_example(rng, size=size) for _ in range(n)), strict=True)
    pixel_values = processor.image_processor(images=list(images), return_tensors="pt")
    text = processor.tokenizer(
        list(captions), padding=True, return_tensors="pt", return_token_type_ids=False
    )
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    return {
        "pixel_values": pixel_values["pixel_values"],
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "labels": labels,
    }


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


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_demo_model(
    output_dir: str | Path,
    steps: int = TrainingSpec.steps,
    seed: int = 0,
    spec: DemoModelSpec | None = None,
    training: TrainingSpec | None = None,
    threads: int = 1,
    log_every: int = 100,
    log: Any = None,
) -> dict[str, Any]:
    """Train the demo GIT from scratch and save it (model + processor) to ``output_dir``.

    Training examples come from ``random.Random(TRAIN_SEED_BASE + seed)``; the metric is
    exact-match caption accuracy of the *saved and reloaded* model on
    ``training.eval_examples`` held-out examples drawn with ``EVAL_SEED``.

    Args:
        output_dir: Folder to write (created if missing; files of the same name are replaced).
        steps: Optimiser steps.
        seed: Seed for the weights initialisation and the training data stream.
        spec: Model architecture; ``DemoModelSpec()`` by default.
        training: Optimiser settings; ``TrainingSpec(steps=steps)`` by default.
        threads: ``torch.set_num_threads`` while training.
        log_every: Log the running loss every this many steps (0: never).
        log: Called with one progress string at a time (default: print and flush).

    Returns:
        Metrics: ``exact_match``, ``steps``, ``seconds`` (training + evaluation), ``params``,
        ``final_loss``.
    """
    log = log or functools.partial(print, flush=True)
    spec = spec or DemoModelSpec()
    training = dataclasses.replace(training or TrainingSpec(), steps=steps)
    train_seed = TRAIN_SEED_BASE + seed
    if train_seed in (SAMPLES_SEED, EVAL_SEED):
        raise ValueError(f"seed {seed} would train on held-out images")
    output_dir = Path(output_dir)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)
        processor = build_processor(spec.image_size)
        model = new_model(spec, processor.tokenizer)
        params = sum(p.numel() for p in model.parameters())
        log(f"demo GIT: {params:,} parameters, vocab {len(processor.tokenizer)}")

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": training.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=training.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, training.warmup_steps, training.steps)
        )
        rng = random.Random(train_seed)
        model.train()
        running = None
        for step in range(training.steps):
            batch = _batch(processor, rng, training.batch_size, training.train_image_size)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
            optimizer.step()
            scheduler.step()
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            if log_every and ((step + 1) % log_every == 0 or step + 1 == training.steps):
                elapsed = time.perf_counter() - start
                log(f"step {step + 1}/{training.steps} loss {running:.4f} ({elapsed:.0f}s)")
        train_seconds = time.perf_counter() - start

        output_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        (output_dir / "model.safetensors").chmod(0o644)  # safetensors writes it as 0600
        (output_dir / "vocab.txt").write_text("\n".join(vocab_tokens()) + "\n", encoding="utf-8")

        reloaded_processor, reloaded = load_demo_model(output_dir)
        exact_match = evaluate_exact_match(reloaded, reloaded_processor, training.eval_examples)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)

    metrics = {
        "exact_match": exact_match,
        "eval_examples": training.eval_examples,
        "steps": training.steps,
        "seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "params": params,
        "final_loss": round(running if running is not None else float("nan"), 5),
    }
    record = {
        "command": (
            f"python -m raycaption.demo_model --output {output_dir} "
            f"--steps {training.steps} --seed {seed}"
        ),
        "seed": seed,
        "train_seed": train_seed,
        "eval_seed": EVAL_SEED,
        "samples_seed": SAMPLES_SEED,
        "model": dataclasses.asdict(spec),
        "training": {**dataclasses.asdict(training), "threads": threads},
        "metrics": metrics,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    log(
        f"exact match {exact_match:.1%} on {training.eval_examples} held-out examples; "
        f"{training.steps} steps in {train_seconds:.0f}s (total {seconds:.0f}s); "
        f"saved to {output_dir}"
    )
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m raycaption.demo_model --output DIR [--steps N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m raycaption.demo_model",
        description="Train the tiny demo GIT captioner on synthetic shapes and save it.",
    )
    parser.add_argument("--output", default=str(DEMO_MODEL_DIR), help="output folder")
    parser.add_argument("--steps", type=int, default=TrainingSpec.steps, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    args = parser.parse_args(argv)
    metrics = build_demo_model(args.output, steps=args.steps, seed=args.seed, threads=args.threads)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
