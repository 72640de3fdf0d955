"""BLIP (Salesforce/blip-image-captioning-base/-large): unconditional or prefix-conditioned."""

from __future__ import annotations

import numpy as np
from transformers import BlipForConditionalGeneration

from raycaption.models.base import Captioner


class BlipCaptioner(Captioner):
    """BLIP captioning. A prompt is a caption prefix ("a photography of"); the stored caption
    is the continuation only.

    BLIP's text decoder pads on the right, so rows are grouped by prompt and each group is
    generated separately rather than padding prompts into the middle of sequences.
    """

    model_class = BlipForConditionalGeneration

    def caption(self, pixels: np.ndarray, prompts: list[str] | None = None) -> list[str]:
        if not prompts:
            return self.decode(self.generate(pixel_values=self.pixel_values(pixels)))
        captions: list[str] = [""] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        tok = self.processor.tokenizer
        for prompt, idx in groups.items():
            enc = tok([prompt] * len(idx), return_tensors="pt", return_token_type_ids=False)
            enc = enc.to(self.device)
            out = self.generate(pixel_values=self.pixel_values(pixels[idx]), **enc)
            prefix = " ".join(tok.decode(enc["input_ids"][0], skip_special_tokens=True).split())
            for i, text in zip(idx, self.decode(out), strict=True):
                captions[i] = text[len(prefix) :].strip() if text.startswith(prefix) else text
        return captions
