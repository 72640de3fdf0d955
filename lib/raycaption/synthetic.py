"""A synthetic image-captioning task: one coloured shape on a coloured background.

Every image shows a single shape (``SHAPES``) in one colour (``COLOURS``) on a plain
background of a *different* colour, and its caption names both, e.g.
``"a red circle on a blue background"`` or ``"an orange star on a white background"``.
Position, size, rotation and the exact shades are jittered and mild pixel noise is added,
so no two images are pixel-identical, while the caption stays fully determined by the
picture. The captions use a tiny closed vocabulary (``caption_vocabulary()``), which is
what lets the bundled demo GIT model be small and still caption every image correctly.

Pure Pillow/numpy; everything is deterministic for a given ``random.Random`` state/seed.
"""

from __future__ import annotations

import csv
import functools
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SAMPLES_SEED",
    "SHAPES",
    "caption_for",
    "caption_vocabulary",
    "make_example",
    "write_samples",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""Shape names, as they appear in captions."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (135, 45, 175),
    "orange": (250, 140, 15),
}
"""Colour names (as they appear in captions) and their nominal RGB values."""

SAMPLES_SEED = 45
"""Seed of the sample images shipped in ``raycaption/data/samples`` (never used for training)."""

_COLOUR_JITTER = 18  # max per-channel deviation from the nominal colour
_NOISE_SIGMA = 6.0  # std of the additive Gaussian pixel noise
_RADIUS = (0.27, 0.36)  # shape "radius", as a fraction of the image size
_OFFSET = 0.06  # max offset of the shape centre from the image centre, as a fraction
_ROTATION = 10.0  # max rotation of the polygon shapes, in degrees
_SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled, for anti-aliased edges


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shape: str, colour: str, background: str) -> str:
    """Return the caption for a ``colour`` ``shape`` on a ``background`` background.

    >>> caption_for("circle", "orange", "blue")
    'an orange circle on a blue background'
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    for name in (colour, background):
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}")
    if colour == background:
        raise ValueError("the shape colour must differ from the background colour")
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def caption_vocabulary() -> list[str]:
    """Return every word that can appear in a caption, in a fixed order, without duplicates."""
    words = ["a", "an", "on", "background", *COLOURS, *SHAPES]
    return list(dict.fromkeys(words))


def _jitter_colour(rng: random.Random, name: str) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[name]
    )


def _rotate(
    points: list[tuple[float, float]], cx: float, cy: float, angle: float
) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _shape_polygon(
    shape: str, cx: float, cy: float, r: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred on (cx, cy) with circumradius-ish ``r`` (not circle)."""
    if shape == "square":
        h = r * 0.8
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [
            (r * math.cos(a), r * math.sin(a))
            for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)
        ]
        pts = [(x, y + r * 0.15) for x, y in pts]  # centre the triangle's bounding box
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        t = r * 0.33  # half the bar thickness
        pts = [
            (-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t),
            (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t),
        ]  # fmt: skip
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return _rotate(pts, cx, cy, angle)


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (seeded) ``2*size`` x ``2*size`` x 3 field of Gaussian pixel noise, read-only."""
    noise = np.random.default_rng(20240611).standard_normal((2 * size, 2 * size, 3), np.float32)
    noise *= _NOISE_SIGMA
    noise.flags.writeable = False
    return noise


def make_example(rng: random.Random, size: int = 256) -> tuple[Image.Image, str]:
    """Draw one random example and return ``(image, caption)``.

    The image is an RGB ``size`` x ``size`` picture of one shape from ``SHAPES`` in one
    colour from ``COLOURS`` on a background of another colour; the caption reads
    ``"a <colour> <shape> on a <colour> background"`` (``"an"`` before ``orange``).
    The shape sits near the centre and fills a good part of the picture (its position, size
    and rotation are jittered only mildly: a tiny ViT trained from scratch needs that to tell
    the shapes apart within a few CPU minutes); both colours are jittered and Gaussian pixel
    noise is added.

    Args:
        rng: The source of randomness; the result depends only on its state, so the same
            seed always gives the same sequence of examples.
        size: Width and height of the image in pixels.
    """
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(list(COLOURS), 2)
    fg, bg = _jitter_colour(rng, colour), _jitter_colour(rng, background)

    big = size * _SUPERSAMPLE
    r = rng.uniform(*_RADIUS) * big  # "radius" of the shape
    cx = big * (0.5 + rng.uniform(-_OFFSET, _OFFSET))
    cy = big * (0.5 + rng.uniform(-_OFFSET, _OFFSET))
    angle = math.radians(rng.uniform(-_ROTATION, _ROTATION))

    canvas = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=fg)
    canvas = canvas.resize((size, size), Image.Resampling.BOX)

    # Noise: a random window of a fixed Gaussian noise field (much cheaper than fresh noise).
    bank = _noise_bank(size)
    ox, oy = rng.randrange(size), rng.randrange(size)
    pixels = np.asarray(canvas, dtype=np.float32) + bank[oy : oy + size, ox : ox + size]
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    return image, caption_for(shape, colour, background)


def write_samples(
    folder: str | Path, n: int, seed: int, size: int = 256, fmt: str = "jpeg"
) -> list[tuple[str, str]]:
    """Write ``n`` examples drawn with ``random.Random(seed)`` as image files in ``folder``.

    Files are named ``sample_00.jpg``, ``sample_01.jpg``, ... (``.png`` for ``fmt="png"``);
    a ``captions.csv`` with the header ``filename,caption`` lists the true captions.

    Args:
        folder: Output folder; created if missing.
        n: Number of images.
        seed: Seed of the generator; the same seed always writes the same images.
        size: Width and height of the images in pixels.
        fmt: ``"jpeg"`` (quality 85) or ``"png"``.

    Returns:
        The ``(filename, caption)`` pairs, in file order.
    """
    fmt = fmt.lower()
    if fmt in ("jpeg", "jpg"):
        ext, save_kwargs = "jpg", {"format": "JPEG", "quality": 85}
    elif fmt == "png":
        ext, save_kwargs = "png", {"format": "PNG", "optimize": True}
    else:
        raise ValueError(f"unsupported image format {fmt!r} (use 'jpeg' or 'png')")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width = max(2, len(str(n - 1)))
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        image, caption = make_example(rng, size=size)
        name = f"sample_{i:0{width}d}.{ext}"
        image.save(folder / name, **save_kwargs)
        pairs.append((name, caption))
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "caption"])
        writer.writerows(pairs)
    return pairs
