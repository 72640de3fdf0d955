"""Caption metrics against values worked out by hand on hand-made pairs."""

from __future__ import annotations

import math

import pytest

from raycaption.train.metrics import (
    METRIC_LIBRARIES,
    compute_metrics,
    library_versions,
    normalize_caption,
)

REF = "a red circle on a blue background"  # 7 words


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalize_caption("  A Red-circle,  on a BLUE background. ") == (
        "a red circle on a blue background"
    )
    assert compute_metrics(["A red circle on a blue background."], [[REF]])["wer"] == 0


def test_wer_is_total_edits_over_total_reference_words():
    # 1 substitution (square for circle) + 2 deletions (both "a") over 7 + 7 reference words.
    m = compute_metrics(
        ["a red square on a blue background", "green star on white background"],
        [[REF], ["a green star on a white background"]],
    )
    assert m["wer"] == pytest.approx(3 / 14)
    assert m["images"] == 2


def test_cer_counts_characters():
    # "a red circles": one inserted character over the 12 characters of "a red circle".
    assert compute_metrics(["a red circles"], [["a red circle"]])["cer"] == pytest.approx(1 / 12)


def test_wer_uses_the_closest_of_several_references():
    m = compute_metrics([REF], [["a green star on a white background", REF]])
    assert m["wer"] == 0.0
    m = compute_metrics(["a red circle on a white background"], [[REF, "a red circle"]])
    assert m["wer"] == pytest.approx(
        1 / 7
    )  # vs REF: 1 substitution; vs the short one: 4 insertions


def test_bleu_from_modified_ngram_precisions():
    # Precisions 5/6, 3/5, 2/4, 1/3 and no brevity penalty: (5/6*3/5*1/2*1/3) ** (1/4).
    m = compute_metrics(["a b c d x f"], [["a b c d e f"]])
    assert m["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=0.01)
    assert m["bleu"] == pytest.approx(53.73, abs=0.01)


def test_bleu_brevity_penalty():
    # Every n-gram of the 4-word hypothesis matches, but it is shorter than the 6-word
    # reference: BP = exp(1 - 6/4).
    m = compute_metrics(["a b c d"], [["a b c d e f"]])
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 4), abs=0.01)


def test_rouge_l_is_the_mean_lcs_f_measure():
    # LCS 6 of 7/7 words -> F = 6/7; "red circle": P = 1, R = 2/7 -> F = 2PR/(P+R) = 4/9.
    m = compute_metrics(
        ["a red circle on a green background", "red circle"],
        [[REF], [REF]],
    )
    assert m["rouge_l"] == pytest.approx((6 / 7 + 4 / 9) / 2)
    # Several references: the best one counts.
    assert compute_metrics(["red circle"], [[REF, "red circle"]])["rouge_l"] == pytest.approx(1.0)


def test_cider_d_on_two_images():
    # Two images, n-grams never shared between them: every idf is log(2), so the cosine
    # similarity of the clipped tf-idf vectors is plain n-gram overlap. "a b c x" vs "a b c d":
    # 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0, same length (no penalty):
    # 10 * mean = 4.7917; the exact second caption scores 10; CIDEr is the mean.
    m = compute_metrics(["a b c x", "e f g h"], [["a b c d"], ["e f g h"]])
    image_1 = 10 * (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4
    assert m["cider"] == pytest.approx((image_1 + 10) / 2)
    assert m["cider"] == pytest.approx(7.3958, abs=1e-4)


def test_perfect_and_hopeless_captions():
    refs = [[REF], ["a green star on a white background"], ["an orange cross on a red background"]]
    perfect = compute_metrics([r[0] for r in refs], refs)
    assert perfect["wer"] == perfect["cer"] == 0
    assert perfect["bleu"] == pytest.approx(100)
    assert perfect["rouge_l"] == pytest.approx(1)
    assert perfect["cider"] == pytest.approx(10)
    hopeless = compute_metrics(["zz"] * 3, refs)
    assert hopeless["wer"] == 1 and hopeless["bleu"] == 0 and hopeless["cider"] == 0


def test_edge_cases():
    assert compute_metrics([], []) == {}
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
    m = compute_metrics(["", "..."], [["a red"], [""]])  # empty texts never crash
    assert m["wer"] == pytest.approx(1.0)


def test_library_versions_name_every_metric_library():
    versions = library_versions()
    assert set(versions) == set(METRIC_LIBRARIES.values())
    assert all(v != "missing" for v in versions.values())
