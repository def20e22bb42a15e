"""MedMNIST's classification metrics: ACC (top-1) and AUC (one-vs-rest, macro over classes).

AUC is computed here (Mann-Whitney U with average ranks for ties) rather than with scikit-learn so that a
class absent from a small test split is skipped and reported instead of raising. For two classes the
one-vs-rest macro equals the usual binary AUC of the positive class score.
"""

from __future__ import annotations

import math

import numpy as np


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when one of the two groups is empty."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{'acc', 'auc', 'n', 'auc_classes'} of one task; auc_classes = classes that entered the macro AUC."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs)
    if len(labels) == 0:
        return {"acc": math.nan, "auc": math.nan, "n": 0, "auc_classes": 0}
    acc = float((probs.argmax(1) == labels).mean())
    aucs = [binary_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]
    valid = [a for a in aucs if not math.isnan(a)]
    return {
        "acc": acc,
        "auc": float(np.mean(valid)) if valid else math.nan,
        "n": len(labels),
        "auc_classes": len(valid),
    }
