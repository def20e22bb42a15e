"""lorkd-data: the slab split (no test voxel is trained on), resampling, the download cache, and the dataset
builder — on a SYNTHETIC stand-in scan with the real layout (no network), and on the real public scans when
they can be fetched (cache shared with lorkd-demo; skipped where neither cache nor network is available)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_lorkd.data import build as build_module
from nnunetv2_lorkd.data.build import DataBuildError, build_datasets
from nnunetv2_lorkd.data.scans import REGIONS, RegionSpec
from nnunetv2_lorkd.data.slabs import Part, Slab, SplitError, check_disjoint, cut_case_slabs, slab_plan
from nnunetv2_lorkd.data.sources import (
    Archive,
    SourceError,
    SourceUnavailableError,
    fetch_archive_files,
)
from nnunetv2_lorkd.data.volumes import LabelledVolume, VolumeError, onto_grid, resample
from nnunetv2_lorkd.regions import RegionMap


# --------------------------------------------------------------------------------------------------- split
def test_slab_plan_follows_the_layout_in_mm() -> None:
    layout = (("train", 60), ("gap", 6), ("test", 24), ("gap", 6))
    slabs = slab_plan(52, layout, spacing_z=3.0)  # 20 | 2 | 8 | 2 | 20 (cut by the end)
    assert slabs == [Slab("train", 0, 20), Slab("test", 22, 30), Slab("train", 32, 52)]
    # on 10 mm slices the 6 mm gaps round to one slice, 24 mm to two
    assert slab_plan(12, layout, spacing_z=10.0) == [Slab("train", 0, 6), Slab("test", 7, 9), Slab("train", 10, 12)]


def test_slab_plan_refuses_layouts_where_train_touches_test() -> None:
    with pytest.raises(SplitError, match="touches"):
        slab_plan(20, (("train", 5), ("test", 5)), 1.0)
    with pytest.raises(SplitError, match="touches"):  # the repeat puts test right before train
        slab_plan(20, (("train", 5), ("gap", 1), ("test", 5)), 1.0)
    with pytest.raises(SplitError, match="at least one train and one test"):
        slab_plan(20, (("train", 5), ("gap", 1)), 1.0)


def test_training_slabs_are_cut_into_disjoint_consecutive_cases() -> None:
    pieces = cut_case_slabs(Slab("train", 10, 39), max_slices=10)
    assert pieces == [Slab("train", 10, 20), Slab("train", 20, 29), Slab("train", 29, 39)]
    assert cut_case_slabs(Slab("train", 0, 5), max_slices=10) == [Slab("train", 0, 5)]


def test_check_disjoint_across_regions_of_one_scan() -> None:
    ok = [
        Part("pelvis_tr", "pelvis", "ct", "train", (0.0, 30.0)),
        Part("pelvis_ts", "pelvis", "ct", "test", (33.0, 40.0)),
        Part("abdomen_tr", "abdomen", "ct", "train", (43.0, 90.0)),
        Part("other_tr", "thorax", "other_scan", "train", (33.0, 40.0)),  # another scan may overlap in mm
    ]
    check_disjoint(ok)
    with pytest.raises(SplitError, match="abdomen_tr2"):  # another region's training slab inside the test slab
        check_disjoint([*ok, Part("abdomen_tr2", "abdomen", "ct", "train", (39.0, 42.0))])
    with pytest.raises(SplitError, match=r"0\.0 mm apart"):  # touching is not separated
        check_disjoint([*ok, Part("abdomen_tr3", "abdomen", "ct", "train", (40.0, 42.0))])


# ----------------------------------------------------------------------------------------------- volumes
def _volume(image: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 1.0), names=("a", "b")) -> LabelledVolume:
    return LabelledVolume("scan", image.astype(np.float32), labels.astype(np.uint8), names, spacing, (10.0, 20.0, 30.0),
                          (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))  # fmt: skip


def test_resample_by_whole_factors_averages_blocks_and_takes_the_majority_label() -> None:
    image = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    labels = np.array([1, 1, 1, 0, 2, 2, 1, 1, 0, 0, 2, 1, 1, 1, 0, 0]).reshape(4, 2, 2)
    out = resample(_volume(image, labels, spacing=(1.5, 1.5, 1.0)), coarsest=3.0)  # x, y: 1.5 -> 3; z: 1 -> 3
    assert out.spacing == (3.0, 3.0, 3.0) and out.shape == (1, 1, 1)  # z: 4 // 3 = 1 block, one slice dropped
    assert out.image[0, 0, 0] == pytest.approx(image[:3].mean())
    counts = np.bincount(labels[:3].ravel(), minlength=3)  # 0: 3, 1: 6, 2: 3
    assert out.labels[0, 0, 0] == counts.argmax() == 1
    # the centre of the new voxel is the centre of its block of source voxels
    np.testing.assert_allclose(out.origin, (10.0 + 0.75, 20.0 + 0.75, 30.0 + 1.0))
    tie = resample(_volume(np.zeros((2, 1, 1)), np.array([2, 1]).reshape(2, 1, 1), (2.0, 2.0, 1.0)), coarsest=2.0)
    assert tie.labels.item() == 1  # a tie goes to the lower label
    same = _volume(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), spacing=(3.0, 3.0, 10.0))
    assert resample(same, 3.0) is same  # coarser axes are never upsampled


def test_resample_by_other_factors_interpolates() -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:9, 3:9, 3:9] = 1
    image = labels * 100.0
    out = resample(_volume(image, labels), coarsest=1.5)
    assert out.shape == (8, 8, 8) and out.spacing == (1.5, 1.5, 1.5)
    assert out.labels[4, 4, 4] == 1 and out.labels[0, 0, 0] == 0
    assert out.labels.sum() == pytest.approx(labels.sum() / 1.5**3, rel=0.35)


def test_onto_grid_copies_whole_voxel_shifts_and_refuses_the_rest() -> None:
    reference = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    reference.SetSpacing((1.5, 1.5, 1.5))
    crop = sitk.Image(3, 3, 3, sitk.sitkUInt8)
    crop.SetSpacing((1.5, 1.5, 1.5))
    crop.SetOrigin((3.0, 1.5, 0.0))  # index offset (2, 1, 0)
    crop[1, 1, 1] = 1
    mapped = onto_grid(crop, reference, "crop")
    assert mapped.sum() == 1 and mapped[1, 2, 3] == 1  # (z, y, x) = (0+1, 1+1, 2+1)
    crop.SetOrigin((3.2, 1.5, 0.0))
    with pytest.raises(VolumeError, match="not whole voxels"):
        onto_grid(crop, reference, "crop")
    crop.SetOrigin((10.5, 1.5, 0.0))  # x index 7..9: the labelled voxel (x 8) falls outside
    with pytest.raises(VolumeError, match="fall outside"):
        onto_grid(crop, reference, "crop")


# ----------------------------------------------------------------------------------------------- sources
def _archive(files: dict[str, bytes], kind: str, tmp: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    members = {name: (f"pkg-1.0/data/{name}", hashlib.sha256(data).hexdigest()) for name, data in files.items()}
    if kind == "tar.gz":
        path = tmp / "pkg-1.0.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(members[name][0])
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    elif kind == "whl":
        path = tmp / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(members[name][0], data)
    else:  # a Debian package: ar archive with debian-binary, control.tar.xz, data.tar.xz ('./'-prefixed members)
        data_tar = io.BytesIO()
        with tarfile.open(fileobj=data_tar, mode="w:xz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo("./" + members[name][0])
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        path = tmp / "pkg_1.0_all.deb"
        with open(path, "wb") as fh:
            fh.write(b"!<arch>\n")
            for member, payload in (("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"),
                                    ("data.tar.xz", data_tar.getvalue())):  # fmt: skip
                fh.write(f"{member:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode())
                fh.write(payload + (b"\n" if len(payload) % 2 else b""))
    return path, members


@pytest.mark.parametrize("kind", ["tar.gz", "whl", "deb"])
def test_fetch_checks_caches_and_works_offline(tmp_path: Path, kind: str) -> None:
    files = {"a.nii.gz": b"first file", "sub/b.txt": b"second"}
    archive_path, members = _archive(files, kind, tmp_path)
    calls: list[Path] = []

    def downloader(dest: Path) -> Path:
        calls.append(dest)
        (dest / archive_path.name).write_bytes(archive_path.read_bytes())
        return dest / archive_path.name

    def offline(dest: Path) -> Path:
        raise SourceUnavailableError("no network")

    sha = None if kind == "deb" else hashlib.sha256(archive_path.read_bytes()).hexdigest()
    archive = Archive("pkg-1.0", "test package", members, sha, downloader)
    paths = fetch_archive_files(archive, tmp_path / "cache")
    assert {n: p.read_bytes() for n, p in paths.items()} == files and len(calls) == 1
    assert fetch_archive_files(archive, tmp_path / "cache", offline) == paths  # offline from the cache
    paths["sub/b.txt"].write_bytes(b"damaged")
    fetch_archive_files(archive, tmp_path / "cache")  # a damaged file is fetched again
    assert paths["sub/b.txt"].read_bytes() == b"second" and len(calls) == 2
    leftovers = [p for p in (tmp_path / "cache" / "pkg-1.0").rglob("*") if p.is_file()]
    assert sorted(p.relative_to(tmp_path / "cache" / "pkg-1.0").as_posix() for p in leftovers) == sorted(files)
    with pytest.raises(SourceUnavailableError):
        fetch_archive_files(archive, tmp_path / "cache2", offline)
    bad_member = Archive(
        "pkg-1.0", "test", {**members, "a.nii.gz": (members["a.nii.gz"][0], "0" * 64)}, sha, downloader
    )
    with pytest.raises(SourceError, match="not its pinned"):
        fetch_archive_files(bad_member, tmp_path / "cache3")
    assert not (tmp_path / "cache3" / "pkg-1.0" / "a.nii.gz").exists()
    if sha is not None:
        with pytest.raises(SourceError, match="is not the pinned"):
            fetch_archive_files(Archive("pkg-1.0", "test", members, "f" * 64, downloader), tmp_path / "cache4")


# ------------------------------------------------------------------------------- builder on a stand-in scan
def _stand_in_scan(scan_id: str, z0: int, z1: int, classes: tuple[str, ...]) -> LabelledVolume:
    """SYNTHETIC stand-in for a real scan: 40 slices of 3 mm, one z-long tube per class, the last class only in
    the top slices (so the test split cannot reach it and the builder must drop it)."""
    shape = (40, 16, 16)
    image = np.random.default_rng(0).normal(0, 20, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    for index, _ in enumerate(classes, start=1):
        labels[:, 2 * index : 2 * index + 2, 4:10] = index
    labels[:37][labels[:37] == len(classes)] = 0  # the last class only in z 37..39
    image[labels > 0] += 100.0
    volume = LabelledVolume(scan_id, image, labels, classes, (3.0, 3.0, 3.0), (0.0, 0.0, -60.0),
                            (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))  # fmt: skip
    return volume.slab(z0, z1)


def _fake_regions() -> dict[str, RegionSpec]:
    archive = Archive("none", "SYNTHETIC stand-in", {}, None, lambda dest: dest)
    layout = (("train", 30), ("gap", 3), ("test", 15), ("gap", 3))
    return {
        # two regions cut from one stand-in scan, with one slice between them (as abdomen/pelvis)
        "lower": RegionSpec("lower", "CT", archive, lambda f: _stand_in_scan("one", 0, 19, ("bone", "muscle")),
                            layout, "stand-in labels: SYNTHETIC", "stand-in scan one, z 0-18"),
        "upper": RegionSpec("upper", "CT", archive, lambda f: _stand_in_scan("one", 20, 40, ("organ", "vessel", "top")),
                            layout, "stand-in labels: SYNTHETIC", "stand-in scan one, z 20-39"),
        "optional": RegionSpec("optional", "MR", Archive("never", "x", {"f": ("m", "0" * 64)}, None, _unavailable),
                               lambda f: _stand_in_scan("two", 0, 40, ("x",)), layout, "n", "s", optional=True),
    }  # fmt: skip


def _unavailable(dest: Path) -> Path:
    raise SourceUnavailableError("apt-get is not available here")


def _z_extent(path: Path) -> tuple[float, float]:
    image = sitk.ReadImage(str(path))
    z0 = image.GetOrigin()[2]
    return (z0 - image.GetSpacing()[2] / 2, z0 + (image.GetSize()[2] - 0.5) * image.GetSpacing()[2])


def test_build_on_a_synthetic_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "REGIONS", _fake_regions())
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    raw = tmp_path / "raw"
    logs: list[str] = []
    manifest = build_datasets(raw, ["lower", "upper", "optional"], base_id=800, cache_dir=tmp_path / "c",
                              log=logs.append)  # fmt: skip
    assert manifest["regions"] == ["lower", "upper"] and "apt-get" in manifest["skipped_regions"]["optional"]
    assert any("SKIPPING the optional region optional" in line for line in logs)
    lower, upper = raw / "Dataset801_LoRKDLower", raw / "Dataset802_LoRKDUpper"
    info = json.loads((upper / "lorkd_data.json").read_text())
    assert info["classes"] == ["organ", "vessel"] and "top" in info["dropped_classes"]
    assert json.loads((upper / "dataset.json").read_text())["labels"] == {"background": 0, "organ": 1, "vessel": 2}
    splits = json.loads((upper / "splits_final.json").read_text())
    assert splits == [{"train": info["train_cases"], "val": info["validation_case"]}]
    train_info = [c for c in info["cases"] if c["split"] == "train"]
    assert info["validation_case"] == [build_module.validation_case(train_info)]
    # read back every written case: test parts never overlap or touch a training part of the same scan
    extents = {
        (split, p.name): _z_extent(p)
        for folder in (lower, upper)
        for split, sub in (("train", "imagesTr"), ("test", "imagesTs"))
        for p in (folder / sub).glob("*.nii.gz")
    }
    assert {s for s, _ in extents} == {"train", "test"}
    for (split, name), (a0, a1) in extents.items():
        for (other, other_name), (b0, b1) in extents.items():
            if split == "test" and other == "train":
                assert a1 < b0 or b1 < a0, (name, other_name)
    for folder in (lower, upper):  # labels and images share the grid and hold only the kept labels
        for sub_img, sub_lab in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
            for image_path in (folder / sub_img).glob("*_0000.nii.gz"):
                labels = sitk.ReadImage(str(folder / sub_lab / image_path.name.replace("_0000", "")))
                assert labels.GetSize() == sitk.ReadImage(str(image_path)).GetSize()
                assert sitk.GetArrayFromImage(labels).max() <= len(
                    json.loads((folder / "lorkd_data.json").read_text())["classes"]
                )
    merged = raw / manifest["merged"]
    merged_json = json.loads((merged / "dataset.json").read_text())
    region_map = RegionMap.from_dataset_json(merged_json)
    assert region_map.names == ("lower", "upper") and set(region_map.case_regions) == {
        *json.loads((lower / "lorkd_data.json").read_text())["train_cases"], *info["train_cases"]}  # fmt: skip
    merged_splits = json.loads((merged / "splits_final.json").read_text())
    assert len(merged_splits) == 1 and set(merged_splits[0]["train"]) == set(region_map.case_regions)
    # a re-run with the same options is a no-op; other options need --overwrite
    stamp = (upper / "dataset.json").stat().st_mtime_ns
    build_datasets(raw, ["lower", "upper", "optional"], base_id=800, cache_dir=tmp_path / "c", log=logs.append)
    assert (upper / "dataset.json").stat().st_mtime_ns == stamp and "up to date" in logs[-1]
    with pytest.raises(DataBuildError, match="--overwrite"):
        build_datasets(raw, ["lower", "upper"], base_id=800, spacing=0.0, log=logs.append)
    build_datasets(raw, ["lower", "upper"], base_id=800, spacing=0.0, overwrite=True, log=logs.append)
    with pytest.raises(DataBuildError, match="unknown region"):
        build_datasets(raw, ["lower", "nowhere"], log=logs.append)


def test_a_missing_required_source_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    regions = _fake_regions()
    regions["upper"] = RegionSpec("upper", "CT", regions["optional"].archive, regions["upper"].load,
                                  regions["upper"].pattern, "n", "s")  # fmt: skip
    monkeypatch.setattr(build_module, "REGIONS", regions)
    with pytest.raises(SourceUnavailableError, match="apt-get"):
        build_datasets(tmp_path / "raw", ["lower", "upper"], cache_dir=tmp_path / "c", log=lambda s: None)
    assert not (tmp_path / "raw" / "Dataset701_LoRKDLower").exists()


# --------------------------------------------------------------------------------------- the real scans
def _fetch_or_skip(names: list[str]) -> None:
    for name in names:
        try:
            fetch_archive_files(REGIONS[name].archive)
        except SourceUnavailableError as error:
            pytest.skip(f"the real {name} sources are neither cached nor downloadable here: {error}")


def test_build_the_real_ct_regions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    regions = ["abdomen", "pelvis", "cardiovascular", "thorax"]
    _fetch_or_skip(regions)  # the user cache ($LORKD_CACHE or ~/.cache/nnunetv2_lorkd), shared with lorkd-demo
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    manifest = build_datasets(tmp_path / "raw", regions, log=print)
    assert manifest["regions"] == regions and manifest["channel_name"] == "CT"
    assert any("predictions" in n and "not manual annotations" in n for n in manifest["labels_notes"])
    expected = {
        "abdomen": {"liver", "spleen", "kidney_left", "pancreas", "gallbladder"},
        "pelvis": {"urinary_bladder", "femur_left", "hip_right", "sacrum"},
        "cardiovascular": {"heart", "aorta", "pulmonary_artery"},
        "thorax": {"lung_left", "lung_right", "ribs", "thoracic_spine"},
    }
    for region, dataset in manifest["datasets"].items():
        info = json.loads((tmp_path / "raw" / dataset / "lorkd_data.json").read_text())
        assert expected[region] <= set(info["classes"]), region
        assert len(info["train_cases"]) >= 2 and len(info["test_cases"]) >= 1
        for name in info["classes"]:  # every kept class is in both splits
            assert info["class_voxels"][name]["train"] >= 20 and info["class_voxels"][name]["test"] >= 20
    assert manifest["datasets"]["abdomen"] == "Dataset701_LoRKDAbdomen"
    check_disjoint(Part(**{**p, "z_mm": tuple(p["z_mm"])}) for p in manifest["split"]["parts"])
    # abdomen and pelvis are one scan: the lowest abdomen slab starts above the highest pelvis slab
    parts = manifest["split"]["parts"]
    assert min(p["z_mm"][0] for p in parts if p["region"] == "abdomen") > max(
        p["z_mm"][1] for p in parts if p["region"] == "pelvis")  # fmt: skip
    merged = json.loads((tmp_path / "raw" / manifest["merged"] / "dataset.json").read_text())
    region_map = RegionMap.from_dataset_json(merged)
    assert region_map.names == tuple(regions)
    # "aorta" is one class of the union, shared by the abdomen and cardiovascular experts
    aorta = merged["labels"]["aorta"]
    assert aorta in region_map.label_values(0) and aorta in region_map.label_values(2)


def test_build_the_real_brain_region_when_apt_is_available(tmp_path: Path) -> None:
    _fetch_or_skip(["brain", "abdomen"])
    manifest = build_datasets(tmp_path / "raw", ["abdomen", "brain"], log=print)
    assert manifest["channel_name"] == "zscore"  # CT and MR together: per-image z-score for every input
    info = json.loads((tmp_path / "raw" / manifest["datasets"]["brain"] / "lorkd_data.json").read_text())
    assert {"frontal_lobe", "cerebellum", "thalamus", "caudate"} <= set(info["classes"])


def test_the_validation_case_is_the_training_case_with_the_most_classes() -> None:
    # the chest CT's lowest slab: almost no lung; the monitor must be a slab that shows the region's classes
    cases = [
        {"case": "t00", "class_voxels": {"ribs": 308, "lumbar_spine": 2076, "lung_left": 19}},
        {"case": "t01", "class_voxels": {"ribs": 1915, "spine": 1402, "lung_right": 13020, "lung_left": 11546}},
        {"case": "t02", "class_voxels": {"ribs": 3536, "spine": 167, "lung_right": 6464, "lung_left": 5401}},
    ]
    assert build_module.validation_case(cases) == "t01"
    # a tie on the number of classes goes to the most labelled voxels, then to the earlier case
    a, b = {"case": "a", "class_voxels": {"x": 5}}, {"case": "b", "class_voxels": {"y": 9}}
    assert build_module.validation_case([a, b]) == "b"
    assert build_module.validation_case([{**a, "class_voxels": {"x": 9}}, b]) == "a"
