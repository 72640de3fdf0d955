"""Caption metrics, computed by maintained libraries rather than by hand.

* WER and CER: jiwer (word / character error rate; lower is better, 0 = perfect).
* BLEU: sacrebleu's corpus BLEU (0-100, 4-grams, its default ``13a`` tokenizer).
* ROUGE-L: Google's rouge-score (LCS F-measure, 0-1), averaged over images.
* CIDEr: the COCO caption evaluation's ``Cider`` class from pycocoevalcap (CIDEr-D,
  0-10 scale; needs no Java, which only its tokenizer, METEOR and SPICE use).

Every text is normalised the same way first (lower case, punctuation removed, single
spaces), so "A red circle." and "a red circle" are the same caption. An image may have several
reference captions: BLEU, ROUGE-L and CIDEr use them all as their papers define; WER and CER
take, per image, the reference closest to the prediction.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from importlib import metadata

logger = logging.getLogger(__name__)

METRIC_LIBRARIES = {
    "wer": "jiwer",
    "cer": "jiwer",
    "bleu": "sacrebleu",
    "rouge_l": "rouge-score",
    "cider": "pycocoevalcap",
}
_NOT_WORD = re.compile(r"[^\w\s]+")


def normalize_caption(text: str) -> str:
    """Lower case, Unicode NFKC, punctuation replaced by spaces, runs of spaces collapsed."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def library_versions() -> dict[str, str]:
    """Installed versions of the metric libraries (recorded in every eval card)."""
    versions = {}
    for lib in sorted(set(METRIC_LIBRARIES.values())):
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:  # pragma: no cover - they are dependencies
            versions[lib] = "missing"
    return versions


def compute_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Corpus metrics of ``predictions`` against ``references`` (one list per prediction).

    Args:
        predictions: One generated caption per image.
        references: For each image, one or more reference captions.

    Returns:
        ``wer``, ``cer`` (0 = perfect), ``bleu`` (0-100), ``rouge_l`` (0-1), ``cider`` (0-10)
        and ``images``. Empty input gives an empty dict.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        return {}
    hyps = [normalize_caption(p) for p in predictions]
    refs = [[normalize_caption(r) for r in rs] or [""] for rs in references]
    wer, cer = _error_rates(hyps, refs)
    return {
        "wer": wer,
        "cer": cer,
        "bleu": _bleu(hyps, refs),
        "rouge_l": _rouge_l(hyps, refs),
        "cider": _cider(hyps, refs),
        "images": float(len(hyps)),
    }


def _error_rates(hyps: list[str], refs: list[list[str]]) -> tuple[float, float]:
    """Corpus WER and CER (total edits / total reference length), closest reference each."""
    import jiwer

    words_ref, words_hyp, chars_ref, chars_hyp = [], [], [], []
    for hyp, rs in zip(hyps, refs, strict=True):
        best = min(rs, key=lambda r: _edits(r, hyp)) if len(rs) > 1 else rs[0]
        # jiwer refuses empty references; a placeholder word keeps the image counted.
        words_ref.append(best or "<empty>")
        words_hyp.append(hyp)
        chars_ref.append(best or "<empty>")
        chars_hyp.append(hyp)
    return (
        float(jiwer.wer(words_ref, words_hyp)),
        float(jiwer.cer(chars_ref, chars_hyp)),
    )


def _edits(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(reference or "<empty>", hypothesis)


def _bleu(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    n_streams = max(len(rs) for rs in refs)
    # sacrebleu takes reference *streams*; None marks an image with fewer references.
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(n_streams)]
    return float(BLEU().corpus_score(hyps, streams).score)


def _rouge_l(hyps: list[str], refs: list[list[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    # score_multi keeps the best-matching reference, as the ROUGE paper does.
    scores = [
        scorer.score_multi(rs, h)["rougeL"].fmeasure for h, rs in zip(hyps, refs, strict=True)
    ]
    return float(sum(scores) / len(scores))


def _cider(hyps: list[str], refs: list[list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    # The inputs are already normalised and space-tokenised, as its PTB tokenizer would do.
    if not any(r for rs in refs for r in rs):
        return 0.0  # no reference word at all: nothing to agree with (the library asserts)
    gts = {i: list(rs) for i, rs in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
