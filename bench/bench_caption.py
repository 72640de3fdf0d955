"""raycaption benchmarks: what the pipeline costs against the obvious alternatives.

Three sections, each printed and recorded as a row in bench/RESULTS.md:

compare  the same JPEGs, model and hardware, three ways:
         1. naive:    per image, PIL open + processor + generate (the public guides' loop)
         2. batched:  decode everything, then processor + generate in batches (bare loop)
         3. pipeline: raycaption end to end on a local Ray instance (list, read, decode,
                      caption, write, commit); Ray is started before the clock, as the
                      loops load their model before it
         Caption length is forced (min_new_tokens = max_new_tokens) so every method does
         identical model work; tags and embeddings are off so the pipeline does no more.
decode   decode + resize + normalise, images/s on one core, on photo-like JPEGs of 0.5 to
         12 MP: PIL open + convert + the HF image processor, against raycaption's decode
         (JPEG draft mode, one resize of the crop box) + its batch normalisation.
scale    the pipeline on 1k, 10k and 100k small inputs, each in its own driver process:
         wall time, the time ratios and the driver's peak memory (max RSS).

Model: the bundled demo model by default; --arch git-base or blip2-opt-2.7b builds the
full-size architecture from its published config with random weights (bench/archs.py), for
GPU runs.

    python bench/bench_caption.py --images 4096 --batch-size 16
    python bench/bench_caption.py --sections decode
    python bench/bench_caption.py --sections scale --scale-points 1000,10000,100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "lib"), str(REPO / "bench")]
RESULTS = REPO / "bench" / "RESULTS.md"
SECTIONS = ("compare", "decode", "scale")


# ---------------------------------------------------------------- inputs


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB frame: smooth gradients plus noise, so JPEGs do not compress to
    nothing and decode costs what a camera image costs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / (30 + seed % 7) + seed),
            128 + 100 * np.cos(yy / (40 + seed % 5) - seed),
            128 + 60 * np.sin((xx + yy) / 50),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(width, height, seed)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_jpegs(folder: Path, n: int, width: int, height: int, distinct: int | None = None):
    """``n`` JPEG files; with ``distinct`` only that many different images are encoded and
    reused (the scale runs need many files, not many different pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoded = [jpeg_bytes(width, height, i) for i in range(min(n, distinct or n))]
    paths = []
    for i in range(n):
        path = folder / f"img{i:06d}.jpg"
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(path)
    return paths


# ---------------------------------------------------------------- models


def model_folder(args, tmp: Path) -> str:
    if args.arch:
        import archs

        return str(archs.build(args.arch, tmp / args.arch))
    if args.model:
        return args.model
    from raycaption.cli import bundled

    return str(bundled("demo-model"))


def load(model_dir: str):
    """The model and processor as the public guides load them (bf16 on a GPU)."""
    import torch
    from transformers import AutoProcessor

    from raycaption.config import ModelConfig, StorageConfig
    from raycaption.models import _captioner_class, inspect_model
    from raycaption.models.base import pick_device_and_dtype

    torch.set_grad_enabled(False)
    device, dtype = pick_device_and_dtype("auto")
    family = inspect_model(ModelConfig(name=model_dir), StorageConfig()).family
    processor = AutoProcessor.from_pretrained(model_dir)
    if family == "blip-2":  # decoder-only: prompts pad on the left
        processor.tokenizer.padding_side = "left"
    model = _captioner_class(family).model_class.from_pretrained(model_dir, dtype=dtype)
    return Loop(processor, model.to(device).eval(), family == "blip-2", device, dtype)


@dataclass
class Loop:
    """What the two bare loops share: the guides' processor call and ``generate``."""

    processor: Any
    model: Any
    needs_text: bool  # BLIP-2's processor puts the query's image tokens into the text
    device: Any
    dtype: Any

    def caption(self, images: list, gen: dict) -> list[str]:
        text = {"text": [""] * len(images), "padding": True} if self.needs_text else {}
        inputs = self.processor(images=images, return_tensors="pt", **text).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, **gen)
        return self.processor.batch_decode(out, skip_special_tokens=True)


def run_naive(paths, loop: Loop, gen) -> float:
    started = time.perf_counter()
    for p in paths:
        loop.caption([Image.open(p).convert("RGB")], gen)
    _sync(loop.device)
    return time.perf_counter() - started


def run_batched(paths, loop: Loop, gen, batch_size) -> float:
    started = time.perf_counter()
    images = [Image.open(p).convert("RGB") for p in paths]
    for i in range(0, len(images), batch_size):
        loop.caption(images[i : i + batch_size], gen)
    _sync(loop.device)
    return time.perf_counter() - started


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def pipeline_config(folder: Path, out: Path, model_dir: str, batch_size: int, tokens: int):
    from raycaption.config import (
        CaptionConfig,
        ComputeConfig,
        EmbedConfig,
        InputConfig,
        ModelConfig,
        TagConfig,
    )

    return CaptionConfig(
        input=InputConfig(uri=str(folder)),
        output=str(out),
        model=ModelConfig(name=model_dir, max_new_tokens=tokens, min_new_tokens=tokens),
        compute=ComputeConfig(batch_size=batch_size, quiet=True),
        embed=EmbedConfig(enabled=False),
        tags=TagConfig(enabled=False),
    )


def run_pipeline(cfg) -> tuple[float, dict]:
    import ray

    from raycaption.pipeline import run_caption

    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        started = time.perf_counter()
        summary = run_caption(cfg)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    if summary.captioned != summary.inputs:
        raise RuntimeError(f"pipeline captioned {summary.captioned} of {summary.inputs}")
    return seconds, summary.caption_actors


# ---------------------------------------------------------------- sections


def section_compare(args, model_dir: str, tmp: Path) -> None:
    import torch

    gen = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "num_beams": 1}
    folder = tmp / "images"
    paths = make_jpegs(folder, args.images, args.width, args.height)
    loop = load(model_dir)
    run_batched(paths[: args.batch_size], loop, gen, args.batch_size)  # warm up
    if loop.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    naive_paths = paths[: args.naive_images or len(paths)]
    naive = len(naive_paths) / run_naive(naive_paths, loop, gen)
    batched = args.images / run_batched(paths, loop, gen, args.batch_size)
    gpu_mem = (
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        if loop.device.type == "cuda"
        else "-"
    )
    del loop
    cfg = pipeline_config(folder, tmp / "out", model_dir, args.batch_size, args.tokens)
    seconds, actors = run_pipeline(cfg)
    pipeline = args.images / seconds
    print(f"     naive: {naive:8.1f} images/s  ({len(naive_paths)} images)")
    print(f"   batched: {batched:8.1f} images/s")
    print(f"  pipeline: {pipeline:8.1f} images/s  ({seconds:.1f}s, actors {actors})")
    print(f"pipeline/naive = {pipeline / naive:.2f}x, pipeline/batched = {pipeline / batched:.2f}x")
    print(f"peak GPU memory of one model + batch: {gpu_mem}")
    record(
        "compare",
        [
            str(dt.date.today()),
            machine(),
            Path(model_dir).name,
            f"{args.images} x {args.width}x{args.height} JPEG"
            + (f" (naive: first {len(naive_paths)})" if len(naive_paths) < args.images else ""),
            str(args.batch_size),
            str(args.tokens),
            f"{naive:.1f}",
            f"{batched:.1f}",
            f"{pipeline:.1f}",
            f"{pipeline / naive:.2f}",
            f"{pipeline / batched:.2f}",
            gpu_mem,
            versions(),
            f"`{command()}`",
        ],
    )


def section_decode(args) -> None:
    """One core (this process, one torch thread) decoding 0.5-12 MP JPEGs two ways."""
    import torch
    from transformers import CLIPImageProcessor

    from raycaption.images import decode_image, resize_spec_from_processor_config

    torch.set_num_threads(1)
    # git-base's image processor: shortest edge 224, centre crop 224, CLIP mean/std.
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    spec = resize_spec_from_processor_config(processor.to_dict())
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    rows = []
    for mp in (0.5, 1, 2, 4, 8, 12):
        height = int((mp * 1e6 * 3 / 4) ** 0.5)
        width = int(height * 4 / 3)
        blobs = [jpeg_bytes(width, height, seed) for seed in range(args.decode_images)]

        def naive(blobs=blobs):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
            return processor(images=images, return_tensors="pt").pixel_values

        def ours(blobs=blobs):
            pixels = np.stack([decode_image(b, spec).pixels for b in blobs])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
            return (x * processor.rescale_factor - mean) / std

        a, b = naive(), ours()
        assert a.shape == b.shape, (a.shape, b.shape)
        rate_naive = len(blobs) / best_of(naive, 3)
        rate_ours = len(blobs) / best_of(ours, 3)
        print(
            f"{mp:>4} MP {width}x{height}: naive {rate_naive:7.1f} img/s, "
            f"raycaption {rate_ours:7.1f} img/s, {rate_ours / rate_naive:.2f}x"
        )
        rows.append((mp, width, height, rate_naive, rate_ours))
    for mp, width, height, rate_naive, rate_ours in rows:
        record(
            "decode",
            [
                str(dt.date.today()),
                machine(),
                f"{mp} MP ({width}x{height})",
                f"{rate_naive:.1f}",
                f"{rate_ours:.1f}",
                f"{rate_ours / rate_naive:.2f}",
                f"`{command()}`",
            ],
        )


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def section_scale(args, model_dir: str, tmp: Path) -> None:
    points = [int(p) for p in args.scale_points.split(",")]
    folder = tmp / "scale-images"
    make_jpegs(folder, max(points), 64, 48, distinct=64)
    results = []
    for n in points:
        subset = tmp / f"scale-{n}"
        subset.mkdir()
        for i in range(n):  # hard links: the same files, a listing of exactly n
            os.link(folder / f"img{i:06d}.jpg", subset / f"img{i:06d}.jpg")
        cmd = [
            sys.executable,
            __file__,
            "--scale-point",
            json.dumps(
                {
                    "input": str(subset),
                    "output": str(tmp / f"out-{n}"),
                    "model": model_dir,
                    "batch_size": args.batch_size,
                    "tokens": args.scale_tokens,
                }
            ),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        point = json.loads(out.strip().splitlines()[-1])
        results.append((n, point["seconds"], point["max_rss_mib"]))
        print(f"{n:>7} inputs: {point['seconds']:7.1f}s, driver max RSS {point['max_rss_mib']} MiB")
    for (n0, t0, m0), (n1, t1, m1) in pairwise(results):
        print(f"{n0} -> {n1}: time x{t1 / t0:.2f}, driver peak memory x{m1 / m0:.2f}")
    record(
        "scale",
        [
            str(dt.date.today()),
            machine(),
            Path(model_dir).name,
            f"64x48 JPEG, {args.scale_tokens} tokens",
            " / ".join(f"{t:.1f}" for _, t, _ in results),
            " / ".join(f"{t1 / t0:.2f}" for (_, t0, _), (_, t1, _) in pairwise(results)),
            " / ".join(str(m) for _, _, m in results),
            " / ".join(f"{m1 / m0:.2f}" for (_, _, m0), (_, _, m1) in pairwise(results)),
            f"`{command()}`",
        ],
    )


def scale_point(spec: dict) -> None:
    """One scale run, alone in this process so its peak memory is its own."""
    cfg = pipeline_config(
        Path(spec["input"]),
        Path(spec["output"]),
        spec["model"],
        spec["batch_size"],
        spec["tokens"],
    )
    seconds, _ = run_pipeline(cfg)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB -> MiB
    print(json.dumps({"seconds": round(seconds, 2), "max_rss_mib": max_rss}))


# ---------------------------------------------------------------- recording

HEADERS = {
    "compare": (
        "CPU and GPU: captioning throughput",
        [
            "date",
            "machine",
            "model",
            "images",
            "batch",
            "tokens",
            "naive img/s",
            "batched img/s",
            "pipeline img/s",
            "pipeline/naive",
            "pipeline/batched",
            "GPU memory per actor",
            "versions",
            "command",
        ],
    ),
    "decode": (
        "Decode + resize + normalise on one core (git-base geometry, 224x224)",
        ["date", "machine", "JPEG", "naive img/s", "raycaption img/s", "ratio", "command"],
    ),
    "scale": (
        "Scale: 1k -> 10k -> 100k inputs",
        [
            "date",
            "machine",
            "model",
            "inputs",
            "seconds",
            "time ratios",
            "driver max RSS MiB",
            "memory ratios",
            "command",
        ],
    ),
}


def record(section: str, cells: list[str], path: Path = RESULTS) -> None:
    """Append a row to the section's table in RESULTS.md (the table is created if new)."""
    title, header = HEADERS[section]
    marker = f"<!-- table:{section} -->"
    row = "| " + " | ".join(cells) + " |"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if marker not in text:
        text = text.rstrip("\n") + (
            f"\n\n## {title}\n\n{marker}\n| "
            + " | ".join(header)
            + " |\n|"
            + " --- |" * len(header)
            + "\n"
        )
    lines = text.split("\n")
    i = lines.index(marker) + 1
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    lines.insert(i, row)
    path.write_text("\n".join(lines))
    print(f"recorded in {path} ({section})")


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    return f"{platform.machine()} {os.cpu_count()} cores, no GPU"


def versions() -> str:
    import ray
    import torch
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}"
    )


def command() -> str:
    return " ".join(["python bench/bench_caption.py", *sys.argv[1:]]).strip()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--images", type=int, default=4096, help="compare: images")
    parser.add_argument(
        "--naive-images",
        type=int,
        help="compare: time the naive loop on the first N images only (default: all)",
    )
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20, help="forced caption length")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="model folder (default: the bundled demo model)")
    model.add_argument(
        "--arch",
        choices=("git-base", "blip2-opt-2.7b"),
        help="full-size architecture with random weights",
    )
    parser.add_argument("--decode-images", type=int, default=16, help="decode: per size")
    parser.add_argument("--scale-points", default="1000,10000,100000")
    parser.add_argument("--scale-tokens", type=int, default=4)
    parser.add_argument("--scale-point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.scale_point:
        scale_point(json.loads(args.scale_point))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    with tempfile.TemporaryDirectory(prefix="raycaption-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = model_folder(args, tmp_path) if {"compare", "scale"} & set(sections) else ""
        if "compare" in sections:
            section_compare(args, model_dir, tmp_path)
        if "decode" in sections:
            section_decode(args)
        if "scale" in sections:
            section_scale(args, model_dir, tmp_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
