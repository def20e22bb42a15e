"""The OrganMNIST-style builder on a synthetic stand-in volume (no network), the leakage-free slab split,
the download cache, and (slow) the real TotalSegmentator example CT."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunetv2_lorkd.classification import organmnist
from nnunetv2_lorkd.classification.data import load_medmnist_npz
from nnunetv2_lorkd.classification.organmnist import (
    SlabLayout,
    SourceError,
    SourceUnavailableError,
    build_organmnist_style,
    extract_crops,
    fetch_totalsegmentator_files,
    read_class_map,
)

CLASS_MAP_SOURCE = """
class_map = {
    "total": {1: "spleen", 5: "liver", 21: "urinary_bladder", 99: "unused"},
    "total_mr": {1: "spleen"},
}
commented_out = sorted(class_map)  # not a literal: the parser must not need to run this
"""
SHAPE = (30, 26, 44)  # x, y, z; 44 slices = two periods of the default slab pattern


def _stand_in_volumes() -> tuple[np.ndarray, np.ndarray]:
    """Three organs as z-long cylinders of different size and HU, so every slab sees every class."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    seg = np.zeros(SHAPE, np.uint8)
    ct = np.full(SHAPE, -900.0, np.float32)
    for label, (cx, cy, r, hu) in {5: (8, 12, 6, 60), 1: (22, 10, 4, 45), 21: (20, 20, 3, 10)}.items():
        disk = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        seg[disk] = label
        ct[disk] = hu
    return ct, seg


def _write_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ct, seg = _stand_in_volumes()
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), folder / "example_ct.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / "example_seg_fast_force_split.nii.gz")
    (folder / "map_to_binary.py").write_text(CLASS_MAP_SOURCE)
    return folder


CLASSES = ("liver", "spleen", "urinary_bladder")


def test_slab_layout_separates_splits_by_gaps() -> None:
    runs = SlabLayout().runs(112)
    owner: dict[int, str] = {}
    for split, slabs in runs.items():
        for z0, z1 in slabs:
            assert z1 > z0
            owner.update(dict.fromkeys(range(z0, z1), split))
    assert set(owner.values()) == {"train", "val", "test"}
    for z, split in owner.items():  # a slice next to a slice of another split would leak
        assert owner.get(z + 1, split) == split


def test_crops_never_contain_voxels_of_another_split() -> None:
    _, seg = _stand_in_volumes()
    ct = np.broadcast_to(np.arange(SHAPE[2], dtype=np.float32), SHAPE).copy()  # voxel value = its z index
    layout = SlabLayout()
    crops = extract_crops(ct, seg, [5, 1, 21], layout, min_pixels=1, margin=0.5, pad_value=-1.0)
    allowed = {s: {z for z0, z1 in r for z in range(z0, z1)} for s, r in layout.runs(SHAPE[2]).items()}
    for plane, per_split in crops.items():
        for split, (images, labels) in per_split.items():
            assert images and set(labels) == {0, 1, 2}, (plane, split)
            seen = {int(v) for im in images for v in np.unique(im) if v >= 0}
            assert seen <= allowed[split], (plane, split, sorted(seen - allowed[split]))


def test_class_map_is_parsed_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "map_to_binary.py"
    path.write_text(CLASS_MAP_SOURCE + "\nraise RuntimeError('executed')\n")
    assert read_class_map(path)[21] == "urinary_bladder"
    path.write_text("x = 1\n")
    with pytest.raises(SourceError, match="no `class_map"):
        read_class_map(path)


def test_build_from_stand_in_source(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "src")
    logs: list[str] = []
    info = build_organmnist_style(tmp_path / "out", sizes=(28, 16), source_dir=source, classes=CLASSES, log=logs.append)
    assert "predictions" in info["labels_note"] and "not manual annotations" in info["labels_note"]
    for name in ("organa_ts", "organc_ts", "organs_ts", "organa_ts_16"):
        task = load_medmnist_npz(tmp_path / "out" / f"{name}.npz")
        assert task.class_names == CLASSES
        assert task.image_hw == ((16, 16) if name.endswith("_16") else (28, 28)) and task.channels == 1
        assert all(len(task.splits[s]) > 0 for s in ("train", "val", "test"))
    saved = json.loads((tmp_path / "out" / "organmnist_ts_info.json").read_text())
    assert saved["counts"]["organc_ts"]["test"]["spleen"] > 0 and saved["empty"] == []
    assert [c["totalsegmentator_id"] for c in saved["classes"]] == [5, 1, 21]
    with pytest.raises(ValueError, match="unknown TotalSegmentator class"):
        build_organmnist_style(tmp_path / "bad", source_dir=source, classes=("heart",), log=logs.append)
    with pytest.raises(ValueError, match="do not occur in the label map"):
        build_organmnist_style(tmp_path / "bad", source_dir=source, classes=("unused",), log=logs.append)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _fake_sdist(tmp_path: Path, source: Path) -> Path:
    tar_path = tmp_path / organmnist.SDIST_NAME
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, (member, _sha) in organmnist.SOURCE_FILES.items():
            data = (source / name).read_bytes()
            entry = tarfile.TarInfo(member)
            entry.size = len(data)
            tf.addfile(entry, io.BytesIO(data))
    return tar_path


def test_download_is_checked_cached_and_reused_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write_source(tmp_path / "src")
    tar_path = _fake_sdist(tmp_path, source)
    pinned = {
        name: (member, hashlib.sha256((source / name).read_bytes()).hexdigest())
        for name, (member, _sha) in organmnist.SOURCE_FILES.items()
    }
    monkeypatch.setattr(organmnist, "SOURCE_FILES", pinned)
    monkeypatch.setattr(organmnist, "SDIST_SHA256", hashlib.sha256(tar_path.read_bytes()).hexdigest())
    calls = []

    def downloader(dest: Path) -> Path:
        calls.append(dest)
        (dest / tar_path.name).write_bytes(tar_path.read_bytes())
        return dest / tar_path.name

    def offline(dest: Path) -> Path:
        raise SourceUnavailableError("no network")

    cache = tmp_path / "cache"
    paths = fetch_totalsegmentator_files(cache, downloader=downloader)
    assert len(calls) == 1 and paths["map_to_binary.py"].read_text() == CLASS_MAP_SOURCE
    assert sorted(p.name for p in paths["map_to_binary.py"].parent.iterdir()) == sorted(pinned)  # no tarball kept
    assert fetch_totalsegmentator_files(cache, downloader=offline) == paths  # offline re-run uses the cache
    paths["example_ct.nii.gz"].write_bytes(b"corrupt")  # a damaged cache is fetched again
    fetch_totalsegmentator_files(cache, downloader=downloader)
    assert len(calls) == 2
    monkeypatch.setattr(organmnist, "SDIST_SHA256", "0" * 64)
    with pytest.raises(SourceError, match="is not the pinned"):
        fetch_totalsegmentator_files(tmp_path / "cache2", downloader=downloader)
    with pytest.raises(SourceUnavailableError):
        fetch_totalsegmentator_files(tmp_path / "cache3", downloader=offline)


@pytest.mark.slow
def test_build_from_the_real_totalsegmentator_example(tmp_path: Path) -> None:
    try:
        files = fetch_totalsegmentator_files()  # cache, or pip download (network)
    except SourceUnavailableError as exc:
        pytest.skip(f"TotalSegmentator 2.18.0 sdist not cached and not downloadable: {exc}")
    info = build_organmnist_style(tmp_path, sizes=(28,), source_dir=files["map_to_binary.py"].parent, log=print)
    assert info["volume_shape"] == [122, 101, 112] and info["empty"] == []
    for name, per_split in info["counts"].items():
        task = load_medmnist_npz(tmp_path / f"{name}.npz")
        assert task.num_classes == 11 and task.image_hw == (28, 28)
        assert all(sum(c.values()) == len(task.splits[s]) for s, c in per_split.items())
    assert sum(info["counts"]["organa_ts"]["train"].values()) > 100
