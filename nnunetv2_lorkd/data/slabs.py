"""Leakage-free train/test split of single scans into z-slabs, and the check that no test voxel is trained on.

A region volume is cut along z (inferior -> superior) by a layout of runs given in mm, e.g.
``train 60 | gap 6 | test 24 | gap 6``, repeated from slice 0 until the volume ends (a layout whose last run
is long simply runs out). Runs are rounded to whole slices (at least one slice each). Gap slices belong to
no split, and a train slab never touches a test slab. Each training run becomes one training case (or
several, when longer than ``max_case_mm``: consecutive sub-volumes that share no slice); each test run becomes
one test case.

Different regions cut from one scan (abdomen and pelvis share TotalSegmentator's example CT) are checked
together by their physical z extents: :func:`check_disjoint` fails if a test part overlaps or touches any
training part of the same scan, in any region.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SPLIT_NAMES = ("train", "test", "gap")


class SplitError(ValueError):
    """A slab pattern that cannot be applied, or parts that leak test voxels into training."""


@dataclass(frozen=True)
class Slab:
    split: str  # "train" or "test"
    z0: int  # first slice
    z1: int  # one past the last slice


@dataclass(frozen=True)
class Part:
    """A case as placed in its scan: the physical z extent (mm, voxel edges) it covers."""

    case_id: str
    region: str
    scan_id: str
    split: str
    z_mm: tuple[float, float]


def pattern_slices(pattern: Sequence[tuple[str, float]], spacing_z: float) -> list[tuple[str, int]]:
    """The pattern in whole slices (round to nearest, at least 1)."""
    if not pattern or any(name not in SPLIT_NAMES for name, _ in pattern):
        raise SplitError(f"slab pattern {list(pattern)} must consist of runs named {SPLIT_NAMES}")
    if not {"train", "test"} <= {name for name, _ in pattern}:
        raise SplitError(f"slab pattern {list(pattern)} needs at least one train and one test run")
    if any(mm <= 0 for _, mm in pattern):
        raise SplitError(f"slab pattern {list(pattern)}: every run needs a positive length in mm")
    return [(name, max(1, round(mm / spacing_z))) for name, mm in pattern]


def slab_plan(num_slices: int, pattern: Sequence[tuple[str, float]], spacing_z: float) -> list[Slab]:
    """The train and test slabs of a volume of `num_slices` slices (gaps left out), from slice 0 up; the
    last run is cut short by the volume's end. Adjacent runs of one split are joined into one slab."""
    runs = pattern_slices(pattern, spacing_z)
    slabs: list[Slab] = []
    z = 0
    i = 0
    while z < num_slices:
        name, length = runs[i % len(runs)]
        end = min(num_slices, z + length)
        if name != "gap":
            if slabs and slabs[-1].split == name and slabs[-1].z1 == z:
                slabs[-1] = Slab(name, slabs[-1].z0, end)
            else:
                slabs.append(Slab(name, z, end))
        z = end
        i += 1
    for a, b in itertools.pairwise(slabs):
        if a.z1 == b.z0:
            raise SplitError(
                f"slab layout {list(pattern)}: the {a.split} slab {a.z0}-{a.z1 - 1} touches the {b.split} slab "
                f"{b.z0}-{b.z1 - 1} (at {spacing_z} mm per slice); put a gap run between them"
            )
    return slabs


def cut_case_slabs(slab: Slab, max_slices: int) -> list[Slab]:
    """A training slab as consecutive, non-overlapping sub-slabs of at most `max_slices` (nearly equal sizes)."""
    length = slab.z1 - slab.z0
    pieces = max(1, -(-length // max(1, max_slices)))
    bounds = [slab.z0 + round(k * length / pieces) for k in range(pieces + 1)]
    return [Slab(slab.split, a, b) for a, b in itertools.pairwise(bounds) if b > a]


def check_disjoint(parts: Iterable[Part], min_gap_mm: float = 0.0) -> None:
    """Raise :class:`SplitError` if a test part overlaps a training part of the same scan (any region), or
    lies closer to it than `min_gap_mm` (edges touching counts as 0 mm apart and fails for any gap)."""
    by_scan: dict[str, list[Part]] = {}
    for part in parts:
        if part.split not in ("train", "test"):
            raise SplitError(f"case {part.case_id}: split {part.split!r} is neither train nor test")
        by_scan.setdefault(part.scan_id, []).append(part)
    for scan_id, scan_parts in by_scan.items():
        tests = [p for p in scan_parts if p.split == "test"]
        trains = [p for p in scan_parts if p.split == "train"]
        for t in tests:
            for r in trains:
                distance = max(t.z_mm[0] - r.z_mm[1], r.z_mm[0] - t.z_mm[1])
                if distance <= 0 or distance < min_gap_mm:
                    raise SplitError(
                        f"scan {scan_id}: test case {t.case_id} (z {t.z_mm[0]:.1f}..{t.z_mm[1]:.1f} mm) and training "
                        f"case {r.case_id} (z {r.z_mm[0]:.1f}..{r.z_mm[1]:.1f} mm) are {distance:.1f} mm apart; "
                        f"they must be separated by a gap of at least {max(min_gap_mm, 0.0):.1f} mm"
                    )
