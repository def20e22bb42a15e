"""Region-stratified splits: format, stratification, determinism, small regions, input validation."""

from __future__ import annotations

import json
import logging

import pytest

from nnunetv2_lorkd.splits import region_stratified_splits, stratified_splits_with_warnings


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
    with caplog.at_level(logging.WARNING, logger="nnunetv2_lorkd.splits"):
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
