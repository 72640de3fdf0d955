"""Tags with the real all-MiniLM-L6-v2 weights: extraction, canonicalisation against a
vocabulary (from a file and from the S3 endpoint), threshold, new keywords, de-duplication."""

from __future__ import annotations

import pytest

from raycaption.config import DEFAULT_TEXT_EMBEDDING_MODEL, StorageConfig, TagConfig
from raycaption.errors import ConfigError
from raycaption.models.embedder import TextEmbedder
from raycaption.tags import Tagger, Vocabulary, load_vocabulary

VOCAB = ("wood", "metal", "table", "chair", "lamp", "glass", "red", "black")


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder(DEFAULT_TEXT_EMBEDDING_MODEL)


def make(embedder, **kw) -> Tagger:
    return Tagger(embedder, Vocabulary(VOCAB, "v1"), TagConfig(**kw))


def test_synonyms_map_to_vocabulary_words(embedder):
    tagger = make(embedder)
    for word, expected in {"wooden": "wood", "metallic": "metal", "tables": "table"}.items():
        tags, _ = tagger._canonical([(word, 0.5)])
        assert tags == [expected], (word, tags)


def test_unrelated_words_stay_new_or_are_dropped(embedder):
    tags, _ = make(embedder)._canonical([("giraffe", 0.5)])
    assert tags == ["giraffe"]
    tags, _ = make(embedder, keep_new=False)._canonical([("giraffe", 0.5), ("wooden", 0.4)])
    assert tags == ["wood"]


def test_threshold_is_respected(embedder):
    tags, _ = make(embedder, threshold=0.99)._canonical([("wooden", 0.5)])
    assert tags == ["wooden"]
    tags, _ = make(embedder, threshold=0.3)._canonical([("wooden", 0.5)])
    assert tags == ["wood"]


def test_near_duplicates_collapse_to_the_higher_score(embedder):
    tags, scores = make(embedder)._canonical([("wood", 0.3), ("wooden", 0.6), ("chair", 0.5)])
    assert tags == ["wood", "chair"]
    assert scores == [0.6, 0.5]


def test_extraction_finds_the_content_words(embedder):
    tagger = make(embedder)
    (tags, scores), (only_stop, _) = tagger.tag(["a black metal side table", "it is the one"])
    assert {"table", "black", "metal"} <= set(tags)
    assert len(scores) == len(tags) and all(0 < s <= 1 for s in scores)
    assert only_stop == []
    assert tagger.tag(["of the and"]) == [([], [])]


def test_vocabulary_from_s3_and_versioning(s3, tmp_path):
    fs = s3.fs()
    key = f"{s3.bucket}/vocab/furniture.txt"
    fs.pipe(key, b"# furniture\nWood\nmetal\n\nwood\ntable\n")
    vocab = load_vocabulary(f"s3://{key}", StorageConfig(endpoint_url=s3.url))
    assert vocab.words == ("wood", "metal", "table")
    local = tmp_path / "v.txt"
    local.write_text("table\nmetal\nwood\n")
    assert load_vocabulary(str(local), StorageConfig()).version == vocab.version
    local.write_text("table\nmetal\nwood\nglass\n")
    assert load_vocabulary(str(local), StorageConfig()).version != vocab.version
    assert load_vocabulary(None, StorageConfig()).version == "none"
    with pytest.raises(ConfigError, match="cannot read tag vocabulary"):
        load_vocabulary(str(tmp_path / "missing.txt"), StorageConfig())
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_vocabulary(str(tmp_path / "empty.txt"), StorageConfig())
