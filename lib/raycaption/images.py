"""Safe per-image decoding and resizing for untrusted image bytes.

Every image goes through ``decode_image``: it refuses empty, unidentifiable, truncated and
oversized files with a ``RecordError`` carrying a decode-stage code, and turns everything
else into one fixed-shape RGB ``uint8`` array in the geometry the captioning model's image
processor expects. Doing the geometry here, once, lets the model stage only normalise.

The work per image is kept proportional to the output rather than the input where the
formats allow it: JPEGs are DCT-scaled while decoding (``Image.draft``), the centre crop is
expressed as a source box so only the needed region is resampled, and the EXIF rotation is
applied to the small result instead of the full-size image.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from raycaption.errors import RecordError

logger = logging.getLogger(__name__)

SHORTEST_EDGE_CROP = "shortest_edge_crop"
EXACT = "exact"
RESIZE_MODES = (SHORTEST_EDGE_CROP, EXACT)

# Only formats a captioning corpus plausibly holds. Letting Image.open probe every plugin
# would hand untrusted bytes to rarely exercised parsers (EPS even shells out to
# Ghostscript) and lets lax plugins "identify" random bytes.
# MPO (multi-picture camera JPEGs) is reached through the JPEG opener.
ACCEPTED_FORMATS = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "BMP",
    "DIB",
    "TIFF",
    "ICO",
    "PPM",
    "AVIF",
    "JPEG2000",
)

# Formats whose decoder can scale down while decoding (JPEG's DCT scaling).
_DRAFTABLE_FORMATS = frozenset({"JPEG", "MPO"})

# Pillow's resize has an integer pre-reduction step; 3.0 keeps bicubic quality while
# skipping most of the full-resolution filtering work.
_REDUCING_GAP = 3.0

_MAX_MESSAGE_CHARS = 300

# Same table as ImageOps.exif_transpose; kept here so the transpose can be applied to the
# resized output rather than the full image.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA"})
_VALID_RESAMPLE = frozenset(int(r) for r in Image.Resampling)

_warned_load_truncated = False


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ResizeSpec:
    """Geometry the model's image processor expects.

    Applied once here so the model stage only normalises.

    Attributes:
        mode: ``"shortest_edge_crop"`` (CLIP/GIT style: resize so the shorter side equals
            ``shortest_edge``, then centre-crop to ``(height, width)``) or ``"exact"``
            (BLIP style: resize straight to ``(height, width)``, aspect ratio not kept).
        height: Output height in pixels.
        width: Output width in pixels.
        shortest_edge: Target length of the shorter side before cropping; required for
            ``shortest_edge_crop``, ignored for ``exact``.
        resample: A ``PIL.Image.Resampling`` value (an int, as in HF configs).
    """

    mode: str
    height: int
    width: int
    shortest_edge: int | None = None
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"ResizeSpec.mode must be one of {RESIZE_MODES}, got {self.mode!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"ResizeSpec.{name} must be a positive int, got {value!r}")
        if self.mode == SHORTEST_EDGE_CROP and not _is_positive_int(self.shortest_edge):
            raise ValueError(
                "ResizeSpec.shortest_edge must be a positive int for mode "
                f"{SHORTEST_EDGE_CROP!r}, got {self.shortest_edge!r}"
            )
        if self.resample not in _VALID_RESAMPLE:
            raise ValueError(
                f"ResizeSpec.resample must be a PIL resampling filter, got {self.resample!r}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The ``(height, width, 3)`` shape of every decoded pixel array."""
        return (self.height, self.width, 3)


@dataclass(frozen=True)
class DecodeLimits:
    """Per-image safety limits, checked from the header before any pixel is decoded.

    Attributes:
        max_pixels: ``width * height`` above this is a ``decompression_bomb``. Pillow's own
            ``Image.MAX_IMAGE_PIXELS`` (about 89.5 MP by default) is enforced as well, so the
            effective ceiling is the lower of the two.
        min_side: ``min(width, height)`` below this is ``image_too_small``.
    """

    max_pixels: int = 100_000_000
    min_side: int = 1

    def __post_init__(self) -> None:
        if not _is_positive_int(self.max_pixels):
            raise ValueError(
                f"DecodeLimits.max_pixels must be a positive int, got {self.max_pixels!r}"
            )
        if not isinstance(self.min_side, int) or self.min_side < 0:
            raise ValueError(f"DecodeLimits.min_side must be an int >= 0, got {self.min_side!r}")


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image, ready for normalisation.

    Attributes:
        pixels: ``uint8`` array of shape ``spec.shape``, C-contiguous RGB.
        width: Original width after EXIF orientation is applied (not the drafted size).
        height: Original height after EXIF orientation is applied.
    """

    pixels: np.ndarray
    width: int
    height: int


_DEFAULT_LIMITS = DecodeLimits()


def decode_image(
    data: bytes, spec: ResizeSpec, limits: DecodeLimits = _DEFAULT_LIMITS
) -> DecodedImage:
    """Decodes untrusted image bytes into the model's fixed input geometry.

    Only the first frame of animated images is used. EXIF orientation is applied, alpha is
    composited over white, and high bit depth images are scaled to 8 bits.

    Args:
        data: The raw file bytes.
        spec: Output geometry.
        limits: Size limits enforced from the header before decoding.

    Returns:
        The resized RGB pixels and the oriented original dimensions.

    Raises:
        RecordError: With code ``empty_file``, ``unrecognized_format``, ``truncated_image``,
            ``decompression_bomb``, ``image_too_small`` or ``decode_failed``. No other
            exception type escapes.
    """
    if len(data) == 0:
        raise RecordError("empty_file", "file is empty (0 bytes)")
    _warn_if_truncated_loading_enabled()
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; promote the warning so
        # those files are refused before their pixels are allocated. catch_warnings is not
        # thread-safe, but a lost filter only lets through images that still pass our own
        # max_pixels check, so the race cannot unbound memory.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, spec, limits)
    except RecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RecordError("decompression_bomb", _describe(exc)) from exc
    except Exception as exc:
        # The one boundary where any Pillow failure becomes a value.
        if _looks_truncated(exc, data):
            raise RecordError("truncated_image", _describe(exc)) from exc
        logger.debug("decode failed", exc_info=True)
        raise RecordError("decode_failed", _describe(exc)) from exc


def _decode(data: bytes, spec: ResizeSpec, limits: DecodeLimits) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise RecordError(
            "unrecognized_format",
            f"not an image in a supported format ({len(data)} bytes, starts {data[:8]!r})",
        ) from exc

    with img:
        raw_w, raw_h = img.size
        # The header size is all we trust before decoding: a small file can declare a
        # gigapixel canvas, so refuse it before load() allocates anything.
        if raw_w * raw_h > limits.max_pixels:
            raise RecordError(
                "decompression_bomb",
                f"{raw_w}x{raw_h} = {raw_w * raw_h} pixels exceeds max_pixels={limits.max_pixels}",
            )
        if min(raw_w, raw_h) < limits.min_side:
            raise RecordError(
                "image_too_small", f"{raw_w}x{raw_h} is below min_side={limits.min_side}"
            )

        draftable = img.format in _DRAFTABLE_FORMATS
        if draftable:
            # JPEG EXIF sits in APP1, already parsed by open(); the orientation must be known
            # before draft() because it decides which raw side maps to the output height.
            orientation = _orientation(img)
        else:
            # PNG may keep eXIf after the pixel data, and getexif() would load() to reach it;
            # loading here first keeps truncation errors on the load path.
            img.load()
            orientation = _orientation(img)

        swaps = orientation in _SWAPS_AXES
        out_w, out_h = (spec.height, spec.width) if swaps else (spec.width, spec.height)
        box, draft_request = _source_box(raw_w, raw_h, out_w, out_h, spec)

        if draftable:
            drafted = img.draft("RGB", draft_request)
            if drafted is not None:
                # draft() reports which part of the scaled image the original covers; map
                # the box with that exact factor rather than the rounded-up image size.
                _, covered = drafted
                fx, fy = covered[2] / raw_w, covered[3] / raw_h
                box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            img.load()

        pixels = _render(img, (out_w, out_h), box, spec.resample, orientation)

    if pixels.shape != spec.shape:
        raise RecordError("decode_failed", f"internal: got shape {pixels.shape}, want {spec.shape}")
    width, height = (raw_h, raw_w) if swaps else (raw_w, raw_h)
    return DecodedImage(pixels=pixels, width=width, height=height)


def _source_box(
    raw_w: int, raw_h: int, out_w: int, out_h: int, spec: ResizeSpec
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Returns the source region to resample and the smallest size draft() may decode to."""
    if spec.mode == EXACT:
        return (0.0, 0.0, float(raw_w), float(raw_h)), (out_w, out_h)

    assert spec.shortest_edge is not None  # guaranteed by ResizeSpec validation
    scale = spec.shortest_edge / min(raw_w, raw_h)
    # HF pads with black when the crop is larger than the resized image; scaling up until
    # the crop fits instead keeps every output pixel real image content.
    scale = max(scale, out_w / raw_w, out_h / raw_h)
    crop_w, crop_h = out_w / scale, out_h / scale
    left = max(0.0, (raw_w - crop_w) / 2)
    top = max(0.0, (raw_h - crop_h) / 2)
    box = (left, top, min(float(raw_w), left + crop_w), min(float(raw_h), top + crop_h))
    # Asking draft() for the whole resized image keeps the cropped region >= the output in
    # both directions after DCT scaling.
    request = (
        max(1, min(raw_w, math.ceil(raw_w * scale))),
        max(1, min(raw_h, math.ceil(raw_h * scale))),
    )
    return box, request


def _render(
    img: Image.Image,
    size: tuple[int, int],
    box: tuple[float, float, float, float],
    resample: int,
    orientation: int,
) -> np.ndarray:
    """Resizes a loaded image once and finishes it as oriented RGB uint8 pixels."""
    work = _working_image(img)
    levels = _levels(work) if work.mode in _HIGH_BIT_MODES else None
    if work.mode == "F":
        work = _finite(work, levels)
    small = work.resize(size, resample, box=box, reducing_gap=_REDUCING_GAP)
    rgb = _to_rgb_array(small, levels)
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    if method is not None:
        # Flips and quarter turns commute with a centred crop and with the (symmetric)
        # resampling filters, so rotating the small output equals rotating the source.
        rgb = np.array(Image.fromarray(rgb).transpose(method))
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _working_image(img: Image.Image) -> Image.Image:
    """Converts at most once into a mode Pillow can resample without losing information."""
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or mode in _HIGH_BIT_MODES:
        return img
    if mode in ("La", "RGBa"):
        # Premultiplied modes only come from in-memory images; straighten them so the
        # compositing step sees one alpha convention.
        return img.convert("LA" if mode == "La" else "RGBA")
    if mode == "1":
        # Resizing bilevel images is forced to nearest-neighbour; grey keeps edges smooth.
        return img.convert("L")
    if img.has_transparency_data:
        # Palette and colour-keyed images: turn the key into real alpha so it can be
        # composited over white instead of showing the key colour (often black).
        return img.convert("RGBA")
    # CMYK (including Adobe-inverted JPEGs, handled by the JPEG plugin), YCbCr, LAB, HSV, P.
    return img.convert("RGB")


def _levels(img: Image.Image) -> tuple[float, float]:
    """Picks the value range that maps to 0..255 for a high bit depth image."""
    if img.mode in ("I", "I;16"):
        lo, hi = img.getextrema()
    else:
        # getextrema() rejects the other 16-bit layouts and returns NaN for float images
        # holding NaN; these modes are rare enough that a full-size numpy pass is fine.
        arr = np.asarray(img)
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = finite.min(), finite.max()
    lo, hi = float(lo), float(hi)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        return 0.0, 1.0
    if lo >= 0 and hi <= 255:
        # 8-bit data in a wide container; stretching would invent contrast.
        return 0.0, 255.0
    if img.mode != "F" and lo >= 0 and hi <= 65535:
        # Nominal 16-bit range, so a mid-grey stays mid-grey instead of being stretched.
        return 0.0, 65535.0
    return lo, hi if hi > lo else lo + 1.0


def _finite(img: Image.Image, levels: tuple[float, float] | None) -> Image.Image:
    """Replaces NaN/inf in a float image so resampling cannot smear them across pixels."""
    arr = np.asarray(img)
    if np.isfinite(arr).all():
        return img
    lo, hi = levels if levels is not None else (0.0, 1.0)
    return Image.fromarray(np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo), mode="F")


def _to_rgb_array(small: Image.Image, levels: tuple[float, float] | None) -> np.ndarray:
    """Finishes the resized image as an RGB uint8 array (small, so numpy is cheap here)."""
    if levels is not None:
        lo, hi = levels
        grey = (np.asarray(small, dtype=np.float32) - lo) * (255.0 / (hi - lo))
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if small.mode in _ALPHA_MODES:
        arr = np.asarray(small, dtype=np.float32)
        alpha = arr[:, :, -1:] / 255.0
        colour = arr[:, :, :-1]
        # Transparent regions are usually meant to show the page background; white
        # matches how browsers show them, black would read as a dark object.
        out = colour * alpha + 255.0 * (1.0 - alpha)
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out
    if small.mode != "RGB":
        small = small.convert("RGB")
    return np.array(small, dtype=np.uint8)


def _orientation(img: Image.Image) -> int:
    """Reads the EXIF (or XMP) orientation; bad metadata means "as stored", not a failure."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError) as exc:
        logger.debug("ignoring unreadable EXIF: %s", exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _looks_truncated(exc: Exception, data: bytes) -> bool:
    """Tells a cut-off file from other decoder failures."""
    if isinstance(exc, EOFError):
        return True
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        # ImageFile.load ("image file is truncated ...") and ImageFile._safe_read
        # ("Truncated File Read") both end up here.
        return True
    # libwebp only says "could not create decoder object"; the RIFF header declares the
    # full length, which tells truncation apart from corruption.
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 12:
        declared = int.from_bytes(data[4:8], "little") + 8
        return len(data) < declared
    return False


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


def _warn_if_truncated_loading_enabled() -> None:
    global _warned_load_truncated
    # Some libraries flip this process-wide; truncated files would then decode half grey
    # without any error, so make that visible once rather than silently accept it.
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_load_truncated:
        _warned_load_truncated = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process; truncated images "
            "can no longer be detected and will decode partly grey"
        )


def resize_spec_from_processor_config(cfg: Mapping) -> ResizeSpec:
    """Builds a ResizeSpec from a Hugging Face image processor config.

    Accepts the contents of ``preprocessor_config.json`` or ``image_processor.to_dict()``.
    CLIP/GIT style (``size={"shortest_edge": N}`` with a centre crop) becomes
    ``shortest_edge_crop``; BLIP style (``size={"height": H, "width": W}`` or an int size
    without a centre crop) becomes ``exact``. Older int sizes are read the way the
    processors that wrote them did: an int size with a centre crop is a shortest edge
    (CLIP), without one it is a square (BLIP).

    Args:
        cfg: The processor config mapping.

    Returns:
        The equivalent ResizeSpec.

    Raises:
        ValueError: If the config does not describe a fixed output size this module can
            reproduce.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"image processor config must be a mapping, got {type(cfg).__name__}")
    if cfg.get("do_resize", True) is False:
        raise ValueError(
            "image processor config has do_resize=false; a fixed output size is needed"
        )
    resample = _resample_from_config(cfg.get("resample", Image.Resampling.BICUBIC))
    crop_cfg = cfg.get("crop_size")
    do_crop = bool(cfg.get("do_center_crop", crop_cfg is not None))
    size = cfg.get("size")

    if do_crop:
        if crop_cfg is None:
            raise ValueError("image processor config has do_center_crop=true but no crop_size")
        crop_h, crop_w = _height_width(crop_cfg, "crop_size")
        if _is_positive_int(size) or (isinstance(size, Mapping) and _only_shortest_edge(size)):
            edge = size if _is_positive_int(size) else size["shortest_edge"]
            return ResizeSpec(SHORTEST_EDGE_CROP, crop_h, crop_w, edge, resample)
        if _has_height_width(size) and _height_width(size, "size") == (crop_h, crop_w):
            return ResizeSpec(EXACT, crop_h, crop_w, None, resample)
        raise ValueError(
            f"unsupported size {size!r} with centre crop {crop_cfg!r}: only "
            "size={'shortest_edge': N} (or an int) followed by a centre crop is supported"
        )

    if _is_positive_int(size) or _has_height_width(size):
        height, width = _height_width(size, "size")
        return ResizeSpec(EXACT, height, width, None, resample)
    raise ValueError(
        f"unsupported size {size!r} without a centre crop: need "
        "size={'height': H, 'width': W} or an int for a fixed output shape"
    )


def _only_shortest_edge(size: Mapping) -> bool:
    extra = {k: v for k, v in size.items() if k != "shortest_edge" and v is not None}
    return _is_positive_int(size.get("shortest_edge")) and not extra


def _has_height_width(size: object) -> bool:
    if isinstance(size, Mapping):
        return "height" in size and "width" in size
    return isinstance(size, (list, tuple)) and len(size) == 2


def _height_width(value: object, name: str) -> tuple[int, int]:
    if _is_positive_int(value):
        return value, value
    if isinstance(value, Mapping):
        pair = (value.get("height"), value.get("width"))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        pair = (value[0], value[1])  # HF tuple sizes are (height, width)
    else:
        pair = (None, None)
    if not all(_is_positive_int(v) for v in pair):
        raise ValueError(
            f"unsupported {name} {value!r}: expected an int, {{'height': H, 'width': W}} "
            "or (height, width) with positive ints"
        )
    return pair[0], pair[1]


def _resample_from_config(value: object) -> int:
    if isinstance(value, str) and value.upper() in Image.Resampling.__members__:
        return int(Image.Resampling[value.upper()])
    if isinstance(value, int) and not isinstance(value, bool) and value in _VALID_RESAMPLE:
        return int(value)
    raise ValueError(f"unsupported resample {value!r}: expected a PIL resampling filter int")
