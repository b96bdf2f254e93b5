"""binary_metrics, ECE and reliability bins against values worked out by hand."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from roseprior.metrics import binary_metrics, expected_calibration_error, reliability_bins


def _scores_for(tn: int, fp: int, fn: int, tp: int) -> tuple[list[int], list[float]]:
    """Labels and P-scores that produce a given confusion matrix at threshold 0.5."""
    y = [0] * (tn + fp) + [1] * (fn + tp)
    p = [0.2] * tn + [0.7] * fp + [0.3] * fn + [0.9] * tp
    return y, p


def test_fixed_confusion_matrix():
    y, p = _scores_for(tn=5, fp=2, fn=1, tp=4)
    m = binary_metrics(y, p)
    assert m["confusion_matrix"] == [[5, 2], [1, 4]] and m["n"] == 12
    expected = {
        "accuracy": 9 / 12,
        "specificity": 5 / 7,
        "sensitivity": 4 / 5,
        "ppv": 4 / 6,
        "npv": 5 / 6,
        "f1": 2 * 4 / (2 * 4 + 2 + 1),
        "balanced_accuracy": (4 / 5 + 5 / 7) / 2,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    # AUROC by hand: P scores {0.3, 0.9x4} vs N scores {0.2x5, 0.7x2}; count P > N pairs over 5*7.
    # 0.9 beats all 7 N (4*7 = 28); 0.3 beats the five 0.2s (5). (28 + 5) / 35.
    assert m["auroc"] == pytest.approx(33 / 35)
    json.dumps(m)  # plain Python numbers, ready for metrics.json


def test_ece_by_hand():
    # Confidences of the predicted class: 0.9 (right), 0.9 (wrong), 0.75 (right, predicted N), 0.62 (right).
    y = [1, 0, 0, 1]
    p = [0.9, 0.9, 0.25, 0.62]
    # Bins of width 1/15: {0.9, 0.9} acc 0.5; {0.75} acc 1; {0.62} acc 1.
    expected = 0.5 * abs(0.5 - 0.9) + 0.25 * abs(1 - 0.75) + 0.25 * abs(1 - 0.62)
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert binary_metrics(y, p)["ece"] == pytest.approx(expected)
    # Class-probability form (n, 2) gives the same.
    probs = np.stack([1 - np.array(p), np.array(p)], axis=1)
    assert expected_calibration_error(y, probs) == pytest.approx(expected)


def test_reliability_bins():
    y = [1, 0, 0, 1]
    p = [0.9, 0.9, 0.25, 0.62]
    bins = reliability_bins(y, p, n_bins=15)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    assert bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    full = {i: b for i, b in enumerate(bins) if b["count"]}
    assert sorted(full) == [9, 11, 13]  # 0.62 in (0.6, 0.667], 0.75 in (0.733, 0.8], 0.9 in (0.867, 0.933]
    assert (
        full[13]["count"] == 2
        and full[13]["accuracy"] == 0.5
        and full[13]["confidence"] == pytest.approx(0.9)
    )
    assert full[11]["confidence"] == pytest.approx(0.75) and full[11]["accuracy"] == 1.0
    assert all(b["confidence"] == b["accuracy"] == 0.0 for i, b in enumerate(bins) if i not in full)
    assert len(reliability_bins(y, p, n_bins=5)) == 5
    # A perfectly calibrated, perfectly confident model has ECE 0.
    assert expected_calibration_error([0, 1, 1], [0.0, 1.0, 1.0]) == 0.0


def test_zero_divisions_are_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])  # no positives, none predicted
        empty = binary_metrics([], [])
    assert m["sensitivity"] == m["ppv"] == m["f1"] == 0.0
    assert m["specificity"] == m["npv"] == m["accuracy"] == 1.0
    assert m["auroc"] is None  # one class only
    assert empty["n"] == 0 and empty["accuracy"] == 0.0 and empty["confusion_matrix"] == [[0, 0], [0, 0]]
    assert all(not (isinstance(v, float) and np.isnan(v)) for v in {**m, **empty}.values())


def test_threshold_moves_predictions():
    y, p = [0, 1, 1], [0.4, 0.45, 0.8]
    assert binary_metrics(y, p)["confusion_matrix"] == [[1, 0], [1, 1]]
    assert binary_metrics(y, p, threshold=0.42)["confusion_matrix"] == [[1, 0], [0, 2]]
    assert binary_metrics([1], [0.5])["sensitivity"] == 1.0  # a score equal to the threshold is P


def test_bad_inputs():
    with pytest.raises(ValueError, match="0 \\(N\\) and 1 \\(P\\)"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="2 values but p_pos has 3"):
        binary_metrics([0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------------------------
# Uncertainty: bootstrap intervals
# ---------------------------------------------------------------------------------------------


def _scored(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1).round(2)  # rounded: many ties


def test_weighted_auroc_equals_sklearn_on_the_resampled_set():
    from sklearn.metrics import roc_auc_score

    from roseprior.metrics import weighted_auroc

    y, p = _scored(300, 0)
    counts = np.random.default_rng(1).multinomial(300, np.full(300, 1 / 300), size=3)
    got = weighted_auroc(y, p, counts.astype(float))
    for row, value in zip(counts, got, strict=True):
        idx = np.repeat(np.arange(300), row)
        assert value == pytest.approx(roc_auc_score(y[idx], p[idx]), abs=1e-12)


def test_intervals_contain_the_estimate_narrow_with_n_and_are_seeded():
    from roseprior.metrics import binary_metrics, bootstrap_intervals

    widths = {}
    for n in (60, 600, 6000):
        y, p = _scored(n, 2)
        point = binary_metrics(y, p)
        ci = bootstrap_intervals(y, p, n_resamples=1000, seed=0)
        for key in ("balanced_accuracy", "auroc", "sensitivity", "specificity"):
            low, high = ci[key]
            assert low <= point[key] <= high, (n, key, ci[key], point[key])
        widths[n] = ci["balanced_accuracy"][1] - ci["balanced_accuracy"][0]
        assert bootstrap_intervals(y, p, seed=0) == ci  # seeded: the same numbers every run
    assert widths[60] > widths[600] > widths[6000]
    assert widths[6000] < 0.05 < widths[60]


def test_grouped_intervals_resample_whole_groups_and_are_wider_for_correlated_images():
    from roseprior.metrics import bootstrap_intervals

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 15)  # 40 slides of 15 images
    y = np.repeat(rng.integers(0, 2, 40), 15)  # one label per slide
    slide_effect = np.repeat(rng.normal(0, 0.25, 40), 15)  # images of a slide look alike
    p = np.clip(0.5 + 0.2 * (2 * y - 1) + slide_effect + rng.normal(0, 0.05, 600), 0, 1)
    plain = bootstrap_intervals(y, p)
    grouped = bootstrap_intervals(y, p, groups=groups)
    width = lambda ci: ci["balanced_accuracy"][1] - ci["balanced_accuracy"][0]  # noqa: E731
    assert width(grouped) > 1.5 * width(plain)


def test_a_paired_difference_is_exact_and_narrower_than_the_two_intervals_side_by_side():
    """A shift that flips a few of 400 calls: its difference from clean is the difference of the two balanced
    accuracies, and its paired interval (the same resamples read both ways) is narrower than either of the two
    intervals beside each other; calls that did not move differ by exactly nothing."""
    from roseprior.metrics import bootstrap_intervals, paired_difference

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    clean = np.where(rng.random(400) < 0.8, y, 1 - y)
    shifted = clean.copy()
    flipped = rng.choice(np.flatnonzero(clean == y), 20, replace=False)  # 20 right calls made wrong
    shifted[flipped] = 1 - shifted[flipped]
    drop = paired_difference(y, shifted, clean)
    expected = binary_metrics(y, shifted)["balanced_accuracy"] - binary_metrics(y, clean)["balanced_accuracy"]
    assert drop["difference"] == pytest.approx(expected) and drop["difference"] < 0
    low, high = drop["ci95"]
    assert low <= drop["difference"] <= high < 0  # every resample sees the loss
    side_by_side = [bootstrap_intervals(y, c)["balanced_accuracy"] for c in (clean, shifted)]
    assert high - low < 0.75 * min(hi - lo for lo, hi in side_by_side)  # 0.042 against 0.079 wide
    assert paired_difference(y, clean, clean) == {"difference": 0.0, "ci95": [0.0, 0.0]}
    grouped = paired_difference(y, shifted, clean, groups=np.arange(400) // 10)  # fields of 10 cells
    assert grouped["difference"] == pytest.approx(drop["difference"]) and grouped["ci95"] != drop["ci95"]


def test_small_classes_are_flagged():
    from roseprior.metrics import small_class_warnings

    assert small_class_warnings("the test split", [0] * 40 + [1] * 12, ["N", "P"]) == [
        "the test split has 12 images of class P (fewer than 30): its numbers are unstable; read them with their "
        "intervals"]
    assert small_class_warnings("the val split", [0] * 30 + [1] * 30, ["N", "P"]) == []
