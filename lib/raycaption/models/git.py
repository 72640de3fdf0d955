"""GIT (microsoft/git-base, git-base-coco, git-large-*): image-conditioned causal LM."""

from __future__ import annotations

import numpy as np
from transformers import GitForCausalLM

from raycaption.models.base import Captioner


class GitCaptioner(Captioner):
    """Plain image captioning with GIT. Prompts are not supported (use BLIP or BLIP-2)."""

    model_class = GitForCausalLM
    accepts_prompt = False

    def caption(self, pixels: np.ndarray, prompts: list[str] | None = None) -> list[str]:
        out = self.generate(pixel_values=self.pixel_values(pixels))
        return self.decode(out)
