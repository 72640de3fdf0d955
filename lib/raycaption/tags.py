"""Keyword tags: extracted with KeyBERT, canonicalised against a controlled vocabulary.

Each keyword is embedded with the same sentence-transformers model as the captions and
replaced by the most similar vocabulary word when the cosine similarity reaches the
threshold ("wooden" -> "wood"); keywords with no close match are kept as new (or dropped).
Near-duplicate tags of one image collapse to the higher-scoring one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from raycaption import storage
from raycaption.config import StorageConfig, TagConfig
from raycaption.errors import ConfigError
from raycaption.models.embedder import TextEmbedder

logger = logging.getLogger(__name__)

# Two tags of one image this similar are the same tag said twice ("table" / "tables").
DUPLICATE_SIMILARITY = 0.85


@dataclass(frozen=True)
class Vocabulary:
    """The controlled vocabulary and the version recorded with every row."""

    words: tuple[str, ...]
    version: str


def load_vocabulary(uri: str | None, storage_cfg: StorageConfig) -> Vocabulary:
    """One keyword a line (blank lines and ``#`` comments ignored), local or object storage."""
    if not uri:
        return Vocabulary((), "none")
    try:
        fs, path = storage.filesystem(uri, storage_cfg)
        with fs.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except Exception as exc:  # noqa: BLE001 - any backend failure means "cannot read"
        raise ConfigError(f"cannot read tag vocabulary {storage.redact(uri)}: {exc}") from None
    words = []
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word and word not in words:
            words.append(word)
    if not words:
        raise ConfigError(f"tag vocabulary {storage.redact(uri)} is empty")
    digest = hashlib.sha256("\n".join(sorted(words)).encode()).hexdigest()[:12]
    return Vocabulary(tuple(words), f"sha256:{digest}")


class Tagger:
    """Extracts, canonicalises and de-duplicates tags for batches of texts."""

    def __init__(self, embedder: TextEmbedder, vocabulary: Vocabulary, cfg: TagConfig):
        from keybert import KeyBERT

        self.embedder = embedder
        self.cfg = cfg
        self.vocabulary = vocabulary
        self.keybert = KeyBERT(model=embedder.model)
        self.vocab_vectors = embedder.embed(list(vocabulary.words)) if vocabulary.words else None

    def tag(self, texts: list[str]) -> list[tuple[list[str], list[float]]]:
        """(tags, scores) per text; scores are KeyBERT relevance to the text, same order."""
        return [self._canonical(keywords) for keywords in self._extract(texts)]

    def _extract(self, texts: list[str]) -> list[list[tuple[str, float]]]:
        if not texts:
            return []
        kwargs = {
            "keyphrase_ngram_range": (1, 1),
            "stop_words": "english",
            "top_n": self.cfg.max_tags,
        }
        try:
            found = self.keybert.extract_keywords(texts, **kwargs)
        except ValueError:
            # Every text was stop words only ("empty vocabulary"): no keywords anywhere.
            return [[] for _ in texts]
        # KeyBERT returns a flat list for a single document.
        return [found] if len(texts) == 1 else found

    def _canonical(self, keywords: list[tuple[str, float]]) -> tuple[list[str], list[float]]:
        if not keywords:
            return [], []
        words = [w.lower() for w, _ in keywords]
        scores = [float(s) for _, s in keywords]
        vectors = self.embedder.embed(words)
        names = list(words)
        if self.vocab_vectors is not None:
            sims = vectors @ self.vocab_vectors.T
            best = sims.argmax(axis=1)
            for i, j in enumerate(best):
                if sims[i, j] >= self.cfg.threshold:
                    names[i] = self.vocabulary.words[j]
                    vectors[i] = self.vocab_vectors[j]
                elif not self.cfg.keep_new:
                    names[i] = ""
        kept: list[int] = []
        for i in np.argsort(-np.asarray(scores), kind="stable"):
            if not names[i] or any(
                names[i] == names[k] or float(vectors[i] @ vectors[k]) >= DUPLICATE_SIMILARITY
                for k in kept
            ):
                continue
            kept.append(int(i))
        return [names[i] for i in kept], [round(scores[i], 4) for i in kept]
