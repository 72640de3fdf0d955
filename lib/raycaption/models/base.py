"""The small interface every captioning model family implements.

A Captioner receives uint8 pixels already resized to the processor's geometry (the decode
stage did that once, on CPU), normalises them with the model's own image processor and
generates. Models never touch storage.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch

from raycaption.config import ModelConfig

logger = logging.getLogger(__name__)


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
        """Normalise uint8 (N, H, W, 3) pixels; geometry was already applied upstream.

        The uint8 batch goes to the device as it is (a quarter of the float bytes) and is
        rescaled and normalised there, with the image processor's own constants. A processor
        that does anything else (padding, no rescale) is called as it is instead.
        """
        norm = self._normalisation()
        if norm is None:
            out = self.processor.image_processor(
                images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt"
            ).pixel_values
            return out.to(self.device, self.dtype)
        scale, mean, std = norm
        x = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        return ((x * scale - mean) / std).to(self.dtype)

    def _normalisation(self) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        if not hasattr(self, "_norm"):
            ip = self.processor.image_processor
            simple = (
                getattr(ip, "do_rescale", False)
                and getattr(ip, "do_normalize", False)
                and not getattr(ip, "do_pad", False)
                and getattr(ip, "rescale_factor", None) is not None
                and len(getattr(ip, "image_mean", None) or ()) == 3
                and len(getattr(ip, "image_std", None) or ()) == 3
            )
            self._norm = None
            if simple:
                shape = (1, 3, 1, 1)
                mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(shape)
                std = torch.tensor(ip.image_std, dtype=torch.float32).view(shape)
                self._norm = (float(ip.rescale_factor), mean.to(self.device), std.to(self.device))
        return self._norm

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
