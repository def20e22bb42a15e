"""Region-stratified splits: format, stratification, determinism, small regions, input validation, and case
groups (one patient's cases never on both sides of a fold)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from nnunetv2_lorkd.folds import region_stratified_splits, splits_for_cases, stratified_splits_with_warnings
from nnunetv2_lorkd.regions import RegionMap


def _cases(sizes: dict[int, int]) -> dict[str, int]:
    return {f"r{region}_{i:03d}": region for region, n in sizes.items() for i in range(n)}


def _check_partition(splits: list[dict[str, list[str]]], case_regions: dict[str, int]) -> None:
    all_cases = set(case_regions)
    validated = [c for fold in splits for c in fold["val"]]
    assert len(validated) == len(set(validated)), "a case is validated in more than one fold"
    for fold in splits:
        assert set(fold) == {"train", "val"}
        assert fold["train"] == sorted(fold["train"]) and fold["val"] == sorted(fold["val"])
        assert set(fold["train"]).isdisjoint(fold["val"])
        assert set(fold["train"]) | set(fold["val"]) == all_cases
        assert fold["val"], "empty validation fold"


def test_format_and_stratification() -> None:
    case_regions = _cases({0: 12, 1: 5, 2: 3})
    splits = region_stratified_splits(case_regions, num_folds=5, seed=12345)
    assert len(splits) == 5
    json.loads(json.dumps(splits))  # splits_final.json is plain JSON
    _check_partition(splits, case_regions)
    # every region with >= num_folds cases has validation cases in every fold
    for fold in splits:
        regions_in_val = {case_regions[c] for c in fold["val"]}
        assert {0, 1} <= regions_in_val
    # the small region: validated in 3 folds (once each), in training in all the others
    small = {c for c, r in case_regions.items() if r == 2}
    folds_with_small_val = [i for i, f in enumerate(splits) if small & set(f["val"])]
    assert len(folds_with_small_val) == 3
    for i, fold in enumerate(splits):
        if i not in folds_with_small_val:
            assert small <= set(fold["train"])
    # balanced: region 0 spreads 12 cases as 3/3/2/2/2, fold sizes differ by at most one
    per_fold_r0 = sorted(sum(case_regions[c] == 0 for c in f["val"]) for f in splits)
    assert per_fold_r0 == [2, 2, 2, 3, 3]
    sizes = [len(f["val"]) for f in splits]
    assert max(sizes) - min(sizes) <= 1


def test_deterministic_and_order_independent() -> None:
    case_regions = _cases({0: 9, 1: 6, 2: 4})
    a = region_stratified_splits(case_regions, 5, seed=7)
    b = region_stratified_splits(dict(reversed(list(case_regions.items()))), 5, seed=7)
    assert a == b
    assert region_stratified_splits(case_regions, 5, seed=8) != a


def test_single_case_region_trains_in_every_fold_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    case_regions = {**_cases({0: 6}), "lonely": 1}
    with caplog.at_level(logging.WARNING, logger="nnunetv2_lorkd.folds"):
        splits = region_stratified_splits(case_regions, num_folds=3)
    _check_partition(splits, case_regions)
    assert all("lonely" in f["train"] and "lonely" not in f["val"] for f in splits)
    assert any("single case ('lonely')" in r.getMessage() for r in caplog.records)


def test_warnings_are_returned() -> None:
    splits, warnings = stratified_splits_with_warnings({**_cases({0: 5, 1: 2}), "solo": 2}, num_folds=5)
    assert len(splits) == 5
    assert any(w.startswith("region 1 has 2 cases, fewer than 5 folds") for w in warnings)
    assert any(w.startswith("region 2 has a single case") for w in warnings)
    _, none = stratified_splits_with_warnings(_cases({0: 5, 1: 5}), num_folds=5)
    assert none == []


@pytest.mark.parametrize(
    ("case_regions", "num_folds", "message"),
    [
        (_cases({0: 5}), 1, "num_folds must be an integer >= 2"),
        (_cases({0: 5}), True, "num_folds must be an integer >= 2"),
        ({}, 5, "case_regions is empty"),
        ({"a": -1, "b": 0}, 2, "regions must be integer indices >= 0"),
        ({"a": "abdomen", "b": 0}, 2, "regions must be integer indices >= 0"),
        ({**_cases({0: 3}), "x": 1, "y": 2}, 5, "would have no validation case"),
    ],
)
def test_invalid_input(case_regions: dict, num_folds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        region_stratified_splits(case_regions, num_folds)


# ------------------------------------------------------------------------------------------------ case groups
def _split_mode(n_sources: int, regions: tuple[str, ...] = ("abdomen", "pelvis")) -> tuple[dict, dict]:
    """What lorkd-merge split mode makes: every source case once per region, all copies one group."""
    case_regions = {f"c{i:02d}_{name}": r for i in range(n_sources) for r, name in enumerate(regions)}
    groups = {case: f"Dataset503_Whole/{case.split('_')[0]}" for case in case_regions}
    return case_regions, groups


def _check_groups_kept(splits: list[dict[str, list[str]]], groups: dict[str, str]) -> None:
    for i, fold in enumerate(splits):
        val = {groups[c] for c in fold["val"] if c in groups}
        train = {groups[c] for c in fold["train"] if c in groups}
        assert not val & train, f"fold {i}: groups {sorted(val & train)} are in train and val"


def test_groups_are_never_split_between_train_and_val() -> None:
    case_regions, groups = _split_mode(10)
    # plus a separate dataset's cases: their own groups
    case_regions |= {f"tho_{i}": 2 for i in range(7)}
    splits, warnings = stratified_splits_with_warnings(case_regions, 5, seed=3, groups=groups)
    _check_partition(splits, case_regions)
    _check_groups_kept(splits, groups)
    assert warnings == []
    for fold in splits:  # still stratified: every region in every validation fold, 2 patients per fold
        assert {case_regions[c] for c in fold["val"]} == {0, 1, 2}
        assert sum(case_regions[c] == 0 for c in fold["val"]) == 2
    # both copies of a source case are validated together
    for fold in splits:
        sources = {c.split("_")[0] for c in fold["val"] if not c.startswith("tho")}
        assert {f"{s}_{r}" for s in sources for r in ("abdomen", "pelvis")} <= set(fold["val"])


def test_groups_random_property() -> None:
    """Random datasets with multi-region groups and ungrouped cases: no group is ever split."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        case_regions, groups = {}, {}
        for patient in range(int(rng.integers(3, 25))):
            for region in rng.choice(4, size=int(rng.integers(1, 4)), replace=False):
                case = f"p{patient}_{region}"
                case_regions[case] = int(region)
                if rng.random() < 0.8:
                    groups[case] = f"D/p{patient}"
        num_folds = int(rng.integers(2, 6))
        try:
            splits, _ = stratified_splits_with_warnings(case_regions, num_folds, seed=trial, groups=groups)
        except ValueError as e:
            assert "would have no validation case" in str(e)
            continue
        _check_partition(splits, case_regions)
        _check_groups_kept(splits, groups)


def test_groups_deterministic_and_order_independent() -> None:
    case_regions, groups = _split_mode(9, ("a", "b", "c"))
    a = region_stratified_splits(case_regions, 4, seed=5, groups=groups)
    b = region_stratified_splits(
        dict(reversed(list(case_regions.items()))), 4, seed=5, groups=dict(reversed(list(groups.items())))
    )
    assert a == b
    assert region_stratified_splits(case_regions, 4, seed=6, groups=groups) != a


def test_singleton_groups_change_nothing() -> None:
    """Separate datasets are separate patients: one group per case gives exactly the ungrouped splits."""
    case_regions = _cases({0: 12, 1: 5, 2: 3, 3: 1})
    plain = stratified_splits_with_warnings(case_regions, 5, seed=11)
    grouped = stratified_splits_with_warnings(case_regions, 5, seed=11, groups={c: f"D/{c}" for c in case_regions})
    assert plain == grouped


def test_group_warnings() -> None:
    # the single case of region 2 shares its patient with a region-0 case: both train in every fold
    case_regions = {**_cases({0: 6}), "lonely": 2}
    groups = {"r0_000": "D/p0", "lonely": "D/p0"}
    splits, warnings = stratified_splits_with_warnings(case_regions, 3, groups=groups)
    _check_groups_kept(splits, groups)
    assert all({"lonely", "r0_000"} <= set(f["train"]) for f in splits)
    assert warnings == [
        "region 2 has a single case ('lonely'): it is in the training set of every fold and the region has no "
        "validation case (so are the other cases of its group: ['r0_000']); add cases to that region to validate it"
    ]
    # 6 cases of region 0 but only 2 patients: two folds get none of them
    case_regions = {**_cases({0: 6, 1: 6})}
    groups = {f"r0_{i:03d}": f"D/p{i % 2}" for i in range(6)}
    splits, warnings = stratified_splits_with_warnings(case_regions, 4, groups=groups)
    _check_groups_kept(splits, groups)
    assert len(warnings) == 1 and warnings[0].startswith("region 0 has 6 cases in 2 case groups that can be validated")
    assert "the cases of one group always share a fold" in warnings[0]


def test_too_few_groups_for_the_folds() -> None:
    case_regions, groups = _split_mode(3)
    with pytest.raises(ValueError, match=r"only 3 case groups can be validated .* 5 folds need at least 5"):
        region_stratified_splits(case_regions, 5, groups=groups)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"nope": "D/x"}, r"groups names 1 case\(s\) that are not in case_regions, e.g. \['nope'\]"),
        ({"r0_000": ""}, "groups must be non-empty strings"),
        ({"r0_000": 3}, "groups must be non-empty strings"),
        (["r0_000"], "groups must map case ids to group names"),
    ],
)
def test_invalid_groups(groups: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        region_stratified_splits(_cases({0: 6}), 3, groups=groups)  # type: ignore[arg-type]


def test_splits_for_cases_uses_the_recorded_sources() -> None:
    case_regions, groups = _split_mode(6)
    dataset_json = {
        "labels": {"background": 0, "liver": 1, "bladder": 2},
        "lorkd": {
            "regions": [{"name": "abdomen", "labels": ["liver"]}, {"name": "pelvis", "labels": ["bladder"]}],
            "case_regions": {c: ("abdomen", "pelvis")[r] for c, r in case_regions.items()},
            "case_sources": groups,
        },
    }
    region_map = RegionMap.from_dataset_json(dataset_json)
    splits = splits_for_cases(region_map, reversed(list(case_regions)), num_folds=3)
    _check_partition(splits, case_regions)
    _check_groups_kept(splits, groups)
    assert splits == region_stratified_splits(case_regions, 3, groups=groups)
    # without a record every case is its own patient (the behaviour of datasets merged before the record)
    del dataset_json["lorkd"]["case_sources"]
    plain = splits_for_cases(RegionMap.from_dataset_json(dataset_json), case_regions, num_folds=3)
    assert plain == region_stratified_splits(case_regions, 3)
