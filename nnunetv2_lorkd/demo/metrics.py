"""Dice and normalised surface Dice (NSD) per class, summed over all test parts of a region.

Both are computed from counts that add up over cases, so the score of a class is the score on all test
voxels of its region together (the test parts are slabs of one scan; a class that is absent from one slab
does not make that slab's score undefined):

- Dice = 2·TP / (2·TP + FP + FN), with TP/FP/FN summed over the cases;
- NSD at tolerance τ mm (Nikolov et al. 2021, "surface Dice"), here on boundary voxels: the boundary of a
  mask is its voxels that have a 6-connected neighbour outside the mask inside the image (the image's own
  border, i.e. a slab's cut faces, is not a surface: ``border_value=1``); distances are Euclidean in mm on the
  image spacing (``scipy.ndimage.distance_transform_edt(sampling=...)``).
  NSD = (#pred-boundary voxels within τ of the reference boundary + #reference-boundary voxels within τ of
  the predicted boundary) / (#pred-boundary + #reference-boundary voxels).

A class with neither reference nor predicted voxels in any case has no score (NaN) and is left out of means.
The default tolerance is 3 mm: one voxel at the benchmark's 3 mm spacing (SAT and LoRKD report NSD at 1 voxel).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

DEFAULT_TOLERANCE_MM = 3.0


@dataclass
class ClassCounts:
    """Additive counts for one class over many cases."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    pred_boundary: int = 0
    ref_boundary: int = 0
    pred_boundary_close: int = 0  # predicted boundary voxels within tolerance of the reference boundary
    ref_boundary_close: int = 0  # reference boundary voxels within tolerance of the predicted boundary

    def add(self, other: ClassCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def dice(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return float("nan") if denominator == 0 else 2 * self.tp / denominator

    @property
    def nsd(self) -> float:
        denominator = self.pred_boundary + self.ref_boundary
        if denominator == 0:
            return float("nan")
        return (self.pred_boundary_close + self.ref_boundary_close) / denominator


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a face neighbour outside it; the image border does not count as outside."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=1)


def _distance_to(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of `surface` (which must not be empty)."""
    return ndimage.distance_transform_edt(~surface, sampling=spacing)


def class_counts(
    prediction: np.ndarray, reference: np.ndarray, label: int, spacing: Sequence[float], tolerance_mm: float
) -> ClassCounts:
    """Counts for one label on one case. `spacing` is per array axis (same order as the arrays), in mm."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    if len(spacing) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {prediction.ndim}-d array")
    pred = prediction == label
    ref = reference == label
    counts = ClassCounts(
        tp=int(np.count_nonzero(pred & ref)),
        fp=int(np.count_nonzero(pred & ~ref)),
        fn=int(np.count_nonzero(~pred & ref)),
    )
    pred_surface, ref_surface = boundary(pred), boundary(ref)
    counts.pred_boundary = int(np.count_nonzero(pred_surface))
    counts.ref_boundary = int(np.count_nonzero(ref_surface))
    if counts.pred_boundary and counts.ref_boundary:
        counts.pred_boundary_close = int(
            np.count_nonzero(_distance_to(ref_surface, spacing)[pred_surface] <= tolerance_mm)
        )
        counts.ref_boundary_close = int(
            np.count_nonzero(_distance_to(pred_surface, spacing)[ref_surface] <= tolerance_mm)
        )
    return counts


@dataclass
class RegionScores:
    """Per-class Dice/NSD of one model on one region's test parts."""

    classes: tuple[str, ...]
    counts: dict[str, ClassCounts] = field(default_factory=dict)

    def dice(self) -> dict[str, float]:
        return {c: self.counts[c].dice for c in self.classes}

    def nsd(self) -> dict[str, float]:
        return {c: self.counts[c].nsd for c in self.classes}

    def mean_dice(self) -> float:
        return _nanmean(self.dice().values())

    def mean_nsd(self) -> float:
        return _nanmean(self.nsd().values())


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def score_cases(
    cases: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]],
    classes: Sequence[str],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> RegionScores:
    """Sum the counts of labels 1..K (= `classes`) over (prediction, reference, spacing) cases."""
    scores = RegionScores(tuple(classes), {c: ClassCounts() for c in classes})
    for prediction, reference, spacing in cases:
        for label, name in enumerate(classes, start=1):
            scores.counts[name].add(class_counts(prediction, reference, label, spacing, tolerance_mm))
    return scores
