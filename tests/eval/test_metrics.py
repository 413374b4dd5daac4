"""Metrics: AP/mAP agree with sklearn, VOC07 11-point AP with hand-computed values, threshold rates with hand counts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from vgclip.eval.metrics import exact_match, ranking_metrics, rates, sweep, threshold_metrics, voc07_ap


def _random_problem(seed: int = 0, n: int = 60, c: int = 4):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < 0.3).astype(np.int8)
    scores = rng.random((n, c)) + 0.5 * labels  # informative but imperfect
    valid = rng.random((n, c)) > 0.1
    return scores, labels, valid


def test_ap_and_map_agree_with_sklearn_on_valid_entries() -> None:
    scores, labels, valid = _random_problem()
    classes = ["a", "b", "c", "d"]
    m = ranking_metrics(scores, labels, valid, classes)
    expected = []
    for k, name in enumerate(classes):
        keep = valid[:, k]
        ap = average_precision_score(labels[keep, k], scores[keep, k])
        assert m["AP"][name] == pytest.approx(ap, abs=1e-12)
        assert m["roc_auc"][name] == pytest.approx(roc_auc_score(labels[keep, k], scores[keep, k]), abs=1e-12)
        assert m["chance"][name] == pytest.approx(labels[keep, k].mean())
        assert m["counts"][name]["ignored"] == int((~keep).sum())
        expected.append(ap)
    assert m["mAP"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert m["chance_mean"] < m["mAP"]  # scores are informative


def test_class_without_positives_is_undefined_not_zero() -> None:
    scores, labels, valid = _random_problem(1)
    labels[:, 2] = 0
    m = ranking_metrics(scores, labels, valid, ["a", "b", "c", "d"])
    assert m["AP"]["c"] is None and m["chance"]["c"] is None and m["roc_auc"]["c"] is None
    assert m["undefined_classes"] == ["c"]
    assert m["mAP"] == pytest.approx(np.mean([m["AP"][k] for k in "abd"]))


def test_voc07_11_point_ap_hand_examples() -> None:
    # Ranking P N P N N: precision/recall at the cut-offs (1, .5) (.5, .5) (.667, 1) (.5, 1) (.4, 1).
    # Recall levels 0..0.5 -> max precision 1; 0.6..1.0 -> 2/3. AP = (6 * 1 + 5 * 2/3) / 11.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert voc07_ap(scores, np.array([1, 0, 1, 0, 0])) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # Ranking N P N P: cut-offs (0, 0) (.5, .5) (.333, .5) (.5, 1). Levels 0..0.5 -> .5, 0.6..1 -> .5.
    # (No artificial precision-1 point at recall 0, unlike sklearn's curve.)
    assert voc07_ap(np.array([4.0, 3, 2, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    # Perfect ranking: every level reaches precision 1.
    assert voc07_ap(np.array([3.0, 2, 1]), np.array([1, 1, 0])) == pytest.approx(1.0)


def test_threshold_metrics_hand_counts() -> None:
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.3, 0.8], [0.1, 0.4]])
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    valid = np.ones_like(labels, dtype=bool)
    valid[3, 1] = False  # ignored entry: neither counted nor compared for exact match
    m = threshold_metrics(scores, labels, valid, ["x", "y"], 0.5)
    x, y = m["per_class"]["x"], m["per_class"]["y"]
    # x: predicted [1,1,0,0] vs [1,0,1,0] -> tp 1, fp 1, fn 1, tn 1
    assert (x["tp"], x["fp"], x["fn"], x["tn"]) == (1, 1, 1, 1)
    # y (3 valid rows): predicted [0,1,1] vs [0,1,1] -> tp 2, tn 1
    assert (y["tp"], y["fp"], y["fn"], y["tn"]) == (2, 0, 0, 1)
    assert x["accuracy"] == 0.5 and y["accuracy"] == 1.0 and y["f1"] == 1.0
    assert m["macro"]["accuracy"] == pytest.approx(0.75)
    assert m["micro"]["accuracy"] == pytest.approx(5 / 7)
    assert m["micro"]["sensitivity"] == pytest.approx(3 / 4)
    assert m["micro"]["specificity"] == pytest.approx(2 / 3)
    # exact match: rows 0 and 3 right (row 3 compares x only), rows 1 and 2 wrong on x
    assert m["exact_match"] == pytest.approx(0.5)
    per_class = threshold_metrics(scores, labels, valid, ["x", "y"], np.array([0.25, 0.5]))
    assert per_class["per_class"]["x"]["sensitivity"] == 1.0 and per_class["threshold"] == {"x": 0.25, "y": 0.5}


def test_rates_undefined_are_nan_and_reported_as_none() -> None:
    r = rates(np.array([0]), np.array([0]), np.array([5]), np.array([0]))
    assert np.isnan(r["sensitivity"][0]) and r["specificity"][0] == 1.0
    m = threshold_metrics(np.zeros((3, 1)), np.zeros((3, 1), dtype=int), np.ones((3, 1), bool), ["z"], 0.5)
    assert m["per_class"]["z"]["sensitivity"] is None and m["per_class"]["z"]["accuracy"] == 1.0


def test_sweep_matches_threshold_metrics() -> None:
    scores, labels, valid = _random_problem(2)
    grid = [0.2, 0.6, 1.0]
    curve = sweep(scores, labels, valid, grid)
    for i, t in enumerate(grid):
        m = threshold_metrics(scores, labels, valid, list("abcd"), t)
        assert curve["micro_accuracy"][i] == pytest.approx(m["micro"]["accuracy"])
        assert curve["macro_specificity"][i] == pytest.approx(m["macro"]["specificity"])
    assert exact_match(scores, labels, valid, np.full(4, -1.0)) == pytest.approx(
        ((labels == 1) | ~valid).all(axis=1).mean()
    )
