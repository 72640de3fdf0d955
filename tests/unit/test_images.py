"""Safe decoding and resizing of untrusted images (raycaption.images)."""

from __future__ import annotations

import io
import resource
import struct
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from raycaption import images
from raycaption.errors import ERROR_CODES, RecordError
from raycaption.images import (
    DecodedImage,
    DecodeLimits,
    ResizeSpec,
    decode_image,
    resize_spec_from_processor_config,
)
from tests.helpers.bad_images import (
    BLUE,
    GREEN,
    RED,
    encode,
    halves,
    jpeg_with_orientation,
    make_image_cases,
    photo_like,
    write_image_cases,
)

CLIP = ResizeSpec("shortest_edge_crop", 224, 224, shortest_edge=224)
BLIP = ResizeSpec("exact", 96, 64)  # deliberately non-square to catch (h, w) mix-ups
CASES = make_image_cases()
BAD = sorted(name for name, (_, code) in CASES.items() if code is not None)
GOOD = sorted(name for name, (_, code) in CASES.items() if code is None)


def decode_code(data: bytes, spec: ResizeSpec = CLIP, limits: DecodeLimits | None = None):
    """The error code decode_image raises, or None if it decodes."""
    try:
        decode_image(data, spec, limits or DecodeLimits())
    except RecordError as err:
        return err.code
    return None


def mean_rgb(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)


def assert_colour(pixels: np.ndarray, expected: tuple, tol: float = 12.0) -> None:
    got = mean_rgb(pixels)
    assert np.all(np.abs(got - np.array(expected)) <= tol), f"mean colour {got} != {expected}"


# --- error codes ------------------------------------------------------------------------


def test_case_set_covers_every_decode_code_but_too_small_and_failed():
    codes = {code for _, code in CASES.values()}
    decode_codes = {c for c, stage in ERROR_CODES.items() if stage == "decode"}
    assert decode_codes - codes == {"image_too_small", "decode_failed"}


@pytest.mark.parametrize("name", BAD)
def test_bad_case_gives_its_code(name):
    data, code = CASES[name]
    with pytest.raises(RecordError) as info:
        decode_image(data, CLIP)
    assert info.value.code == code
    assert info.value.message


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("spec", [CLIP, BLIP], ids=["crop", "exact"])
def test_good_case_decodes_to_spec_shape(name, spec):
    out = decode_image(CASES[name][0], spec)
    assert isinstance(out, DecodedImage)
    assert out.pixels.dtype == np.uint8
    assert out.pixels.shape == spec.shape
    assert out.pixels.flags.c_contiguous
    assert out.width >= 1 and out.height >= 1


def test_empty_bytes_is_empty_file():
    assert decode_code(b"") == "empty_file"
    assert decode_code(bytearray()) == "empty_file"


@pytest.mark.parametrize("data", [b"hello, not an image", bytes(range(256)) * 8, b"\x00" * 100])
def test_unidentifiable_bytes_are_unrecognized_format(data):
    assert decode_code(data) == "unrecognized_format"


def test_formats_outside_the_allowlist_are_not_parsed():
    # EPS would be handed to Ghostscript on load; it must never get that far.
    eps = encode(Image.new("RGB", (8, 8), RED), "EPS")
    assert decode_code(eps) == "unrecognized_format"


# --- truncation -------------------------------------------------------------------------


def test_truncated_jpeg_passes_verify_but_is_refused():
    data, _ = CASES["truncated_jpeg"]
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size[0] >= 400 and img.size[1] >= 300
    img.verify()  # the trap: verify() does not read the entropy-coded data at all
    assert decode_code(data) == "truncated_image"
    assert decode_code(data, BLIP) == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_truncated_images_set_elsewhere_is_reported_once(monkeypatch, caplog):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(images, "_warned_load_truncated", False)
    with caplog.at_level("WARNING", logger="raycaption.images"):
        decode_image(CASES["ok_png"][0], CLIP)
        decode_image(CASES["ok_png"][0], CLIP)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "LOAD_TRUNCATED_IMAGES" in caplog.records[0].message


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_png_and_jpeg_at_several_cuts(fraction):
    png = encode(Image.fromarray(photo_like(200, 150, seed=7)), "PNG")
    jpeg = encode(Image.fromarray(photo_like(480, 360, seed=7)), "JPEG", quality=92)
    assert decode_code(png[: int(len(png) * fraction)]) == "truncated_image"
    assert decode_code(jpeg[: int(len(jpeg) * fraction)]) == "truncated_image"


def test_truncated_webp_is_truncated_not_decode_failed():
    webp = encode(Image.fromarray(photo_like(200, 150, seed=8)), "WEBP", quality=90)
    assert decode_code(webp) is None
    assert decode_code(webp[: len(webp) // 2]) == "truncated_image"


# --- decompression bombs ----------------------------------------------------------------


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def test_bomb_png_is_refused_without_decoding():
    data, _ = CASES["bomb_png"]
    assert len(data) < 1_000_000
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)  # IHDR width, height
    before = _max_rss_bytes()
    assert decode_code(data) == "decompression_bomb"
    # Decoding would allocate 900 MB (one byte per pixel even for mode "1").
    assert _max_rss_bytes() - before < 200 * 1024 * 1024


def test_max_pixels_is_checked_from_the_header_before_load(monkeypatch):
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self)
    )
    data = encode(Image.new("RGB", (200, 100), RED), "PNG")
    assert decode_code(data, limits=DecodeLimits(max_pixels=19_999)) == "decompression_bomb"
    assert loads == []
    assert decode_code(data, limits=DecodeLimits(max_pixels=20_000)) is None
    assert loads


def test_max_pixels_applies_to_jpeg_too():
    data = encode(Image.new("RGB", (300, 200), RED), "JPEG")
    with pytest.raises(RecordError) as info:
        decode_image(data, CLIP, DecodeLimits(max_pixels=50_000))
    assert info.value.code == "decompression_bomb"
    assert "300x200" in info.value.message


def test_pillow_bomb_warning_becomes_the_error(monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; we must refuse instead.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("RGB", (40, 40), RED), "PNG")  # 1600 px: warning range
    filters_before = list(warnings.filters)
    assert decode_code(data) == "decompression_bomb"
    assert warnings.filters == filters_before  # the promotion does not leak


def test_pillow_bomb_error_is_caught(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("RGB", (40, 40), RED), "GIF")  # 1600 px > 2 * 100
    assert decode_code(data) == "decompression_bomb"


# --- size limits and odd geometry -------------------------------------------------------


def test_tiny_image_is_upscaled_by_default_and_refused_below_min_side():
    data, _ = CASES["tiny_1x1_png"]
    out = decode_image(data, CLIP)
    assert (out.width, out.height) == (1, 1)
    assert np.all(out.pixels == np.array([10, 200, 30], np.uint8))
    assert decode_code(data, limits=DecodeLimits(min_side=2)) == "image_too_small"
    wide = encode(Image.new("RGB", (300, 4), RED), "PNG")
    assert decode_code(wide, limits=DecodeLimits(min_side=5)) == "image_too_small"


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1)])
def test_extreme_aspect_ratio_is_accepted(size):
    ramp = np.linspace(0, 255, max(size), dtype=np.float32).astype(np.uint8)
    arr = ramp[:, None] if size[0] == 1 else ramp[None, :]
    data = encode(Image.fromarray(arr, mode="L"), "PNG")
    crop = decode_image(data, CLIP)
    assert (crop.width, crop.height) == size
    # The crop keeps only the middle of the ramp: a near-uniform mid grey.
    assert abs(mean_rgb(crop.pixels)[0] - 127.5) < 3
    exact = decode_image(data, BLIP)
    along = exact.pixels[:, 0, 0] if size[0] == 1 else exact.pixels[0, :, 0]
    assert along[0] < 10 and along[-1] > 245  # the whole ramp squashed in


# --- colour modes -----------------------------------------------------------------------


def test_alpha_is_composited_over_white():
    out = decode_image(CASES["rgba_png"][0], BLIP).pixels
    assert_colour(out[:40], (255, 255, 255), tol=2)  # transparent black -> white, not black
    assert_colour(out[-40:], GREEN, tol=2)


def test_palette_transparency_is_composited_over_white():
    out = decode_image(CASES["palette_transparent_png"][0], BLIP).pixels
    assert_colour(out[:, :28], (255, 255, 255), tol=2)
    assert_colour(out[:, -28:], RED, tol=2)


def test_la_alpha_is_composited_over_white():
    out = decode_image(CASES["la_png"][0], BLIP).pixels
    assert_colour(out[:, :28], (255, 255, 255), tol=2)
    assert_colour(out[:, -28:], (50, 50, 50), tol=2)


def test_palette_without_transparency_keeps_its_colours():
    img = halves(64, 48, RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, BLIP).pixels
    assert_colour(out[:, :28], RED, tol=2)
    assert_colour(out[:, -28:], BLUE, tol=2)


def test_colour_key_transparency_in_rgb_png_is_composited_over_white():
    data = encode(halves(64, 48, (0, 0, 0), BLUE), "PNG", transparency=(0, 0, 0))
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = decode_image(data, BLIP).pixels
    assert_colour(out[:, :28], (255, 255, 255), tol=2)
    assert_colour(out[:, -28:], BLUE, tol=2)


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white():
    data, _ = CASES["gray16_png"]
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data, BLIP).pixels
    assert_colour(out[:, :28], (64, 64, 64), tol=2)
    assert_colour(out[:, -28:], (191, 191, 191), tol=2)


def test_sixteen_bit_mid_grey_is_mid_grey():
    data = encode(Image.fromarray(np.full((30, 40), 32768, np.uint16)), "PNG")
    assert_colour(decode_image(data, CLIP).pixels, (128, 128, 128), tol=1)


def test_big_endian_sixteen_bit_and_32_bit_int_tiffs():
    be = Image.new("I;16B", (40, 30), 32768)
    assert Image.open(io.BytesIO(encode(be, "TIFF"))).mode == "I;16B"
    assert_colour(decode_image(encode(be, "TIFF"), CLIP).pixels, (128, 128, 128), tol=1)
    # 8-bit data in a 32-bit container stays as is rather than being stretched.
    eight = Image.fromarray(np.full((30, 40), 200, np.int32))
    assert eight.mode == "I"
    assert_colour(decode_image(encode(eight, "TIFF"), CLIP).pixels, (200, 200, 200), tol=1)
    # Values beyond 16 bits (and negative ones) are stretched over their range.
    wide = np.zeros((30, 40), np.int32)
    wide[:, 20:] = 1_000_000
    wide[:, :20] = -5
    out = decode_image(encode(Image.fromarray(wide), "TIFF"), BLIP).pixels
    assert_colour(out[:, :24], (0, 0, 0), tol=2)
    assert_colour(out[:, -24:], (255, 255, 255), tol=2)


def test_float_images_are_scaled_by_their_range():
    out = decode_image(CASES["float_tiff"][0], BLIP).pixels
    assert_colour(out[:, :28], (64, 64, 64), tol=2)
    assert_colour(out[:, -28:], (191, 191, 191), tol=2)
    wild = np.where(np.arange(40)[None, :] < 20, -3.0, 5.0).astype(np.float32).repeat(30, 0)
    wild[0, 0] = np.nan
    wild[15, 30] = np.inf
    data = encode(Image.fromarray(wild, mode="F"), "TIFF")
    with warnings.catch_warnings():
        # NaN reaching the uint8 cast would warn (and give arbitrary values).
        warnings.simplefilter("error")
        out = decode_image(data, BLIP).pixels
    assert_colour(out[10:, :24], (0, 0, 0), tol=2)
    assert np.all(out[:, -24:] == 255)  # +inf saturates instead of ringing or vanishing


def test_cmyk_adobe_jpeg_gives_red():
    data, _ = CASES["cmyk_jpeg"]
    img = Image.open(io.BytesIO(data))
    assert img.mode == "CMYK" and b"Adobe" in data  # stored inverted, as Photoshop does
    assert_colour(decode_image(data, CLIP).pixels, RED, tol=10)


@pytest.mark.parametrize(
    ("mode", "colour", "fmt"),
    [
        ("1", 1, "PNG"),
        ("L", 180, "PNG"),
        ("LAB", (136, 208, 195), "TIFF"),  # a saturated red in Lab
        ("YCbCr", (76, 85, 255), "TIFF"),  # pure red in YCbCr
        ("CMYK", (0, 255, 255, 0), "TIFF"),
    ],
)
def test_other_file_modes_end_up_rgb(mode, colour, fmt):
    data = encode(Image.new(mode, (40, 30), colour), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    pixels = decode_image(data, CLIP).pixels
    expected = {"1": (255,) * 3, "L": (180,) * 3}.get(mode, RED)
    assert_colour(pixels, expected, tol=12)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("PA", (1, 0), (255, 255, 255)),  # fully transparent palette entry -> white
        ("PA", (1, 255), RED),
        ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
        ("La", (40, 255), (40, 40, 40)),
        ("HSV", (0, 255, 255), RED),
        ("RGBX", (0, 0, 255, 0), BLUE),
    ],
)
def test_in_memory_only_modes_end_up_rgb(mode, colour, expected):
    # These modes cannot be written to a file by Pillow, so exercise the renderer directly.
    img = Image.new(mode, (40, 30), colour)
    if mode == "PA":
        img.putpalette([0, 0, 0, 255, 0, 0])
    pixels = images._render(img, (20, 10), (0, 0, 40, 30), Image.Resampling.BICUBIC, 1)
    assert pixels.shape == (10, 20, 3) and pixels.dtype == np.uint8
    assert_colour(pixels, expected, tol=2)


def test_animated_images_use_the_first_frame():
    assert_colour(decode_image(CASES["animated_gif"][0], CLIP).pixels, RED, tol=2)
    frames = [Image.new("RGB", (40, 30), c) for c in (GREEN, BLUE)]
    for fmt in ("PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
        assert_colour(decode_image(data, CLIP).pixels, GREEN, tol=8)


# --- EXIF orientation -------------------------------------------------------------------


def test_exif_orientation_swaps_dimensions_and_rotates_content():
    out = decode_image(CASES["exif_rotated_jpeg"][0], BLIP)
    assert (out.width, out.height) == (200, 300)  # stored 300x200
    assert_colour(out.pixels[:40], RED, tol=6)  # stored left half is now on top
    assert_colour(out.pixels[-40:], BLUE, tol=6)


def _quadrants(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), RED)
    img.paste(GREEN, (width // 2, 0, width, height // 2))
    img.paste(BLUE, (0, height // 2, width // 2, height))
    img.paste((255, 255, 0), (width // 2, height // 2, width, height))
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("spec", [CLIP, BLIP], ids=["crop", "exact"])
def test_every_orientation_matches_exif_transpose(orientation, spec):
    data = jpeg_with_orientation(_quadrants(600, 360), orientation, quality=95)
    out = decode_image(data, spec)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert (out.width, out.height) == reference.size
    expected = decode_image(encode(reference, "PNG"), spec).pixels
    diff = np.abs(out.pixels.astype(int) - expected.astype(int)).mean()
    assert diff < 6, diff


# --- geometry ---------------------------------------------------------------------------


def _bands(width: int, height: int) -> Image.Image:
    """Red outer quarter, green middle half, blue outer quarter along the long side."""
    img = Image.new("RGB", (width, height), GREEN)
    if width >= height:
        img.paste(RED, (0, 0, width // 4, height))
        img.paste(BLUE, (3 * width // 4, 0, width, height))
    else:
        img.paste(RED, (0, 0, width, height // 4))
        img.paste(BLUE, (0, 3 * height // 4, width, height))
    return img


@pytest.mark.parametrize("size", [(400, 200), (200, 400)])
def test_shortest_edge_crop_keeps_the_centre_and_exact_squashes(size):
    data = encode(_bands(*size), "PNG")
    crop = decode_image(data, ResizeSpec("shortest_edge_crop", 100, 100, shortest_edge=100))
    assert_colour(crop.pixels, GREEN, tol=1)  # resized to 200x100, centre 100 columns
    exact = decode_image(data, ResizeSpec("exact", 100, 100)).pixels
    first, last = (
        (exact[:, :20], exact[:, -20:]) if size[0] > size[1] else (exact[:20], exact[-20:])
    )
    assert_colour(first, RED, tol=1)
    assert_colour(last, BLUE, tol=1)
    assert_colour(exact[40:60, 40:60], GREEN, tol=1)


def test_crop_larger_than_shortest_edge_still_fills_the_output():
    # HF would pad a 300-wide crop of a 200x100 resize with black; we scale up to cover
    # the crop instead (400x200 -> 300x150), keeping the aspect ratio, then crop rows.
    source = Image.fromarray(photo_like(400, 200, seed=5))
    spec = ResizeSpec("shortest_edge_crop", 120, 300, shortest_edge=100)
    out = decode_image(encode(source, "PNG"), spec).pixels
    assert out.shape == (120, 300, 3)
    reference = np.asarray(source.resize((300, 150), Image.Resampling.BICUBIC))[15:135]
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3


def test_a_single_resize_call_does_the_geometry(monkeypatch):
    calls = []
    original = Image.Image.resize

    def spy(self, size, resample=None, box=None, reducing_gap=None):
        calls.append((self.size, size, box, reducing_gap))
        return original(self, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", spy)
    decode_image(CASES["ok_rgb_jpeg"][0], CLIP)
    assert len(calls) == 1
    (src, size, box, gap) = calls[0]
    assert size == (224, 224) and gap == 3.0
    assert box is not None and box[2] - box[0] < src[0]  # only the centre region


def test_jpeg_draft_scales_down_and_matches_a_full_decode(monkeypatch):
    data = encode(Image.fromarray(photo_like(4000, 3000, seed=11)), "JPEG", quality=90)
    drafted_sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafted_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = decode_image(data, CLIP)
    assert (out.width, out.height) == (4000, 3000)  # original size, not the drafted one
    assert drafted_sizes == [(500, 375)]  # 1/8 DCT scaling, still >= 224 on the short side

    full = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 224 / 3000
    crop_w = 224 / scale
    box = ((4000 - crop_w) / 2, 0, (4000 + crop_w) / 2, 3000)
    reference = np.asarray(full.resize((224, 224), Image.Resampling.BICUBIC, box=box))
    diff = np.abs(out.pixels.astype(int) - reference.astype(int)).mean()
    assert diff < 6, diff

    exact = decode_image(data, BLIP)
    reference = np.asarray(full.resize((64, 96), Image.Resampling.BICUBIC))
    assert np.abs(exact.pixels.astype(int) - reference.astype(int)).mean() < 6


# --- failure boundary -------------------------------------------------------------------


def test_unexpected_pillow_failure_is_decode_failed_with_a_short_message(monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("kaboom " * 200)

    monkeypatch.setattr(Image.Image, "resize", boom)
    with pytest.raises(RecordError) as info:
        decode_image(CASES["ok_png"][0], CLIP)
    assert info.value.code == "decode_failed"
    assert info.value.message.startswith("RuntimeError: kaboom")
    assert len(info.value.message) <= 300


@pytest.mark.parametrize("name", ["ok_rgb_jpeg", "ok_png", "webp", "animated_gif", "bmp"])
def test_corrupted_bytes_only_ever_raise_record_errors(name):
    rng = np.random.default_rng(1234)
    data = bytearray(CASES[name][0])
    decode_codes = {c for c, stage in ERROR_CODES.items() if stage == "decode"}
    for _ in range(40):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            mutated[pos] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(data) // 2, len(data) + 1))
        code = decode_code(bytes(mutated[:cut]))  # any other exception fails the test
        assert code is None or code in decode_codes


# --- specs and configs ------------------------------------------------------------------


def test_resize_spec_validates_and_reports_its_shape():
    assert CLIP.shape == (224, 224, 3)
    assert BLIP.shape == (96, 64, 3)
    with pytest.raises(ValueError, match="mode"):
        ResizeSpec("squash", 10, 10)
    with pytest.raises(ValueError, match="shortest_edge"):
        ResizeSpec("shortest_edge_crop", 10, 10)
    with pytest.raises(ValueError, match="height"):
        ResizeSpec("exact", 0, 10)
    with pytest.raises(ValueError, match="resample"):
        ResizeSpec("exact", 10, 10, resample=42)


CLIP_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_resize": True,
    "image_processor_type": "CLIPImageProcessor",
    "resample": 3,
    "size": {"shortest_edge": 224},
}
BLIP_CONFIG = {
    "do_resize": True,
    "image_processor_type": "BlipImageProcessor",
    "resample": 3,
    "size": {"height": 384, "width": 384},
}


def test_processor_config_clip_style():
    spec = resize_spec_from_processor_config(CLIP_CONFIG)
    assert spec == ResizeSpec("shortest_edge_crop", 224, 224, 224, Image.Resampling.BICUBIC)


def test_processor_config_blip_style():
    spec = resize_spec_from_processor_config(BLIP_CONFIG)
    assert spec == ResizeSpec("exact", 384, 384, None, Image.Resampling.BICUBIC)


def test_processor_config_old_int_sizes():
    old_clip = {"crop_size": 224, "do_center_crop": True, "resample": 2, "size": 256}
    assert resize_spec_from_processor_config(old_clip) == ResizeSpec(
        "shortest_edge_crop", 224, 224, 256, Image.Resampling.BILINEAR
    )
    old_blip = {"do_resize": True, "size": 384}  # Salesforce/blip-image-captioning-base
    assert resize_spec_from_processor_config(old_blip) == ResizeSpec("exact", 384, 384)
    assert resize_spec_from_processor_config(
        {"size": {"height": 224, "width": 224}, "crop_size": 224, "do_center_crop": True}
    ) == ResizeSpec("exact", 224, 224)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ("not a dict", "mapping"),
        ({}, "size"),
        ({"size": "big"}, "size"),
        ({"size": {"shortest_edge": 224}}, "centre crop"),
        (
            {
                "size": {"shortest_edge": 800, "longest_edge": 1333},
                "do_center_crop": True,
                "crop_size": 224,
            },
            "size",
        ),
        (
            {"size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": 224},
            "centre crop",
        ),
        ({"size": 224, "do_center_crop": True}, "crop_size"),
        ({"size": {"height": -1, "width": 3}}, "size"),
        ({"size": 224, "resample": 99}, "resample"),
        ({"size": 224, "do_resize": False}, "do_resize"),
    ],
)
def test_processor_config_junk_is_a_clear_value_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        resize_spec_from_processor_config(cfg)


# --- helpers for other test suites ------------------------------------------------------


def test_cases_are_deterministic_and_written_with_extensions(tmp_path):
    again = make_image_cases()
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in CASES.items()}
    expected = write_image_cases(tmp_path)
    assert set(expected) == {p.name for p in tmp_path.iterdir()}
    assert expected["garbage.jpg"] == "unrecognized_format"
    assert expected["ok_rgb_jpeg.jpg"] is None
    for filename, code in expected.items():
        assert decode_code((tmp_path / filename).read_bytes()) == code, filename
