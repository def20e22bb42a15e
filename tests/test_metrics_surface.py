"""Dice and NSD (nnunetv2_lorkd.demo.metrics) on hand-made volumes with hand-computed answers, and NSD against
a brute-force implementation that measures every pair of boundary voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_lorkd.demo.metrics import ClassCounts, boundary, class_counts, score_cases


def _slab(z0: int, z1: int, shape: tuple[int, int, int] = (10, 4, 4)) -> np.ndarray:
    """Label 1 on whole planes z0..z1-1: its only surfaces are the planes z0 and z1-1 (the image border is none)."""
    volume = np.zeros(shape, np.uint8)
    volume[z0:z1] = 1
    return volume


def test_dice_and_nsd_of_shifted_slabs_by_hand() -> None:
    reference = _slab(2, 6)  # planes 2..5, surfaces at z = 2 and 5
    spacing = (2.0, 1.0, 1.0)  # 2 mm between planes
    # shifted by one plane: overlap 3 of 4 planes; every surface plane is exactly 2 mm from the other's
    one = class_counts(_slab(3, 7), reference, 1, spacing, tolerance_mm=2.0)
    assert one.dice == pytest.approx(2 * 3 / (4 + 4))
    assert (one.pred_boundary, one.ref_boundary) == (32, 32)  # two 4x4 planes each
    assert one.nsd == 1.0
    assert class_counts(_slab(3, 7), reference, 1, spacing, tolerance_mm=1.9).nsd == 0.0
    # shifted by two planes (surfaces at 4 and 7): pred 4 -> ref 5 is 2 mm, pred 7 -> ref 5 is 4 mm,
    # ref 2 -> pred 4 is 4 mm, ref 5 -> pred 4 is 2 mm: half of all surface voxels are within 3 mm
    two = class_counts(_slab(4, 8), reference, 1, spacing, tolerance_mm=3.0)
    assert two.dice == pytest.approx(2 * 2 / 8)
    assert (two.pred_boundary_close, two.ref_boundary_close) == (16, 16)
    assert two.nsd == pytest.approx(0.5)
    # the same shift along an axis with 1 mm spacing (the last one here) is within 3 mm everywhere
    along_x = class_counts(_slab(4, 8).transpose(2, 1, 0), reference.transpose(2, 1, 0), 1, (5.0, 5.0, 1.0), 3.0)
    assert along_x.nsd == 1.0


def test_empty_cases() -> None:
    empty = np.zeros((6, 5, 5), np.uint8)
    reference = _slab(1, 3, (6, 5, 5))
    both_empty = class_counts(empty, empty, 1, (1, 1, 1), 1.0)
    assert math.isnan(both_empty.dice) and math.isnan(both_empty.nsd)
    missed = class_counts(empty, reference, 1, (1, 1, 1), 1.0)
    assert missed.dice == 0.0 and missed.nsd == 0.0
    invented = class_counts(reference, empty, 1, (1, 1, 1), 1.0)
    assert invented.dice == 0.0 and invented.nsd == 0.0
    assert not boundary(np.ones((3, 3, 3), bool)).any()  # the image border is not a surface
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert boundary(cube).sum() == 26  # 27 voxels, only the centre has all six neighbours inside


def test_counts_add_up_over_cases() -> None:
    """A class present in one case only: the region score is the score over all cases' voxels together."""
    reference_a, prediction_a = _slab(2, 6), _slab(3, 7)
    empty = np.zeros_like(reference_a)
    scores = score_cases(
        [(prediction_a, reference_a, (2.0, 1.0, 1.0)), (empty, empty, (2.0, 1.0, 1.0))], ["organ"], tolerance_mm=2.0
    )
    assert scores.dice()["organ"] == pytest.approx(0.75) and scores.nsd()["organ"] == 1.0
    assert scores.mean_dice() == pytest.approx(0.75)
    # a second class that never occurs is NaN and left out of the mean
    two_classes = score_cases([(prediction_a, reference_a, (2.0, 1.0, 1.0))], ["organ", "absent"], 2.0)
    assert math.isnan(two_classes.dice()["absent"]) and two_classes.mean_dice() == pytest.approx(0.75)
    total = ClassCounts()
    total.add(ClassCounts(tp=1, fp=2, fn=3))
    total.add(ClassCounts(tp=1, fp=0, fn=1))
    assert total.dice == pytest.approx(4 / (4 + 2 + 4))


def _brute_force_nsd(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance: float) -> float:
    structure = ndimage.generate_binary_structure(3, 1)

    def surface(mask: np.ndarray) -> np.ndarray:
        eroded = ndimage.binary_erosion(mask, structure, border_value=1)
        return np.argwhere(mask & ~eroded) * np.asarray(spacing)

    sp, sr = surface(pred), surface(ref)
    distances = np.sqrt(((sp[:, None, :] - sr[None, :, :]) ** 2).sum(-1))
    close = (distances.min(1) <= tolerance).sum() + (distances.min(0) <= tolerance).sum()
    return close / (len(sp) + len(sr))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsd_matches_brute_force_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (9, 12, 11)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)

    def blob() -> np.ndarray:
        centre = rng.uniform([2, 3, 3], [7, 9, 8])
        radius = rng.uniform([1.5, 2.0, 2.0], [3.0, 4.0, 4.0])
        return ((((grid - centre) / radius) ** 2).sum(-1) <= 1).astype(np.uint8)

    pred, ref = blob(), blob()
    spacing = (2.5, 0.8, 1.1)
    for tolerance in (0.5, 1.0, 2.6, 4.0):
        got = class_counts(pred, ref, 1, spacing, tolerance).nsd
        assert got == pytest.approx(_brute_force_nsd(pred.astype(bool), ref.astype(bool), spacing, tolerance))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        class_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), 1, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="does not match"):
        class_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 1, (1, 1), 1.0)
