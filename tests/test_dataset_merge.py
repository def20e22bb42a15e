"""lorkd-merge on tiny synthetic nnU-Net raw datasets: union labels, voxel-exact remapping, geometry, the
``dataset`` key, the lorkd section, split mode, splits, every error case (and that errors leave nothing
behind), and (slow) parallel label rewriting and that nnU-Net plans and preprocesses the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_lorkd.dataset_merge import main
from nnunetv2_lorkd.folds import stratified_splits_with_warnings
from nnunetv2_lorkd.regions import RegionMap

SPACING = (0.75, 0.8, 3.0)  # x, y, z: anisotropic
ORIGIN = (12.5, -7.25, 40.0)
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)  # rotated 30 degrees about z
SIZE = (12, 12, 8)  # x, y, z -> numpy (8, 12, 12)

ABDOMEN = {"background": 0, "liver": 1, "spleen": 2, "urinary_bladder": 3}
PELVIS = {"background": 0, "urinary_bladder": 1, "femur_left": 2, "femur_right": 3}
THORAX = {"background": 0, "lung": 1, "heart": 2}
UNION = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "urinary_bladder": 3,
    "femur_left": 4,
    "femur_right": 5,
    "lung": 6,
    "heart": 7,
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def nn_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """nnU-Net's three folders in tmp_path (nnunetv2.paths reads the environment lazily in 2.8.1)."""
    paths = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for key, path in paths.items():
        path.mkdir()
        monkeypatch.setenv(key, str(path))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    return paths


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def make_dataset(
    raw: Path,
    dataset_id: int,
    name: str,
    labels: dict,
    cases: list[str],
    *,
    channel_names: dict | None = None,
    file_ending: str = ".nii.gz",
    seed: int = 0,
    extra_json: dict | None = None,
) -> Path:
    """imagesTr/labelsTr/dataset.json; every label value occurs in every case."""
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    channel_names = channel_names or {"0": "CT"}
    rng = np.random.default_rng(seed)
    values = sorted(v for v in labels.values() if isinstance(v, int))
    for case in cases:
        for c in range(len(channel_names)):
            data = rng.normal(size=SIZE[::-1]).astype(np.float32)
            sitk.WriteImage(_image(data), str(folder / "imagesTr" / f"{case}_{c:04d}{file_ending}"))
        seg = rng.choice(values, size=SIZE[::-1]).astype(np.uint8)
        seg.flat[: len(values)] = values
        sitk.WriteImage(_image(seg), str(folder / "labelsTr" / f"{case}{file_ending}"))
    dataset_json = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": file_ending,
        **(extra_json or {}),
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


@pytest.fixture
def three_datasets(nn_env: dict[str, Path]) -> dict[str, Path]:
    raw = nn_env["nnUNet_raw"]
    return {
        "abdomen": make_dataset(raw, 501, "Abdomen", ABDOMEN, [f"abd_{i:03d}" for i in range(4)], seed=1),
        "pelvis": make_dataset(raw, 502, "Pelvis", PELVIS, [f"pel_{i:03d}" for i in range(4)], seed=2),
        "thorax": make_dataset(raw, 503, "Thorax", THORAX, [f"tho_{i:03d}" for i in range(3)], seed=3),
    }


def merge3(nn_env: dict[str, Path], *extra: str) -> int:
    """Abdomen by id, pelvis by name, thorax by path; 3 folds so every region is in every validation fold."""
    raw = nn_env["nnUNet_raw"]
    argv = ["-i", "501", "abdomen", "-i", "Dataset502_Pelvis", "pelvis"]
    argv += ["-i", str(raw / "Dataset503_Thorax"), "thorax", "-d", "600", "-n", "Merged", "--folds", "3"]
    return main([*argv, "-np", "1", *extra])


def read(path: str | Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def resolve(folder: Path, path: str) -> Path:
    return Path(path) if os.path.isabs(path) else folder / path


def leftovers(nn_env: dict[str, Path]) -> list[str]:
    """Everything a failed merge could have left: output, hidden temp folders, preprocessed folder."""
    raw = [p.name for p in nn_env["nnUNet_raw"].iterdir() if p.name.startswith((".", "Dataset600"))]
    pre = [p.name for p in nn_env["nnUNet_preprocessed"].iterdir()]
    return raw + pre


# ------------------------------------------------------------------------------------------------ merging
def test_merge_three_datasets(three_datasets: dict[str, Path], nn_env: dict[str, Path], capsys) -> None:
    assert merge3(nn_env) == 0
    out = nn_env["nnUNet_raw"] / "Dataset600_Merged"
    dj = json.loads((out / "dataset.json").read_text())

    # union labels: shared 'urinary_bladder' has one value; consecutive in input order
    assert dj["labels"] == UNION
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["file_ending"] == ".nii.gz"
    assert dj["numTraining"] == 11 == len(dj["dataset"])

    # the lorkd section loads and is exactly RegionMap's format
    region_map = RegionMap.from_dataset_json(dj)
    assert dj["lorkd"] == region_map.to_json()
    assert region_map.names == ("abdomen", "pelvis", "thorax")
    assert region_map.regions[0].label_names == ("liver", "spleen", "urinary_bladder")
    assert region_map.regions[1].label_values == (3, 4, 5)
    assert region_map.regions[2].label_values == (6, 7)
    assert region_map.cases_of(2) == ["tho_000", "tho_001", "tho_002"]  # ids unique: kept as they are
    assert set(region_map.case_regions) == set(dj["dataset"])

    # the dataset key: images are the original files (absolute, not copied), labels exist
    assert not (out / "imagesTr").exists()
    for case, entry in dj["dataset"].items():
        source = three_datasets[region_map.names[region_map.region_of_case(case)]]
        assert entry["images"] == [str(source / "imagesTr" / f"{case}_0000.nii.gz")]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in entry["images"])
        assert resolve(out, entry["label"]).is_file()
    # abdomen already has the union values: its original label files are used; the others are rewritten
    assert dj["dataset"]["abd_000"]["label"] == str(three_datasets["abdomen"] / "labelsTr" / "abd_000.nii.gz")
    assert dj["dataset"]["pel_000"]["label"] == "labelsTr/pel_000.nii.gz"
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        *(f"pel_{i:03d}.nii.gz" for i in range(4)),
        *(f"tho_{i:03d}.nii.gz" for i in range(3)),
    ]

    stdout = capsys.readouterr().out
    assert str(nn_env["nnUNet_preprocessed"] / "Dataset600_Merged" / "splits_final.json") in stdout
    assert str(out / "splits_final.json") in stdout
    assert "expert 1: pelvis: 4 cases, labels urinary_bladder=3, femur_left=4, femur_right=5" in stdout


def test_labels_remapped_voxel_exactly_and_geometry_kept(
    three_datasets: dict[str, Path], nn_env: dict[str, Path]
) -> None:
    assert merge3(nn_env) == 0
    out = nn_env["nnUNet_raw"] / "Dataset600_Merged"
    dj = json.loads((out / "dataset.json").read_text())
    mappings = {"pel": {0: 0, 1: 3, 2: 4, 3: 5}, "tho": {0: 0, 1: 6, 2: 7}, "abd": {0: 0, 1: 1, 2: 2, 3: 3}}
    for case, entry in dj["dataset"].items():
        region = {"abd": "abdomen", "pel": "pelvis", "tho": "thorax"}[case[:3]]
        original, original_image = read(three_datasets[region] / "labelsTr" / f"{case}.nii.gz")
        merged, merged_image = read(resolve(out, entry["label"]))
        lut = np.zeros(256, dtype=np.uint8)
        for old, new in mappings[case[:3]].items():
            lut[old] = new
        np.testing.assert_array_equal(merged, lut[original])
        assert merged.dtype == np.uint8
        for image in (merged_image, read(entry["images"][0])[1]):
            assert image.GetSize() == SIZE
            np.testing.assert_allclose(image.GetSpacing(), SPACING, rtol=0, atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), ORIGIN, rtol=0, atol=1e-5)
            np.testing.assert_allclose(image.GetDirection(), DIRECTION, rtol=0, atol=1e-6)
        # and exactly the geometry of the label file it replaces
        assert merged_image.GetSpacing() == original_image.GetSpacing()
        assert merged_image.GetOrigin() == original_image.GetOrigin()
        assert merged_image.GetDirection() == original_image.GetDirection()


def test_splits_stratified_and_deterministic(
    three_datasets: dict[str, Path], nn_env: dict[str, Path]
) -> None:
    assert merge3(nn_env) == 0
    out = nn_env["nnUNet_raw"] / "Dataset600_Merged"
    pre = nn_env["nnUNet_preprocessed"] / "Dataset600_Merged" / "splits_final.json"
    splits = json.loads(pre.read_text())
    assert splits == json.loads((out / "splits_final.json").read_text())
    dj = json.loads((out / "dataset.json").read_text())
    region_map = RegionMap.from_dataset_json(dj)
    assert len(splits) == 3
    assert sorted(c for fold in splits for c in fold["val"]) == sorted(dj["dataset"])
    for fold in splits:
        assert {region_map.region_of_case(c) for c in fold["val"]} == {0, 1, 2}
        assert sorted(fold["train"] + fold["val"]) == sorted(dj["dataset"])

    # same inputs -> same splits; --overwrite replaces the dataset in place
    (out / "stale.txt").write_text("from the previous merge")
    assert merge3(nn_env, "--overwrite") == 0
    assert json.loads(pre.read_text()) == splits
    assert not (out / "stale.txt").exists()
    assert merge3(nn_env, "--overwrite", "--seed", "1") == 0
    assert json.loads(pre.read_text()) != splits


def test_without_preprocessed_env_only_the_raw_copy(
    three_datasets: dict[str, Path], nn_env: dict[str, Path], monkeypatch, capsys
) -> None:
    monkeypatch.delenv("nnUNet_preprocessed")
    assert merge3(nn_env) == 0
    assert (nn_env["nnUNet_raw"] / "Dataset600_Merged" / "splits_final.json").is_file()
    assert list(nn_env["nnUNet_preprocessed"].iterdir()) == []
    assert "nnUNet_preprocessed is not set: copy" in capsys.readouterr().out


def test_split_one_dataset_into_regions(nn_env: dict[str, Path], capsys) -> None:
    labels = {"background": 0, "liver": 1, "spleen": 2, "urinary_bladder": 3, "femur_left": 4, "lung": 5}
    source = make_dataset(nn_env["nnUNet_raw"], 510, "Whole", labels, [f"c{i}" for i in range(4)], seed=4)
    argv = ["-i", "510", "--region", "pelvis=urinary_bladder,femur_left", "--region", "abdomen=spleen,liver"]
    assert main([*argv, "-d", "600", "-n", "Split", "--folds", "2", "-np", "1"]) == 0
    out = nn_env["nnUNet_raw"] / "Dataset600_Split"
    dj = json.loads((out / "dataset.json").read_text())
    # region order = command-line order; label values in that order; labels within a region by source value
    assert dj["labels"] == {"background": 0, "urinary_bladder": 1, "femur_left": 2, "liver": 3, "spleen": 4}
    region_map = RegionMap.from_dataset_json(dj)
    assert region_map.names == ("pelvis", "abdomen")
    assert region_map.regions[1].label_names == ("liver", "spleen")
    assert sorted(dj["dataset"]) == sorted(f"c{i}_{r}" for i in range(4) for r in ("abdomen", "pelvis"))
    assert region_map.region_of_case("c0_abdomen") == 1
    for i in range(4):
        original, _ = read(source / "labelsTr" / f"c{i}.nii.gz")
        abdomen = dj["dataset"][f"c{i}_abdomen"]
        pelvis = dj["dataset"][f"c{i}_pelvis"]
        assert abdomen["images"] == pelvis["images"] == [str(source / "imagesTr" / f"c{i}_0000.nii.gz")]
        lut_abd = np.array([0, 3, 4, 0, 0, 0], dtype=np.uint8)  # liver->3, spleen->4, the rest -> 0
        lut_pel = np.array([0, 0, 0, 1, 2, 0], dtype=np.uint8)
        np.testing.assert_array_equal(read(resolve(out, abdomen["label"]))[0], lut_abd[original])
        np.testing.assert_array_equal(read(resolve(out, pelvis["label"]))[0], lut_pel[original])
    assert "labels ['lung'] of Dataset510_Whole are in no region" in capsys.readouterr().err


def test_split_mode_keeps_each_source_case_in_one_fold(nn_env: dict[str, Path]) -> None:
    """Split mode makes <case>_<region> copies of one image: no fold may train on one copy and validate on
    another (issue 15, defect 4)."""
    labels = {"background": 0, "liver": 1, "spleen": 2, "urinary_bladder": 3, "femur_left": 4}
    make_dataset(nn_env["nnUNet_raw"], 503, "Whole", labels, [f"case{i}" for i in range(11)], seed=5)
    argv = ["-i", "503", "--region", "abdomen=liver,spleen", "--region", "pelvis=urinary_bladder,femur_left"]
    assert main([*argv, "-d", "601", "-n", "LoRKDSplit", "-np", "1"]) == 0
    out = nn_env["nnUNet_raw"] / "Dataset601_LoRKDSplit"
    dj = json.loads((out / "dataset.json").read_text())
    region_map = RegionMap.from_dataset_json(dj)
    assert dj["lorkd"] == region_map.to_json()
    assert region_map.case_sources == {
        f"case{i}_{r}": f"Dataset503_Whole/case{i}" for i in range(11) for r in ("abdomen", "pelvis")
    }
    for path in (out / "splits_final.json", nn_env["nnUNet_preprocessed"] / out.name / "splits_final.json"):
        splits = json.loads(path.read_text())
        assert len(splits) == 5
        for fold in splits:
            train = {region_map.case_sources[c] for c in fold["train"]}
            val = {region_map.case_sources[c] for c in fold["val"]}
            assert not train & val, f"{path}: source cases {sorted(train & val)} in train and val of a fold"
            assert {region_map.region_of_case(c) for c in fold["val"]} == {0, 1}  # still stratified
        assert sorted(c for fold in splits for c in fold["val"]) == sorted(dj["dataset"])


def test_merge_mode_splits_unchanged_and_sources_recorded(
    three_datasets: dict[str, Path], nn_env: dict[str, Path]
) -> None:
    """Separate datasets are separate patients: the sources are recorded, and the splits are exactly the
    ungrouped region-stratified ones."""
    assert merge3(nn_env) == 0
    out = nn_env["nnUNet_raw"] / "Dataset600_Merged"
    dj = json.loads((out / "dataset.json").read_text())
    region_map = RegionMap.from_dataset_json(dj)
    assert region_map.case_sources["abd_001"] == "Dataset501_Abdomen/abd_001"
    assert region_map.case_sources["tho_002"] == "Dataset503_Thorax/tho_002"
    assert len(set(region_map.case_sources.values())) == len(dj["dataset"])
    expected, _ = stratified_splits_with_warnings(dict(region_map.case_regions), 3, 12345)
    assert json.loads((out / "splits_final.json").read_text()) == expected


def test_same_dataset_twice_with_label_subsets_via_input(nn_env: dict[str, Path]) -> None:
    """`-i DS region:LABELS` repeated is the same as --region."""
    make_dataset(nn_env["nnUNet_raw"], 510, "Whole", ABDOMEN, [f"c{i}" for i in range(4)])
    argv = ["-i", "510", "a:liver", "-i", "Dataset510_Whole", "b=spleen,urinary_bladder"]
    assert main([*argv, "-d", "600", "-n", "Split", "--folds", "2", "-np", "1"]) == 0
    dj = json.loads((nn_env["nnUNet_raw"] / "Dataset600_Split" / "dataset.json").read_text())
    assert dj["lorkd"]["regions"] == [
        {"name": "a", "labels": ["liver"]},
        {"name": "b", "labels": ["spleen", "urinary_bladder"]},
    ]
    assert "c3_b" in dj["dataset"]


def test_colliding_case_ids_get_region_prefixes(nn_env: dict[str, Path]) -> None:
    raw = nn_env["nnUNet_raw"]
    make_dataset(raw, 501, "Abdomen", ABDOMEN, ["case_0", "case_1", "case_2"])
    make_dataset(raw, 502, "Pelvis", PELVIS, ["case_0", "case_1", "other"])
    assert (
        main(["-i", "501", "abd", "-i", "502", "pel", "-d", "600", "-n", "M", "--folds", "2", "-np", "1"])
        == 0
    )
    dj = json.loads((raw / "Dataset600_M" / "dataset.json").read_text())
    # one collision -> every case is prefixed, so ids stay uniform
    assert sorted(dj["dataset"]) == [
        "abd_case_0",
        "abd_case_1",
        "abd_case_2",
        "pel_case_0",
        "pel_case_1",
        "pel_other",
    ]
    assert dj["lorkd"]["case_regions"]["pel_other"] == "pel"


def test_case_prefix_always(three_datasets: dict[str, Path], nn_env: dict[str, Path]) -> None:
    assert merge3(nn_env, "--case-prefix", "always") == 0
    dj = json.loads((nn_env["nnUNet_raw"] / "Dataset600_Merged" / "dataset.json").read_text())
    assert all(case.startswith(region + "_") for case, region in dj["lorkd"]["case_regions"].items())
    assert "thorax_tho_002" in dj["dataset"]


def test_ignore_label_and_dataset_key_input(nn_env: dict[str, Path]) -> None:
    """An input that itself uses the `dataset` key, and an ignore label that becomes the union's max + 1."""
    raw = nn_env["nnUNet_raw"]
    make_dataset(raw, 501, "Abdomen", {**ABDOMEN, "ignore": 4}, [f"a{i}" for i in range(3)])
    src = make_dataset(raw, 502, "Pelvis", PELVIS, [f"p{i}" for i in range(3)])
    moved = raw / "elsewhere"
    (src / "imagesTr").rename(moved)
    dj = json.loads((src / "dataset.json").read_text())
    dj["dataset"] = {
        f"p{i}": {"images": [f"{moved}/p{i}_0000.nii.gz"], "label": f"labelsTr/p{i}.nii.gz"} for i in range(3)
    }
    (src / "dataset.json").write_text(json.dumps(dj))
    assert (
        main(["-i", "501", "abd", "-i", "502", "pel", "-d", "600", "-n", "M", "--folds", "2", "-np", "1"])
        == 0
    )
    out = raw / "Dataset600_M"
    merged = json.loads((out / "dataset.json").read_text())
    assert merged["labels"] == {**{k: v for k, v in UNION.items() if v <= 5}, "ignore": 6}
    assert merged["dataset"]["p1"]["images"] == [str(moved / "p1_0000.nii.gz")]
    original, _ = read(raw / "Dataset501_Abdomen" / "labelsTr" / "a0.nii.gz")
    remapped, _ = read(out / merged["dataset"]["a0"]["label"])
    np.testing.assert_array_equal(remapped, np.array([0, 1, 2, 3, 6], dtype=np.uint8)[original])
    assert RegionMap.from_dataset_json(merged).all_labels == {k: v for k, v in UNION.items() if v <= 5}


def test_help(capsys) -> None:
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "-i DATASET [REGION[:LABELS] ...]" in help_text and "--region REGION=LABEL[,LABEL...]" in help_text
    assert "lorkd-merge -i 503 --region abdomen=liver,spleen" in help_text


@pytest.mark.slow
def test_parallel_rewrite(three_datasets: dict[str, Path], nn_env: dict[str, Path]) -> None:
    """-np 2: label files are rewritten by spawned worker processes (each imports torch: ~10 s)."""
    raw = nn_env["nnUNet_raw"]
    argv = ["-i", "501", "abdomen", "-i", "502", "pelvis", "-i", "503", "thorax", "-d", "600", "-n", "Merged"]
    assert main([*argv, "--folds", "3", "-np", "2"]) == 0
    out = raw / "Dataset600_Merged"
    dj = json.loads((out / "dataset.json").read_text())
    assert len(list((out / "labelsTr").iterdir())) == 7
    original, _ = read(three_datasets["thorax"] / "labelsTr" / "tho_001.nii.gz")
    np.testing.assert_array_equal(
        read(out / dj["dataset"]["tho_001"]["label"])[0], np.array([0, 6, 7], dtype=np.uint8)[original]
    )


# ------------------------------------------------------------------------------------------------ errors
def _bad_labels(nn_env: dict[str, Path]) -> list[str]:
    make_dataset(nn_env["nnUNet_raw"], 504, "Bad", {"background": 0, "liver": 1, "hepar": 1}, ["b0", "b1"])
    return ["-i", "504", "bad"]


def _region_based(nn_env: dict[str, Path]) -> list[str]:
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    make_dataset(
        nn_env["nnUNet_raw"], 504, "Reg", labels, ["b0", "b1"], extra_json={"regions_class_order": [1, 2]}
    )
    return ["-i", "504", "reg"]


def _mri(nn_env: dict[str, Path]) -> list[str]:
    make_dataset(nn_env["nnUNet_raw"], 504, "MRI", THORAX, ["b0", "b1"], channel_names={"0": "T2"})
    return ["-i", "504", "mri"]


def _nrrd(nn_env: dict[str, Path]) -> list[str]:
    make_dataset(nn_env["nnUNet_raw"], 504, "Nrrd", THORAX, ["b0", "b1"], file_ending=".nrrd")
    return ["-i", "504", "nrrd"]


def _stray_value(nn_env: dict[str, Path]) -> list[str]:
    """Discovered only while rewriting label files, i.e. after the temporary folder was created."""
    folder = make_dataset(nn_env["nnUNet_raw"], 504, "Stray", THORAX, ["b0", "b1", "b2"])
    array, image = read(folder / "labelsTr" / "b2.nii.gz")
    array[0, 0, 0] = 9
    stray = sitk.GetImageFromArray(array)
    stray.CopyInformation(image)
    sitk.WriteImage(stray, str(folder / "labelsTr" / "b2.nii.gz"))
    return ["-i", "504", "stray"]


def _existing(name: str):
    def make(nn_env: dict[str, Path]) -> list[str]:
        (nn_env["nnUNet_raw"] / name).mkdir()
        return []

    return make


GOOD = ["-i", "501", "abdomen", "-i", "502", "pelvis"]
ERRORS = {
    "duplicate value": (_bad_labels, GOOD, "label value 1 has two names, 'liver' and 'hepar'"),
    "region-based labels": (_region_based, GOOD, "region-based labels"),
    "channel names": (
        _mri,
        GOOD,
        "channel names differ: Dataset501_Abdomen has {'0': 'CT'} but Dataset504_MRI has {'0': 'T2'}",
    ),
    "file endings": (
        _nrrd,
        GOOD,
        "file endings differ: Dataset501_Abdomen has '.nii.gz' but Dataset504_Nrrd",
    ),
    "stray label value": (_stray_value, GOOD, "contains value(s) [9] that Dataset504_Stray/dataset.json"),
    "case in no region": (None, ["-i", "501", "-i", "502", "pelvis"], "input '501' has no region"),
    "unknown id": (None, ["-i", "501", "abdomen", "-i", "999", "x"], "input dataset '999' not found"),
    "unknown name": (
        None,
        ["-i", "Dataset777_Nope", "x"],
        "available: Dataset501_Abdomen, Dataset502_Pelvis",
    ),
    "duplicate region": (
        None,
        ["-i", "501", "abdomen", "-i", "502", "abdomen"],
        "region 'abdomen' is given twice",
    ),
    "unknown label": (
        None,
        ["-i", "501", "--region", "abd=liver,kidney"],
        "Dataset501_Abdomen has no label(s) ['kidney']; valid labels are ['liver', 'spleen', "
        "'urinary_bladder']",
    ),
    "--region without a bare input": (
        None,
        [*GOOD, "--region", "x=liver"],
        "--region splits exactly one input",
    ),
    "bad region name": (None, ["-i", "501", "ab domen"], "region name 'ab domen' is not valid"),
    "existing id": (_existing("Dataset600_Other"), GOOD, "dataset id 600 already exists under nnUNet_raw"),
    "too few cases for the folds": (
        None,
        [*GOOD, "--folds", "9"],
        "cannot build the cross-validation splits",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_clear_and_leave_nothing(
    case: str, three_datasets, nn_env: dict[str, Path], capsys
) -> None:
    setup, argv, message = ERRORS[case]
    if setup is not None:
        argv = [*argv, *setup(nn_env)]
    rc = main([*argv, "-d", "600", "-n", "Merged", "-np", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lorkd-merge: error: ") and err.count("\n") == 1
    assert message in err
    expected = ["Dataset600_Other"] if case == "existing id" else []
    assert leftovers(nn_env) == expected


def test_overwrite_refuses_another_name_and_an_input(three_datasets, nn_env: dict[str, Path], capsys) -> None:
    (nn_env["nnUNet_raw"] / "Dataset600_Other").mkdir()
    assert merge3(nn_env, "--overwrite") == 2
    assert "is used by another dataset name" in capsys.readouterr().err
    argv = ["-i", "501", "abdomen", "-i", "502", "pelvis", "-d", "502", "-n", "Pelvis", "--overwrite"]
    assert main(argv) == 2
    assert "output id 502 is the id of input dataset Dataset502_Pelvis" in capsys.readouterr().err
    (nn_env["nnUNet_raw"] / "Dataset600_Other").rmdir()
    (nn_env["nnUNet_preprocessed"] / "Dataset600_Old").mkdir()
    assert merge3(nn_env) == 2
    assert "Dataset600_Old" in capsys.readouterr().err


def test_unset_nnunet_raw(nn_env: dict[str, Path], monkeypatch, capsys) -> None:
    monkeypatch.delenv("nnUNet_raw")
    assert main(["-i", "501", "abdomen", "-d", "600", "-n", "M"]) == 2
    assert "nnUNet_raw is not set; lorkd-merge reads the input datasets from it" in capsys.readouterr().err


def test_usage_error_exit_code(capsys) -> None:
    assert main(["-i", "501", "abdomen"]) == 2  # -d/-n missing: argparse's own message
    assert "required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ nnU-Net
@pytest.mark.slow
def test_nnunet_plans_and_preprocesses_the_merged_dataset(three_datasets, nn_env: dict[str, Path]) -> None:
    bin_dir = Path(sys.executable).parent
    # nnUNet_n_proc_DA=0 (scripts/_env.sh's default) breaks planning in 2.8.1: torch.set_num_threads(0)
    env = {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    merge = subprocess.run(
        [bin_dir / "lorkd-merge", "-i", "501", "abdomen", "-i", "502", "pelvis", "-i", "503", "thorax",
         "-d", "600", "-n", "Merged", "--folds", "3", "-np", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert merge.returncode == 0, merge.stderr
    result = subprocess.run(
        [bin_dir / "nnUNetv2_plan_and_preprocess", "-d", "600", "-c", "3d_fullres",
         "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verify_dataset_integrity Done" in result.stdout
    pre = nn_env["nnUNet_preprocessed"] / "Dataset600_Merged"
    pre_dj = json.loads((pre / "dataset.json").read_text())
    raw_dj = json.loads((nn_env["nnUNet_raw"] / "Dataset600_Merged" / "dataset.json").read_text())
    assert pre_dj["lorkd"] == raw_dj["lorkd"]
    assert RegionMap.from_dataset_json(pre_dj).names == ("abdomen", "pelvis", "thorax")
    data = pre / "nnUNetPlans_3d_fullres"
    assert sorted(p.name.split(".")[0] for p in data.glob("*.pkl")) == sorted(raw_dj["dataset"])
    # preprocessing keeps our splits
    splits = json.loads((pre / "splits_final.json").read_text())
    assert splits == json.loads(
        (nn_env["nnUNet_raw"] / "Dataset600_Merged" / "splits_final.json").read_text()
    )
