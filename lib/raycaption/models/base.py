"""The small interface every captioning model family implements.

A Captioner receives uint8 pixels already resized to the processor's geometry (the decode
stage did that once, on CPU), normalises them with the model's own image processor and
generates. Models never touch storage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from raycaption.config import ModelConfig
from raycaption.images import ResizeSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns about a model without loading its weights.

    Attributes:
        name: The reference the user gave (hub id or folder URL).
        family: ``git``, ``blip`` or ``blip-2``.
        model_type: The config's ``model_type``.
        resize_spec: Geometry of the model's image processor.
        remote: True when the folder lives on object storage and must be fetched by workers.
    """

    name: str
    family: str
    model_type: str
    resize_spec: ResizeSpec
    remote: bool


def pick_device_and_dtype(requested: str) -> tuple[torch.device, torch.dtype]:
    """CUDA when this process was given a GPU, else CPU; bf16 (or fp16) on GPU, fp32 on CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        if requested == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = getattr(torch, requested)
    else:
        device = torch.device("cpu")
        # Half precision on CPU is slow or unsupported for generate(); only honour bf16 asks.
        dtype = torch.bfloat16 if requested == "bfloat16" else torch.float32
    return device, dtype


class Captioner:
    """Base class: load once, then caption batches.

    Subclasses set ``model_class`` and may override ``caption``.
    """

    model_class: ClassVar[Any]
    accepts_prompt: ClassVar[bool] = True

    def __init__(self, local_path: str, cfg: ModelConfig):
        from transformers import AutoProcessor

        self.cfg = cfg
        self.device, self.dtype = pick_device_and_dtype(cfg.dtype)
        kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        self.processor = AutoProcessor.from_pretrained(local_path, **kwargs)
        self.model = self.model_class.from_pretrained(local_path, dtype=self.dtype, **kwargs)
        self.model.to(self.device).eval()
        self.generate_kwargs = cfg.generation_kwargs()
        logger.info("loaded %s on %s as %s", cfg.name, self.device, self.dtype)

    def pixel_values(self, pixels: np.ndarray) -> torch.Tensor:
        """Normalise uint8 (N, H, W, 3) pixels; geometry was already applied upstream."""
        out = self.processor.image_processor(
            images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt"
        ).pixel_values
        return out.to(self.device, self.dtype)

    @torch.inference_mode()
    def generate(self, **inputs: Any) -> torch.Tensor:
        return self.model.generate(**inputs, **self.generate_kwargs)

    def decode(self, ids: torch.Tensor) -> list[str]:
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def caption(self, pixels: np.ndarray, prompts: list[str] | None = None) -> list[str]:
        """One caption per image. ``prompts`` (one per image) is None for plain captioning."""
        raise NotImplementedError


def strip_prompt_ids(out: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Decoder-only models echo the prompt: drop it when the output starts with it."""
    n = input_ids.shape[1]
    if out.shape[1] >= n and torch.equal(out[:, :n].to(input_ids.device), input_ids):
        return out[:, n:]
    return out
