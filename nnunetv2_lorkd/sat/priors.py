"""Foreground priors for the SAT-style class bias: the fraction of class-k voxels among the voxels of the cases
annotated for class k (partial labels: a case of another region says nothing about class k).

The trainer starts each class at sigmoid = prior (bias logit(prior)); with bias 0 every voxel starts at 0.5 for
every class, and the first hundreds of iterations only push the background down. Needs numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

PRIOR_RANGE = (1e-4, 0.5)  # a class absent from the counted voxels still starts learnable; none starts "mostly on"
FALLBACK_PRIOR = 0.01  # for a class no counted case annotates (the trainer logs which)


@dataclass(frozen=True)
class ForegroundPriors:
    """Per class (label value k + 1 at index k): the clamped prior, whether it was measured, the raw fraction."""

    priors: tuple[float, ...]
    measured: tuple[bool, ...]  # False: no counted case annotates the class, ``priors`` holds the fallback
    fractions: tuple[float | None, ...]  # unclamped voxel fraction, None where not measured
    num_cases: int

    @property
    def fallback_classes(self) -> tuple[int, ...]:
        return tuple(k for k, m in enumerate(self.measured) if not m)


def foreground_priors(
    segmentations: Iterable[tuple[np.ndarray, Sequence[int]]],
    num_classes: int,
    prior_range: tuple[float, float] = PRIOR_RANGE,
    fallback: float = FALLBACK_PRIOR,
) -> ForegroundPriors:
    """Priors from ``(segmentation, annotated label values)`` pairs, one per case.

    Every voxel of a case counts in the denominator of each class the case annotates (nnU-Net's -1 "outside the
    nonzero mask" voxels too: the loss treats them as background); label values outside 1..num_classes are ignored.
    """
    low, high = prior_range
    if not 0 < low <= high < 1:
        raise ValueError(f"prior_range must satisfy 0 < low <= high < 1, got {prior_range}")
    if not 0 < fallback < 1:
        raise ValueError(f"the fallback prior must lie in (0, 1), got {fallback}")
    foreground = np.zeros(num_classes, dtype=np.float64)
    voxels = np.zeros(num_classes, dtype=np.float64)
    num_cases = 0
    for seg, annotated in segmentations:
        seg = np.asarray(seg)
        values = seg[seg > 0].astype(np.int64, copy=False)
        counts = np.bincount(values, minlength=num_classes + 1)[1 : num_classes + 1]
        index = np.array([v - 1 for v in annotated if 1 <= v <= num_classes], dtype=np.int64)
        foreground[index] += counts[index]
        voxels[index] += seg.size
        num_cases += 1
    measured = voxels > 0
    fractions = np.where(measured, foreground / np.maximum(voxels, 1.0), np.nan)
    priors = np.where(measured, np.clip(fractions, low, high), fallback)
    return ForegroundPriors(
        priors=tuple(float(p) for p in priors),
        measured=tuple(bool(m) for m in measured),
        fractions=tuple(float(f) if m else None for f, m in zip(fractions, measured, strict=True)),
        num_cases=num_cases,
    )


def subsample_evenly(cases: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` of ``cases``, evenly spread over the sorted list (deterministic, so every DDP rank and
    every rerun reads the same cases)."""
    ordered = sorted(cases)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if len(ordered) <= limit:
        return ordered
    return [ordered[i] for i in np.linspace(0, len(ordered) - 1, limit).round().astype(int)]
