"""Classification scores of a fine-tune: macro-F1 against hand-computed values, and where the summary shows it."""

from __future__ import annotations

import numpy as np
import pytest

from orchestration.finetune.scores import classification_scores, macro_f1, majority_accuracy
from orchestration.finetune.summary import summary_blocks


def test_macro_f1_matches_a_hand_computed_confusion():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 2, 1, 1, 2, 0])
    # class 0: TP 2, FP 1, FN 2 -> 4/7; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 1, FP 1, FN 1 -> 1/2.
    # Class 3 is never true nor predicted: no F1, not averaged (scikit-learn's f1_score(average="macro")).
    f1, per_class = macro_f1(preds, labels, 4)
    assert per_class == pytest.approx({0: 4 / 7, 1: 4 / 5, 2: 1 / 2})
    assert f1 == pytest.approx((4 / 7 + 4 / 5 + 1 / 2) / 3) == pytest.approx(131 / 210)
    scores = classification_scores(preds, labels, ["a", "b", "c", "d"])
    assert scores["accuracy"] == 5 / 8 and scores["macro_f1"] == pytest.approx(131 / 210)
    assert scores["per_class_f1"] == pytest.approx({"a": 4 / 7, "b": 4 / 5, "c": 1 / 2})
    # a class predicted but never true counts with F1 0; perfect predictions score 1
    f1, per_class = macro_f1(np.array([0, 1]), np.array([0, 0]), 2)
    assert per_class == pytest.approx({0: 2 / 3, 1: 0.0}) and f1 == pytest.approx(1 / 3)
    assert macro_f1(labels, labels, 3)[0] == 1.0


def test_majority_class_has_high_accuracy_but_low_macro_f1():
    train = [{"label": "a"}] * 5 + [{"label": "b"}]
    val = [{"label": "a"}] * 3 + [{"label": "b"}]
    scores = majority_accuracy(train, val)
    # always "a": class a TP 3, FP 1 -> 6/7; class b never predicted -> 0
    assert scores["label"] == "a" and scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((6 / 7 + 0.0) / 2)


def test_classification_summary_shows_macro_f1_next_to_accuracy():
    summary = {
        "task": "classification",
        "mode": "full",
        "trainable_params": 1000,
        "base_checkpoint": "runs/base",
        "best_checkpoint": "runs/ft/checkpoint_8",
        "best_step": 8,
        "total_steps": 12,
        "stopped_early": False,
        "before": {
            "zero_shot": {"accuracy": 0.4, "macro_f1": 0.25, "template": "{text} is"},
            "majority_class": {"label": "comedy", "accuracy": 0.5, "macro_f1": 0.2222},
        },
        "after": {"accuracy": 0.8, "macro_f1": 0.7654, "loss": 0.5},
    }
    table = next(b for b in summary_blocks(summary) if b[0] == "table")
    rows = {r[0]: r[1:] for r in table[2]}
    assert table[1] == ("metric", "before", "after")
    assert rows["accuracy"] == ("0.4000", "0.8000") and rows["macro-F1"] == ("0.2500", "0.7654")
    assert rows["majority-class macro-F1"] == ("0.2222", "-")
    assert list(rows).index("macro-F1") == list(rows).index("accuracy") + 1  # next to accuracy
    # a summary written before macro-F1 existed still renders, with "-" for it
    del summary["after"]["macro_f1"], summary["before"]["zero_shot"]["macro_f1"]
    rows = {r[0]: r[1:] for r in next(b for b in summary_blocks(summary) if b[0] == "table")[2]}
    assert rows["macro-F1"] == ("-", "-")
