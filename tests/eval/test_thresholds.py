"""Threshold tuning: exact counts at candidates, objectives against brute force, targets met, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgclip.errors import VgclipError
from vgclip.eval.metrics import rates
from vgclip.eval.thresholds import (
    Objective,
    candidate_curve,
    choose,
    load_thresholds,
    save_thresholds,
    threshold_vector,
    tune_thresholds,
)


def _brute(scores: np.ndarray, labels: np.ndarray, t: float) -> tuple[int, int, int, int]:
    pred, pos = scores >= t, labels.astype(bool)
    return int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & ~pos).sum()), int((~pred & pos).sum())


problems = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(problems)
def test_candidate_counts_match_brute_force(problem: tuple[list[float], list[int]]) -> None:
    scores, labels = np.array(problem[0]), np.array(problem[1])
    curve = candidate_curve(scores, labels)
    for k, t in enumerate(curve["threshold"]):
        assert (curve["tp"][k], curve["fp"][k], curve["tn"][k], curve["fn"][k]) == _brute(scores, labels, t)
    # Every achievable split of the scores is a candidate: none positive, ..., all positive.
    assert curve["tp"][0] + curve["fp"][0] == 0 and curve["tp"][-1] + curve["fp"][-1] == len(scores)


def _all_cuts(scores: np.ndarray) -> list[float]:
    u = np.unique(scores)
    return [float(u.max()) + 1.0, *map(float, u)]


@pytest.mark.parametrize("objective", ["accuracy", "youden", "f1"])
def test_chosen_threshold_is_optimal(objective: str) -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = rng.normal(size=200) + labels
    t, chosen = choose(candidate_curve(scores, labels), Objective.parse(objective))
    key = {"youden": "balanced_accuracy"}.get(objective, objective)
    best = max(np.nan_to_num(rates(*_brute(scores, labels, c))[key]) for c in _all_cuts(scores))
    assert chosen[key] == pytest.approx(best)
    assert rates(*_brute(scores, labels, t))[key] == pytest.approx(best)  # the value itself achieves it


@pytest.mark.parametrize(("name", "other"), [("sensitivity", "specificity"), ("specificity", "sensitivity")])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_target_is_met_with_best_other_rate(name: str, other: str, target: float) -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(300) < 0.4).astype(int)
    scores = rng.normal(size=300) + 1.5 * labels
    t, _ = choose(candidate_curve(scores, labels), Objective(name, target))
    achieved = rates(*_brute(scores, labels, t))
    assert achieved[name] >= target
    feasible = [rates(*_brute(scores, labels, c)) for c in _all_cuts(scores)]
    best_other = max(r[other] for r in feasible if r[name] >= target)
    assert achieved[other] == pytest.approx(best_other)


def test_tune_per_class_and_global_with_fallback() -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random((80, 3)) < 0.4).astype(int)
    labels[:, 2] = 0  # no positives: cannot be tuned, falls back to the global threshold
    scores = rng.normal(size=(80, 3)) + labels
    valid = np.ones_like(labels, dtype=bool)
    info = tune_thresholds(scores, labels, valid, ["a", "b", "c"], "per_class", "sensitivity:0.9")
    assert info["fallback_classes"] == ["c"] and info["per_class"]["c"] == info["global"]
    for k, name in enumerate("ab"):
        assert rates(*_brute(scores[:, k], labels[:, k], info["per_class"][name]))["sensitivity"] >= 0.9
    pooled = rates(*_brute(scores.ravel(), labels.ravel(), info["global"]))
    assert pooled["sensitivity"] >= 0.9
    glob = tune_thresholds(scores, labels, valid, ["a", "b", "c"], "global", "f1")
    assert len(set(threshold_vector(glob, ["c", "a"]))) == 1


def test_json_round_trip_and_bad_files(tmp_path: Path) -> None:
    info = tune_thresholds(np.array([[0.2, 0.9], [0.8, 0.1]]), np.array([[0, 1], [1, 0]]),
                           np.ones((2, 2), bool), ["traffic light", "dog"], "per_class", "accuracy")  # fmt: skip
    path = tmp_path / "thresholds.json"
    save_thresholds(info, path)
    loaded = load_thresholds(path)
    assert loaded["per_class"] == info["per_class"] and list(loaded["per_class"]) == ["traffic light", "dog"]
    np.testing.assert_allclose(threshold_vector(loaded, ["dog", "traffic light"]),
                               [info["per_class"]["dog"], info["per_class"]["traffic light"]])  # fmt: skip
    with pytest.raises(VgclipError, match="no value for 'traffic' .*tuned classes: 'traffic light', 'dog'"):
        threshold_vector(loaded, ["traffic", "dog"])  # a name cut at its first space
    (tmp_path / "bad.json").write_text(json.dumps({"mode": "global"}))
    with pytest.raises(VgclipError, match="not a vgclip thresholds file"):
        load_thresholds(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(VgclipError, match="broken.json"):
        load_thresholds(tmp_path / "broken.json")


@pytest.mark.parametrize("text", ["precision", "sensitivity", "sensitivity:1.5", "f1:0.3", "specificity:x"])
def test_bad_objectives(text: str) -> None:
    with pytest.raises(VgclipError):
        Objective.parse(text)


def test_tuning_needs_both_classes() -> None:
    with pytest.raises(VgclipError, match="both positive and negative"):
        tune_thresholds(np.ones((3, 1)), np.ones((3, 1), int), np.ones((3, 1), bool), ["a"])
