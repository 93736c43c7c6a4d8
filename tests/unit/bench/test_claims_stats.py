"""bench/claims_stats.py: the study's statistics against values computed by hand or by their
definitions, and the AdvGLUE matching rule on sentences built to sit either side of it."""

from __future__ import annotations

import numpy as np
import pytest
from claims_stats import bootstrap_interval, holm, majority, match_pairs, mcnemar, paired_comparison
from scipy import stats


def test_holm_adjusts_step_down_and_keeps_order():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})


def test_paired_comparison_is_the_t_test_over_pretraining_seeds():
    differences = np.array([[0.01, 0.03], [0.02, 0.02], [0.05, 0.03]])
    result = paired_comparison(differences)
    per_seed = differences.mean(axis=1)
    assert result["estimate"] == pytest.approx(per_seed.mean())
    assert result["p"] == pytest.approx(stats.ttest_1samp(per_seed, 0.0).pvalue)
    assert result["low"] <= result["estimate"] <= result["high"]


def test_bootstrap_interval_is_fixed_and_covers_the_resampled_means():
    differences = np.arange(15, dtype=float).reshape(3, 5) / 100
    low, high = bootstrap_interval(differences)
    assert (low, high) == bootstrap_interval(differences)  # a fixed seed: the committed figures repeat
    assert differences.min() < low < differences.mean() < high < differences.max()
    assert bootstrap_interval(np.full((3, 5), 0.02)) == pytest.approx((0.02, 0.02))


def test_mcnemar_counts_discordant_pairs_and_is_exact():
    original = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    perturbed = np.array([0, 0, 0, 0, 0, 1, 1, 0], dtype=bool)
    result = mcnemar(original, perturbed)
    assert (result["original_only"], result["perturbed_only"]) == (5, 1)
    assert result["p"] == pytest.approx(2 * (1 + 6) / 2**6)  # two-sided: P(X <= 1) + P(X >= 5), X ~ B(6, 1/2)
    assert mcnemar(original, original)["p"] == 1.0


def test_majority_counts_a_tie_as_wrong():
    runs = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 0]], dtype=bool)
    assert majority(runs).tolist() == [True, False, False]


def test_matching_needs_jaccard_half_and_the_same_label():
    dev = [("a fine and moving film", 1), ("a dull , lifeless mess", 0), ("the plot is thin", 0)]
    adversarial = [
        ("a fine and movng film", 1),  # 4 of 6 words shared: matched to dev 0
        ("a dull , lifeless mess", 1),  # the same words, another label: not matched
        ("nothing in common here", 0),  # no source
        ("THE plot is thin !", 0),  # case and punctuation do not count: matched to dev 2
    ]
    assert match_pairs(adversarial, dev) == [(0, 0), (3, 2)]
