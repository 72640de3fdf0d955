"""What differs between the model families that can be fine-tuned (GIT and BLIP).

Both are trained the same way: the caption is the language-model target given the image.
They differ in the model class and in the first token of the caption: GIT starts from the
tokenizer's ``[CLS]`` (its bos token), BLIP's decoder starts from its own bos token
(``[DEC]`` in the released models), which is what ``generate`` feeds it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raycaption.errors import ConfigError


@dataclass(frozen=True)
class TrainFamily:
    """Training-time facts of one captioning family.

    Attributes:
        name: ``git`` or ``blip``.
        find_unused_parameters: DDP must look for parameters the loss does not reach.
    """

    name: str
    find_unused_parameters: bool = False

    def model_class(self) -> Any:
        """The transformers class to load and train."""
        if self.name == "git":
            from transformers import GitForCausalLM

            return GitForCausalLM
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    def text_limit(self, model: Any, requested: int) -> int:
        """Caption tokens that fit the model's text position embeddings."""
        config = model.config
        text = getattr(config, "text_config", None) if self.name == "blip" else config
        limit = getattr(text, "max_position_embeddings", None) or requested
        return max(2, min(requested, int(limit)))

    def text_inputs(
        self, tokenizer: Any, model: Any, captions: list[str], max_tokens: int
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and LM labels (padding masked out with -100)."""
        enc = tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        input_ids = enc["input_ids"]
        if self.name == "blip":
            input_ids = input_ids.clone()
            input_ids[:, 0] = model.config.text_config.bos_token_id
        labels = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": input_ids, "attention_mask": enc["attention_mask"], "labels": labels}


def family_for(name: str) -> TrainFamily:
    """The TrainFamily of a model family name (as ``raycaption.models`` reports it)."""
    if name == "git":
        return TrainFamily("git")
    if name == "blip":
        return TrainFamily("blip")
    raise ConfigError(f"fine-tuning supports GIT and BLIP models, not {name!r}")


def pixel_values(processor: Any, pixels: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Normalise uint8 pixels already in the processor's geometry (as the caption job does)."""
    return processor.image_processor(
        images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt"
    ).pixel_values


def decode_captions(processor: Any, ids: torch.Tensor) -> list[str]:
    """Generated ids -> captions, spaces normalised like the caption job's output."""
    return [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]
