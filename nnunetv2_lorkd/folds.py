"""Region-stratified cross-validation splits in nnU-Net's ``splits_final.json`` format.

nnU-Net's default split (``do_split``) shuffles all cases together and ignores regions, so a small region can
end up with no validation case in some folds, or all of its cases in one fold. Here every region is dealt out
over the folds on its own, which gives each fold's validation set cases of every region that has at least
``num_folds`` cases.

Case groups: several cases can show the same patient, e.g. ``lorkd-merge`` split mode turns one source case
``c0`` into ``c0_abdomen`` and ``c0_pelvis`` (same image, different labels). Validating on ``c0_pelvis`` while
training on ``c0_abdomen`` would validate on a trained-on image, so the optional ``groups`` mapping (case ->
group, e.g. the ``lorkd.case_sources`` record) keeps all cases of one group in the same fold's validation set
(and in the training set of every other fold). A case without a group is a group of its own.

How groups are dealt (deterministic for a given ``case_regions``, ``groups`` and ``seed``; the dict order does
not matter):

- a group belongs to its rarest region (fewest cases; ties: lowest index), a single case to its own region;
- regions are visited in ascending region index; each region's groups are sorted (by their sorted case ids)
  and then shuffled with one ``numpy.random.RandomState(seed)`` that is shared by all regions;
- each group goes to the fold that has the fewest validation cases of the group's regions, then the fewest
  validation cases overall, then the first such fold from where the previous group went. Without multi-case
  groups this is a round-robin that continues across regions, so fold sizes differ by at most one;
- a region with fewer cases (or groups) than folds thus has validation cases in only some folds; in the
  other folds all of its cases are in the training set;
- a region with a single case cannot be validated without losing its only training example, so that case (and
  the rest of its group) is put into the training set of every fold and the region has no validation case.

The last two situations are reported as warnings: :func:`stratified_splits_with_warnings` returns them and
:func:`region_stratified_splits` logs them (logger ``nnunetv2_lorkd.folds``, level WARNING).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np

from .regions import RegionMap

logger = logging.getLogger(__name__)


def _check_groups(groups: Mapping[str, str] | None, case_regions: Mapping[str, int]) -> dict[str, str]:
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups must map case ids to group names, got {type(groups).__name__}")
    unknown = sorted(str(c) for c in groups if c not in case_regions)
    if unknown:
        raise ValueError(
            f"groups names {len(unknown)} case(s) that are not in case_regions, e.g. {unknown[:5]}; give a group "
            "only to cases that are split"
        )
    for case, group in groups.items():
        if not isinstance(group, str) or not group:
            raise ValueError(f"case '{case}' has group {group!r}; groups must be non-empty strings")
    return dict(groups)


def stratified_splits_with_warnings(
    case_regions: Mapping[str, int],
    num_folds: int = 5,
    seed: int = 12345,
    groups: Mapping[str, str] | None = None,
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
    group_of = _check_groups(groups, case_regions)

    # units: the cases that always share a fold (a given group, or a single ungrouped case)
    members: dict[tuple[int, str], list[str]] = {}
    for case in sorted(case_regions):
        key = (0, group_of[case]) if case in group_of else (1, case)
        members.setdefault(key, []).append(case)
    unit_of = {case: key for key, cases in members.items() for case in cases}
    region_of = {case: int(region) for case, region in case_regions.items()}
    size = {region: len(cases) for region, cases in by_region.items()}

    notes: dict[int, str] = {}  # region -> its warning, reported in region order
    always_train: set[tuple[int, str]] = set()
    for region in sorted(by_region):
        if size[region] == 1:
            case = by_region[region][0]
            unit = unit_of[case]
            always_train.add(unit)
            others = [c for c in members[unit] if c != case]
            also = f" (so are the other cases of its group: {others})" if others else ""
            notes[region] = (
                f"region {region} has a single case ('{case}'): it is in the training set of every fold "
                f"and the region has no validation case{also}; add cases to that region to validate it"
            )

    primary: dict[int, list[list[str]]] = {}
    for key, cases in members.items():
        if key not in always_train:
            rarest = min({region_of[c] for c in cases}, key=lambda r: (size[r], r))
            primary.setdefault(rarest, []).append(cases)

    rng = np.random.RandomState(seed)
    val_folds: list[list[str]] = [[] for _ in range(num_folds)]
    region_counts = [dict.fromkeys(by_region, 0) for _ in range(num_folds)]
    next_fold = 0
    for region in sorted(primary):
        units = sorted(primary[region])
        for i in rng.permutation(len(units)):
            unit = units[i]
            regions = [region_of[c] for c in unit]
            costs = [
                (sum(region_counts[f][r] for r in regions), len(val_folds[f]), (f - next_fold) % num_folds, f)
                for f in range(num_folds)
            ]
            fold = min(costs)[3]
            val_folds[fold].extend(unit)
            for r in regions:
                region_counts[fold][r] += 1
            next_fold = (fold + 1) % num_folds

    grouped = any(len(cases) > 1 for cases in members.values())
    empty = [f for f, val in enumerate(val_folds) if not val]
    if empty:
        n_units = sum(len(units) for units in primary.values())
        if grouped:
            what = (
                f"only {n_units} case groups can be validated (the cases of one group, e.g. one source case, "
                "always share a fold; single-case regions are never validated)"
            )
        else:
            what = f"only {n_units} cases belong to regions with at least 2 cases"
        raise ValueError(
            f"folds {empty} would have no validation case: {what}, but {num_folds} folds need at least "
            f"{num_folds}; use fewer folds or add cases"
        )

    for region in sorted(by_region):
        if size[region] == 1:
            continue
        missing = [f for f in range(num_folds) if region_counts[f][region] == 0]
        if not missing:
            continue
        if size[region] < num_folds:
            notes[region] = (
                f"region {region} has {size[region]} cases, fewer than {num_folds} folds: folds {missing} have "
                "no validation case of it (all its cases are in their training sets)"
            )
        else:
            n_groups = len({unit_of[c] for c in by_region[region]} - always_train)
            notes[region] = (
                f"region {region} has {size[region]} cases in {n_groups} case groups that can be validated, but "
                f"folds {missing} have no validation case of it (the cases of one group always share a fold)"
            )
    warnings = [notes[region] for region in sorted(notes)]

    all_cases = sorted(case_regions)
    splits = []
    for val in val_folds:
        val_set = set(val)
        splits.append({"train": [c for c in all_cases if c not in val_set], "val": sorted(val)})
    return splits, warnings


def region_stratified_splits(
    case_regions: Mapping[str, int],
    num_folds: int = 5,
    seed: int = 12345,
    groups: Mapping[str, str] | None = None,
) -> list[dict[str, list[str]]]:
    """Folds for ``splits_final.json`` (``[{"train": [...], "val": [...]}, ...]``) in which every region is
    spread over the folds, so per-region validation metrics exist in every fold where the region is large
    enough.

    ``case_regions`` maps case id -> region index (as in ``RegionMap.case_regions``). ``groups`` (optional)
    maps case id -> group (e.g. its source case): cases of one group are never split between the training and
    the validation set of a fold. Single-case regions and regions smaller than ``num_folds`` are logged as
    warnings (see the module docstring).

    Raises ``ValueError`` for ``num_folds < 2``, an empty mapping, a group for an unknown case, or when a fold
    would get no validation case.
    """
    splits, warnings = stratified_splits_with_warnings(case_regions, num_folds, seed, groups)
    for message in warnings:
        logger.warning(message)
    return splits


def splits_for_cases(
    region_map: RegionMap, cases: Iterable[str], num_folds: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
    """:func:`region_stratified_splits` of ``cases`` with their regions and, where the dataset records them
    (``lorkd.case_sources``), their source cases as groups: what a trainer writes when a dataset has no
    ``splits_final.json``, so that the cases of one patient never end up on both sides of a fold."""
    cases = sorted(set(cases))
    case_regions = {case: region_map.region_of_case(case) for case in cases}
    groups = {case: region_map.case_sources[case] for case in cases if case in region_map.case_sources}
    return region_stratified_splits(case_regions, num_folds, seed, groups)
