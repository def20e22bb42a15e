"""Region-stratified cross-validation splits in nnU-Net's ``splits_final.json`` format.

nnU-Net's default split (``do_split``) shuffles all cases together and ignores regions, so a small region can
end up with no validation case in some folds, or all of its cases in one fold. Here every region is dealt out
over the folds on its own, which gives each fold's validation set cases of every region that has at least
``num_folds`` cases.

How cases are dealt (deterministic for a given ``case_regions`` and ``seed``; the dict order does not matter):

- regions are visited in ascending region index, each region's case ids are sorted and then shuffled with one
  ``numpy.random.RandomState(seed)`` that is shared by all regions;
- the shuffled cases are dealt round-robin over the folds, and the next region continues at the fold where the
  previous one stopped, so fold sizes differ by at most one;
- a region with fewer cases than folds (but at least two) thus has validation cases in only some folds; in the
  other folds all of its cases are in the training set;
- a region with a single case cannot be validated without losing its only training example, so that case is
  put into the training set of every fold and the region has no validation case at all.

The last two situations are reported as warnings: :func:`stratified_splits_with_warnings` returns them and
:func:`region_stratified_splits` logs them (logger ``nnunetv2_lorkd.splits``, level WARNING).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

logger = logging.getLogger(__name__)


def stratified_splits_with_warnings(
    case_regions: Mapping[str, int], num_folds: int = 5, seed: int = 12345
) -> tuple[list[dict[str, list[str]]], list[str]]:
    """Like :func:`region_stratified_splits`, but returns the warnings instead of logging them, so a CLI can
    show them next to its own output."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if not case_regions:
        raise ValueError("case_regions is empty: there are no cases to split")
    by_region: dict[int, list[str]] = {}
    for case, region in case_regions.items():
        if not isinstance(case, str) or not case:
            raise ValueError(f"case ids must be non-empty strings, got {case!r}")
        if isinstance(region, bool) or not isinstance(region, (int, np.integer)) or region < 0:
            raise ValueError(f"case '{case}' has region {region!r}; regions must be integer indices >= 0")
        by_region.setdefault(int(region), []).append(case)

    rng = np.random.RandomState(seed)
    val_folds: list[list[str]] = [[] for _ in range(num_folds)]
    always_train: list[str] = []
    warnings: list[str] = []
    next_fold = 0
    for region in sorted(by_region):
        cases = sorted(by_region[region])
        if len(cases) == 1:
            always_train.append(cases[0])
            warnings.append(
                f"region {region} has a single case ('{cases[0]}'): it is in the training set of every fold "
                "and the region has no validation case; add cases to that region to validate it"
            )
            continue
        order = rng.permutation(len(cases))
        used_folds = set()
        for i in order:
            val_folds[next_fold].append(cases[i])
            used_folds.add(next_fold)
            next_fold = (next_fold + 1) % num_folds
        if len(cases) < num_folds:
            missing = sorted(set(range(num_folds)) - used_folds)
            warnings.append(
                f"region {region} has {len(cases)} cases, fewer than {num_folds} folds: folds {missing} have "
                "no validation case of it (all its cases are in their training sets)"
            )

    empty = [f for f, val in enumerate(val_folds) if not val]
    if empty:
        n_validatable = sum(len(v) for v in val_folds)
        raise ValueError(
            f"folds {empty} would have no validation case: only {n_validatable} cases belong to regions with "
            f"at least 2 cases, but {num_folds} folds need at least {num_folds}; use fewer folds or add cases"
        )

    all_cases = sorted(case_regions)
    splits = []
    for val in val_folds:
        val_set = set(val)
        splits.append({"train": [c for c in all_cases if c not in val_set], "val": sorted(val)})
    return splits, warnings


def region_stratified_splits(
    case_regions: Mapping[str, int], num_folds: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
    """Folds for ``splits_final.json`` (``[{"train": [...], "val": [...]}, ...]``) in which every region is
    spread over the folds, so per-region validation metrics exist in every fold where the region is large
    enough.

    ``case_regions`` maps case id -> region index (as in ``RegionMap.case_regions``). Single-case regions and
    regions smaller than ``num_folds`` are logged as warnings (see the module docstring).

    Raises ``ValueError`` for ``num_folds < 2``, an empty mapping, or when a fold would get no validation
    case.
    """
    splits, warnings = stratified_splits_with_warnings(case_regions, num_folds, seed)
    for message in warnings:
        logger.warning(message)
    return splits
