"""BLIP-2 (Salesforce/blip2-opt-2.7b, blip2-flan-t5-*): frozen LLM behind a Q-Former.

Prompts may differ per row (templates over manifest columns); they are left-padded into one
batch, and the echoed prompt is removed from the output.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Blip2ForConditionalGeneration

from raycaption.models.base import Captioner, strip_prompt_ids


class Blip2Captioner(Captioner):
    """BLIP-2 captioning or prompted answering ("Question: what is the {title}? Answer:")."""

    model_class = Blip2ForConditionalGeneration

    def __init__(self, local_path, cfg):
        super().__init__(local_path, cfg)
        # Decoder-only LMs must see padding on the left so generation continues the prompt.
        self.processor.tokenizer.padding_side = "left"

    def caption(self, pixels: np.ndarray, prompts: list[str] | None = None) -> list[str]:
        enc = self.text_inputs(prompts if prompts else [""] * len(pixels))
        enc = {k: v.to(self.device) for k, v in enc.items()}
        out = self.generate(pixel_values=self.pixel_values(pixels), **enc)
        return self.decode(strip_prompt_ids(out, enc["input_ids"]))

    def text_inputs(self, text: list[str]) -> dict:
        """input_ids and attention_mask exactly as ``Blip2Processor(images=..., text=...)``
        builds them (the query's image tokens first, then the left-padded prompt), without
        running its image processor: pixels are normalised on the device instead."""
        tok = self.processor.tokenizer
        enc = tok(text, padding=True)
        n = self.processor.num_query_tokens
        if n:
            image = tok(
                self.processor.image_token.content * n,
                add_special_tokens=False,
                padding=False,
                truncation=False,
            )
            enc = {k: [image[k] + row for row in enc[k]] for k in ("input_ids", "attention_mask")}
        return {k: torch.tensor(enc[k]) for k in ("input_ids", "attention_mask")}
