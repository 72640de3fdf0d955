"""Good and bad image files built in memory, for decode tests at every level.

Each case is ``name -> (file bytes, expected error code or None)``; ``None`` means the
file must decode. Everything is generated with Pillow/numpy from fixed seeds, so the bytes
are identical on every call and no binary fixtures are shipped.
"""

from __future__ import annotations

import functools
import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

SEED = 20240611

# Extension written by write_image_cases. Undecodable files get image extensions so a
# pipeline's extension filter lets them through to the decoder.
EXTENSIONS = {
    "ok_rgb_jpeg": "jpg",
    "ok_png": "png",
    "empty": "jpg",
    "garbage": "jpg",
    "text_file": "png",
    "truncated_jpeg": "jpg",
    "truncated_png": "png",
    "bomb_png": "png",
    "cmyk_jpeg": "jpg",
    "gray16_png": "png",
    "palette_transparent_png": "png",
    "rgba_png": "png",
    "la_png": "png",
    "exif_rotated_jpeg": "jpg",
    "animated_gif": "gif",
    "tiny_1x1_png": "png",
    "extreme_aspect_png": "png",
    "float_tiff": "tiff",
    "webp": "webp",
    "bmp": "bmp",
}

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Saves ``img`` in ``fmt`` to bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo_like(width: int, height: int, seed: int = SEED) -> np.ndarray:
    """A smooth colourful scene plus sensor-like noise, as (height, width, 3) uint8.

    The noise keeps JPEGs from compressing to almost nothing, so cutting one at a fraction of
    its length really lands in the middle of the entropy-coded data.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    r = 200 * u + 40 * np.sin(6 * v)
    g = 180 * v + 50 * np.cos(5 * u)
    b = 120 + 100 * np.sin(3 * (u + v))
    # A few discs so there is structure worth resampling, not only gradients.
    for cx, cy, rad, colour in ((0.3, 0.4, 0.15, (240, 40, 40)), (0.7, 0.6, 0.2, (30, 60, 220))):
        inside = (u - cx) ** 2 + (v - cy) ** 2 < rad**2
        r = np.where(inside, colour[0], r)
        g = np.where(inside, colour[1], g)
        b = np.where(inside, colour[2], b)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def halves(width: int, height: int, left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half is ``right``."""
    img = Image.new(mode, (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def jpeg_with_orientation(img: Image.Image, orientation: int, **params: object) -> bytes:
    """Encodes ``img`` as JPEG carrying an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), **params)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid mode "1" PNG of ``width`` x ``height`` zeros, a ~100 KB file.

    Written chunk by chunk so building it never holds the canvas in memory, unlike
    ``Image.new(...).save(...)``.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    rows_per_step = 1000
    for start in range(0, height, rows_per_step):
        parts.append(comp.compress(row * min(rows_per_step, height - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=1)
def _cases() -> tuple[tuple[str, bytes, str | None], ...]:
    rng = np.random.default_rng(SEED)
    cases: dict[str, tuple[bytes, str | None]] = {}

    cases["ok_rgb_jpeg"] = (encode(Image.fromarray(photo_like(320, 240)), "JPEG", quality=90), None)
    cases["ok_png"] = (encode(Image.fromarray(photo_like(160, 120, SEED + 1)), "PNG"), None)
    cases["empty"] = (b"", "empty_file")
    # Garbage must not accidentally start with an image signature; a fixed seed keeps it so.
    cases["garbage"] = (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "unrecognized_format")
    cases["text_file"] = (b"hello, not an image", "unrecognized_format")

    full_jpeg = encode(Image.fromarray(photo_like(480, 360, SEED + 2)), "JPEG", quality=92)
    cases["truncated_jpeg"] = (full_jpeg[: int(len(full_jpeg) * 0.6)], "truncated_image")
    full_png = encode(Image.fromarray(photo_like(200, 150, SEED + 3)), "PNG")
    cases["truncated_png"] = (full_png[: int(len(full_png) * 0.6)], "truncated_image")
    cases["bomb_png"] = (png_bomb(), "decompression_bomb")

    cases["cmyk_jpeg"] = (encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"), None)
    gray16 = np.zeros((48, 64), np.uint16)
    gray16[:, :32] = 16384  # quarter grey -> ~64
    gray16[:, 32:] = 49152  # three-quarter grey -> ~191
    cases["gray16_png"] = (encode(Image.fromarray(gray16), "PNG"), None)

    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    palette.paste(1, (32, 0, 64, 48))  # left: index 0 (transparent black), right: red
    cases["palette_transparent_png"] = (encode(palette, "PNG", transparency=0), None)

    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))  # transparent *black*: must become white
    rgba.paste((0, 255, 0, 255), (0, 24, 64, 48))  # opaque green bottom half
    cases["rgba_png"] = (encode(rgba, "PNG"), None)
    cases["la_png"] = (encode(halves(64, 48, (0, 0), (50, 255), mode="LA"), "PNG"), None)

    # Stored 300x200 with red left / blue right; orientation 6 displays it rotated 90
    # degrees clockwise, so the viewer sees 200x300 with red on top.
    cases["exif_rotated_jpeg"] = (jpeg_with_orientation(halves(300, 200, RED, BLUE), 6), None)

    frames = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), BLUE)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases["animated_gif"] = (gif, None)

    cases["tiny_1x1_png"] = (encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), None)
    tall = np.linspace(0, 255, 20000, dtype=np.float32).astype(np.uint8)[:, None]
    cases["extreme_aspect_png"] = (encode(Image.fromarray(tall, mode="L"), "PNG"), None)

    floats = np.zeros((48, 64), np.float32)
    floats[:, :32] = 0.25
    floats[:, 32:] = 0.75
    cases["float_tiff"] = (encode(Image.fromarray(floats, mode="F"), "TIFF"), None)
    cases["webp"] = (
        encode(Image.fromarray(photo_like(96, 64, SEED + 4)), "WEBP", quality=90),
        None,
    )
    cases["bmp"] = (encode(Image.fromarray(photo_like(50, 40, SEED + 5)), "BMP"), None)

    assert set(cases) == set(EXTENSIONS)
    return tuple((name, data, code) for name, (data, code) in cases.items())


def make_image_cases() -> dict[str, tuple[bytes, str | None]]:
    """Returns ``name -> (file bytes, expected error code or None if it must decode)``."""
    return {name: (data, code) for name, data, code in _cases()}


def write_image_cases(folder: pathlib.Path) -> dict[str, str | None]:
    """Writes every case to ``folder/<name>.<ext>``.

    Returns:
        ``filename -> expected error code`` (``None`` for files that must decode).
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, (data, code) in make_image_cases().items():
        filename = f"{name}.{EXTENSIONS[name]}"
        (folder / filename).write_bytes(data)
        expected[filename] = code
    return expected
