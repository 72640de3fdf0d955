"""Zero-shot image tags and image embeddings with CLIP (transformers CLIPModel).

Each image is scored against "a photo of {word}" for every vocabulary word; the softmax over
the vocabulary gives a probability per word, and words above the threshold (at most top-k)
become the image's zero-shot tags. The normalised image features are the image embedding.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from raycaption.errors import ConfigError

logger = logging.getLogger(__name__)
PROMPT = "a photo of {}"


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected features.
    feats = output.pooler_output if hasattr(output, "pooler_output") else output
    return torch.nn.functional.normalize(feats.float(), dim=-1)


class ClipScorer:
    """Loads CLIP once; ``score`` gives zero-shot tags and image embeddings for a batch."""

    def __init__(self, name: str, vocabulary: tuple[str, ...], trust_remote_code: bool = False):
        from transformers import AutoProcessor, CLIPModel

        try:
            self.processor = AutoProcessor.from_pretrained(
                name, trust_remote_code=trust_remote_code
            )
            self.model = CLIPModel.from_pretrained(name, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - hub, network and parse errors alike
            raise ConfigError(
                f"cannot load CLIP model {name!r}: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.words = vocabulary
        self.dim = int(self.model.config.projection_dim)
        with torch.inference_mode():
            text = self.processor(
                text=[PROMPT.format(w) for w in vocabulary], return_tensors="pt", padding=True
            ).to(self.device)
            self.text_features = _features(self.model.get_text_features(**text))
            self.scale = float(self.model.logit_scale.exp())

    @torch.inference_mode()
    def score(
        self, pixels: np.ndarray, threshold: float, top_k: int
    ) -> tuple[list[list[str]], list[list[float]], np.ndarray]:
        """Zero-shot tags, their probabilities, and (N, dim) unit image embeddings."""
        inputs = self.processor(images=list(pixels), return_tensors="pt").to(self.device)
        image = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        probs = (self.scale * image @ self.text_features.T).softmax(dim=-1).cpu().numpy()
        tags, scores = [], []
        for row in probs:
            best = [int(i) for i in np.argsort(-row)[:top_k] if row[i] >= threshold]
            tags.append([self.words[i] for i in best])
            scores.append([round(float(row[i]), 4) for i in best])
        return tags, scores, image.cpu().numpy().astype(np.float32)
