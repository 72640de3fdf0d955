"""Throughput of three ways to caption the same images with the same model on this machine.

1. naive:    for each image: open, processor, generate (the public guides' loop)
2. batched:  decode everything, then processor + generate in batches (best bare loop)
3. pipeline: raycaption end to end on a local Ray instance (list, read, decode, caption, commit)

Caption length is forced (min_new_tokens = max_new_tokens) so every method does identical
model work. Prints images/s and the ratios, and appends a row to bench/RESULTS.md.

    python bench/bench_caption.py --images 256 --batch-size 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_jpegs(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth gradients plus noise, so they do not compress to nothing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        base = np.stack(
            [
                128 + 100 * np.sin(xx / (30 + i % 7) + i),
                128 + 100 * np.cos(yy / (40 + i % 5) - i),
                128 + 60 * np.sin((xx + yy) / 50),
            ],
            axis=-1,
        )
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def load(model_dir: str):
    import torch
    from transformers import AutoProcessor, GitForCausalLM

    torch.set_grad_enabled(False)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = GitForCausalLM.from_pretrained(model_dir).eval()
    return processor, model


def run_naive(paths, processor, model, gen) -> float:
    started = time.perf_counter()
    for p in paths:
        image = Image.open(p).convert("RGB")
        pixel_values = processor(images=image, return_tensors="pt").pixel_values
        out = model.generate(pixel_values=pixel_values, **gen)
        processor.batch_decode(out, skip_special_tokens=True)
    return time.perf_counter() - started


def run_batched(paths, processor, model, gen, batch_size: int) -> float:
    started = time.perf_counter()
    images = [Image.open(p).convert("RGB") for p in paths]
    for i in range(0, len(images), batch_size):
        pixel_values = processor(
            images=images[i : i + batch_size], return_tensors="pt"
        ).pixel_values
        out = model.generate(pixel_values=pixel_values, **gen)
        processor.batch_decode(out, skip_special_tokens=True)
    return time.perf_counter() - started


def run_pipeline(folder: Path, model_dir: str, out: Path, batch_size: int, tokens: int) -> float:
    import ray

    from raycaption.config import CaptionConfig, ComputeConfig, InputConfig, ModelConfig
    from raycaption.pipeline import run_caption

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        cfg = CaptionConfig(
            input=InputConfig(uri=str(folder)),
            output=str(out),
            model=ModelConfig(name=model_dir, max_new_tokens=tokens, min_new_tokens=tokens),
            compute=ComputeConfig(batch_size=batch_size, num_gpus=0),
        )
        started = time.perf_counter()
        summary = run_caption(cfg)
        seconds = time.perf_counter() - started
        assert summary.captioned == summary.inputs, summary
        return seconds
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20, help="forced caption length")
    parser.add_argument("--model", help="GIT model folder (default: the bundled demo model)")
    parser.add_argument("--record", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()

    import torch
    import transformers

    from raycaption.cli import bundled

    model_dir = args.model or str(bundled("demo-model"))
    gen = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "num_beams": 1}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_jpegs(folder, args.images, args.width, args.height)
        processor, model = load(model_dir)
        run_batched(paths[:8], processor, model, gen, args.batch_size)  # warm up
        naive = run_naive(paths, processor, model, gen)
        batched = run_batched(paths, processor, model, gen, args.batch_size)
        pipeline = run_pipeline(folder, model_dir, Path(tmp) / "out", args.batch_size, args.tokens)

    n = args.images
    rates = {"naive": n / naive, "batched": n / batched, "pipeline": n / pipeline}
    for name, rate in rates.items():
        print(f"{name:>9}: {rate:8.1f} images/s")
    r31, r32 = rates["pipeline"] / rates["naive"], rates["pipeline"] / rates["batched"]
    print(f"pipeline/naive = {r31:.2f}x, pipeline/batched = {r32:.2f}x")

    command = "python bench/bench_caption.py " + " ".join(sys.argv[1:])
    row = (
        f"| {dt.date.today()} | {platform.machine()} {os.cpu_count()} cores, CPU | "
        f"{Path(model_dir).name} | {n} x {args.width}x{args.height} JPEG | {args.batch_size} | "
        f"{args.tokens} | {rates['naive']:.1f} | {rates['batched']:.1f} | "
        f"{rates['pipeline']:.1f} | {r31:.2f} | {r32:.2f} | torch {torch.__version__}, "
        f"transformers {transformers.__version__} | `{command.strip()}` |\n"
    )
    record = Path(args.record)
    if not record.exists():
        record.write_text(
            "# Benchmark results\n\n"
            "| date | machine | model | images | batch | tokens | naive img/s | batched img/s "
            "| pipeline img/s | pipeline/naive | pipeline/batched | versions | command |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        )
    with record.open("a") as f:
        f.write(row)
    print(f"recorded in {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
