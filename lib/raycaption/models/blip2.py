"""BLIP-2 (Salesforce/blip2-opt-2.7b, blip2-flan-t5-*): frozen LLM behind a Q-Former.

Prompts may differ per row (templates over manifest columns); they are left-padded into one
batch, and the echoed prompt is removed from the output.
"""

from __future__ import annotations

import numpy as np
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
        images = list(pixels)
        text = prompts if prompts else [""] * len(images)
        enc = self.processor(
            images=images,
            text=text,
            return_tensors="pt",
            padding=True,
            do_resize=False,
            do_center_crop=False,
        )
        enc = enc.to(self.device)
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        out = self.generate(**enc)
        return self.decode(strip_prompt_ids(out, enc["input_ids"]))
