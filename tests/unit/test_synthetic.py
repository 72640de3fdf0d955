"""Synthetic captioning task and the bundled demo GIT model."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycaption import synthetic
from raycaption.synthetic import (
    COLOURS,
    SAMPLES_SEED,
    SHAPES,
    caption_for,
    caption_vocabulary,
    make_example,
    write_samples,
)

DATA_DIR = Path(synthetic.__file__).resolve().parent / "data"
MODEL_DIR = DATA_DIR / "demo-model"
SAMPLES_DIR = DATA_DIR / "samples"

CAPTION_RE = re.compile(r"^(a|an) (\w+) (\w+) on (a|an) (\w+) background$")


def _parse(caption: str) -> tuple[str, str, str]:
    match = CAPTION_RE.match(caption)
    assert match, caption
    article, colour, shape, bg_article, background = match.groups()
    assert article == ("an" if colour[0] in "aeiou" else "a")
    assert bg_article == ("an" if background[0] in "aeiou" else "a")
    return colour, shape, background


def _read_captions_csv(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "caption"]
    return [(name, caption) for name, caption in rows[1:]]


def test_make_example_is_deterministic_for_a_seed():
    first = [make_example(random.Random(123)) for _ in range(2)]
    image_a, caption_a = first[0]
    image_b, caption_b = first[1]
    assert caption_a == caption_b
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))

    rng_a, rng_b = random.Random(5), random.Random(5)
    for _ in range(5):
        (im_a, cap_a), (im_b, cap_b) = make_example(rng_a, size=64), make_example(rng_b, size=64)
        assert cap_a == cap_b
        assert np.array_equal(np.asarray(im_a), np.asarray(im_b))


def test_make_example_image_and_caption():
    rng = random.Random(0)
    seen_shapes, seen_colours, seen_backgrounds = set(), set(), set()
    images = []
    for _ in range(150):
        image, caption = make_example(rng, size=96)
        assert image.mode == "RGB" and image.size == (96, 96)
        colour, shape, background = _parse(caption)
        assert shape in SHAPES and colour in COLOURS and background in COLOURS
        assert colour != background
        assert caption == caption_for(shape, colour, background)
        seen_shapes.add(shape)
        seen_colours.add(colour)
        seen_backgrounds.add(background)
        images.append(np.asarray(image))
    assert seen_shapes == set(SHAPES)
    assert seen_colours == set(COLOURS) == seen_backgrounds
    # jittered and noisy: no two images are pixel-identical
    assert len({im.tobytes() for im in images}) == len(images)


def test_different_seeds_give_different_images():
    a, _ = make_example(random.Random(1), size=64)
    b, _ = make_example(random.Random(2), size=64)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_background_colour_dominates_the_corners():
    image, caption = make_example(random.Random(11), size=128)
    _, _, background = _parse(caption)
    corners = np.asarray(image, dtype=np.float32)[[0, 0, -1, -1], [0, -1, 0, -1]]
    # at least one corner is background (the shape never fills the whole image)
    distances = np.abs(corners - np.array(COLOURS[background], dtype=np.float32)).max(axis=1)
    assert distances.min() < 50


def test_caption_vocabulary_covers_every_caption():
    vocabulary = caption_vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    assert set(SHAPES) <= set(vocabulary) and set(COLOURS) <= set(vocabulary)
    words = set()
    for shape in SHAPES:
        for colour in COLOURS:
            for background in COLOURS:
                if colour != background:
                    words.update(caption_for(shape, colour, background).split())
    assert words == set(vocabulary)
    with pytest.raises(ValueError):
        caption_for("circle", "red", "red")
    with pytest.raises(ValueError):
        caption_for("hexagon", "red", "blue")


def test_write_samples_is_deterministic(tmp_path):
    first = write_samples(tmp_path / "a", n=3, seed=9, size=64)
    second = write_samples(tmp_path / "b", n=3, seed=9, size=64, fmt="png")
    assert [c for _, c in first] == [c for _, c in second]
    assert [n for n, _ in first] == ["sample_00.jpg", "sample_01.jpg", "sample_02.jpg"]
    assert _read_captions_csv(tmp_path / "a") == first
    for (name_a, _), (name_b, _) in zip(first, second, strict=True):
        with Image.open(tmp_path / "a" / name_a) as jpg, Image.open(tmp_path / "b" / name_b) as png:
            assert jpg.format == "JPEG" and png.format == "PNG"
            assert jpg.size == png.size == (64, 64)
    again = write_samples(tmp_path / "c", n=3, seed=9, size=64, fmt="png")
    for name, _ in again:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shipped_samples_match_the_generator():
    shipped = _read_captions_csv(SAMPLES_DIR)
    assert len(shipped) == 12
    rng = random.Random(SAMPLES_SEED)
    expected = [make_example(rng)[1] for _ in range(len(shipped))]
    assert [caption for _, caption in shipped] == expected
    for name, _ in shipped:
        with Image.open(SAMPLES_DIR / name) as image:
            assert image.size == (256, 256)
    total = sum(p.stat().st_size for p in SAMPLES_DIR.iterdir())
    assert total < 300_000


def test_demo_tokenizer_and_config_are_consistent():
    from transformers import AutoProcessor, GitConfig

    processor = AutoProcessor.from_pretrained(str(MODEL_DIR))
    tokenizer = processor.tokenizer
    config = GitConfig.from_pretrained(str(MODEL_DIR))
    assert config.vocab_size == len(tokenizer)
    assert config.bos_token_id == tokenizer.cls_token_id
    assert config.eos_token_id == tokenizer.sep_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    for word in caption_vocabulary():
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word
    size = config.vision_config.image_size
    assert processor.image_processor.crop_size == {"height": size, "width": size}


def test_shipped_demo_model_captions_the_samples():
    import torch
    from transformers import AutoProcessor, GitForCausalLM

    processor = AutoProcessor.from_pretrained(str(MODEL_DIR))
    model = GitForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    assert model.generation_config.max_new_tokens <= 16
    assert model.generation_config.num_beams == 1

    shipped = _read_captions_csv(SAMPLES_DIR)
    images = [Image.open(SAMPLES_DIR / name).convert("RGB") for name, _ in shipped]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ids = model.generate(pixel_values=pixel_values, max_new_tokens=12)
    predicted = [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]
    correct = sum(p == c for p, (_, c) in zip(predicted, shipped, strict=True))
    report = "\n".join(f"{c!r} -> {p!r}" for p, (_, c) in zip(predicted, shipped, strict=True))
    assert correct >= 10, f"only {correct}/12 exact captions:\n{report}"


def test_model_folder_is_small():
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total < 3_200_000
    assert (MODEL_DIR / "model.safetensors").is_file()
    assert (MODEL_DIR / "training.json").is_file()


def test_demo_model_was_built_by_the_finetune_job():
    """The shipped model carries the eval card the Ray Train fine-tuning job writes."""
    import json

    card = json.loads((MODEL_DIR / "eval.json").read_text())
    assert card["training"]["family"] == "git"
    assert card["training"]["history"][0]["step"] == 0  # the untrained model's scores
    assert card["metrics"]["wer"] < 0.05
    assert card["data"]["fingerprint"].startswith("sha256:")
    record = json.loads((MODEL_DIR / "training.json").read_text())
    assert record["command"].startswith("python -m raycaption.demo_model")
    assert SAMPLES_SEED != record["train_seed"] != record["eval_seed"]
