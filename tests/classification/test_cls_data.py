"""MedMNIST .npz reading (errors name the file and the problem), metrics, RadImageNet-style CSV input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cls_helpers import class_images, write_npz
from PIL import Image
from sklearn.metrics import roc_auc_score

from nnunetv2_lorkd.classification.data import (
    DatasetFormatError,
    assemble_split,
    common_geometry,
    load_medmnist_npz,
    save_medmnist_npz,
)
from nnunetv2_lorkd.classification.metrics import binary_auc, classification_metrics
from nnunetv2_lorkd.classification.radimagenet import load_radimagenet_csv


def _error(path: Path) -> str:
    with pytest.raises(DatasetFormatError) as info:
        load_medmnist_npz(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message and "\n" not in message  # one line, names the file
    return message


def test_valid_grey_and_rgb_files_load(tmp_path: Path) -> None:
    grey = load_medmnist_npz(write_npz(tmp_path / "a.npz", 3))
    rgb = load_medmnist_npz(write_npz(tmp_path / "b.npz", 4, rgb=True))
    assert (grey.name, grey.num_classes, grey.channels, grey.image_hw) == ("a", 3, 1, (12, 12))
    assert (rgb.num_classes, rgb.channels) == (4, 3)
    assert grey.splits["train"].images.dtype == np.uint8 and grey.splits["test"].labels.shape == (8,)
    # mixed grey + RGB: grey is repeated to 3 channels; task ids follow the task order
    channels, size = common_geometry([grey, rgb])
    split = assemble_split([grey, rgb], "train", channels, size)
    assert split.images.shape == (48, 3, 12, 12) and split.images.dtype == torch.uint8
    assert split.task_ids.tolist() == [0] * 24 + [1] * 24


def test_save_and_reload_keeps_label_names(tmp_path: Path) -> None:
    task = load_medmnist_npz(write_npz(tmp_path / "a.npz", 3))
    task = type(task)(task.name, ("x", "y", "z"), task.splits, task.source)
    again = load_medmnist_npz(save_medmnist_npz(tmp_path / "b.npz", task))
    assert again.class_names == ("x", "y", "z")
    assert np.array_equal(again.splits["val"].images, task.splits["val"].images)


def test_missing_keys(tmp_path: Path) -> None:
    message = _error(write_npz(tmp_path / "m.npz", 3, val_labels=None, test_images=None))
    assert "missing key(s) val_labels, test_images" in message


def test_negative_labels(tmp_path: Path) -> None:
    labels = np.array([[0], [1], [-1], [2]] * 6)
    assert "negative label(s) [-1]" in _error(write_npz(tmp_path / "n.npz", 3, train_labels=labels))


def test_labels_out_of_range_of_the_label_names(tmp_path: Path) -> None:
    labels = np.array([[0], [1], [5]] * 8)
    path = write_npz(tmp_path / "r.npz", 3, train_labels=labels, label_names=np.array(["a", "b", "c"]))
    message = _error(path)
    assert "out of range 0..2" in message and "[5]" in message


def test_labels_out_of_range_of_a_known_medmnist_set(tmp_path: Path) -> None:
    labels = np.array([[0], [1], [2]] * 8)
    message = _error(write_npz(tmp_path / "breastmnist.npz", 2, train_labels=labels))
    assert "out of range 0..1" in message and "breastmnist has 2 classes in MedMNIST" in message


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (np.zeros((24, 12), np.uint8), "expected (N, H, W) grey or (N, H, W, 3) RGB"),
        (np.zeros((24, 12, 12, 2), np.uint8), "has shape (24, 12, 12, 2)"),
        (np.full((24, 12, 12), 300, np.int32), "values outside 0..255"),
    ],
)
def test_wrong_image_shapes_or_values(tmp_path: Path, images: np.ndarray, expected: str) -> None:
    assert expected in _error(write_npz(tmp_path / "s.npz", 3, train_images=images))


def test_image_shape_differs_between_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    message = _error(write_npz(tmp_path / "d.npz", 3, test_images=class_images(rng, np.arange(8) % 3, size=16)))
    assert "image shapes differ between splits" in message


def test_mismatched_image_and_label_counts(tmp_path: Path) -> None:
    message = _error(write_npz(tmp_path / "c.npz", 3, val_labels=np.zeros((5, 1), np.int64)))
    assert "'val_images' has 8 images but 'val_labels' has 5 labels" in message


def test_multi_label_files_are_refused(tmp_path: Path) -> None:
    message = _error(write_npz(tmp_path / "chestmnist.npz", 3, train_labels=np.zeros((24, 14), np.int64)))
    assert "multi-label" in message


def test_not_an_npz_and_object_arrays(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    assert "not a readable .npz archive" in _error(bad)
    objects = write_npz(tmp_path / "o.npz", 3, train_labels=np.array([None] * 24, dtype=object))
    assert "Python objects" in _error(objects)
    assert "file not found" in _error(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------------------ metrics
def test_auc_matches_sklearn_with_ties_and_skips_absent_classes() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    probs = rng.random((200, 4)).round(1)  # many ties
    probs /= probs.sum(1, keepdims=True)
    for c in range(4):
        assert binary_auc(labels == c, probs[:, c]) == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
    m = classification_metrics(labels, probs)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["acc"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    partial = classification_metrics(np.array([0, 0, 1, 1]), np.eye(3)[[0, 1, 1, 2]] * 0.8 + 0.1)
    assert partial["auc_classes"] == 2  # class 2 never occurs: left out of the macro average, not an error


# -------------------------------------------------------------------------------------- RadImageNet CSV
def _csv_set(tmp_path: Path, rows: list[str], header: str = "filename,label,task,split") -> Path:
    rng = np.random.default_rng(1)
    for row in rows:
        name = row.split(",")[0]
        if name and not (tmp_path / name).exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "set.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


GOOD_ROWS = [
    "ct/a0.png,liver,ct_abd,train",
    "ct/a1.png,spleen,ct_abd,train",
    "ct/a2.png,liver,ct_abd,val",
    "ct/a3.png,spleen,ct_abd,test",
    "mr/b0.png,acl,mr_knee,train",
    "mr/b1.png,normal,mr_knee,train",
    "mr/b2.png,acl,mr_knee,test",
]


def test_radimagenet_csv_loads_one_task_per_task_value(tmp_path: Path) -> None:
    tasks = load_radimagenet_csv(_csv_set(tmp_path, GOOD_ROWS), image_size=16)
    assert [t.name for t in tasks] == ["ct_abd", "mr_knee"]
    abd = tasks[0]
    assert abd.class_names == ("liver", "spleen") and abd.splits["train"].labels.tolist() == [0, 1]
    assert abd.splits["train"].images.shape == (2, 16, 16, 1)
    assert len(tasks[1].splits["val"]) == 0


@pytest.mark.parametrize(
    ("rows", "header", "expected"),
    [
        (GOOD_ROWS, "filename,label,split", "missing column(s) task"),
        ([*GOOD_ROWS, "ct/a4.png,liver,ct_abd,training"], None, "line 9 has split 'training'"),
        ([*GOOD_ROWS, "ct/a5.png,,ct_abd,train"], None, "line 9 has an empty label"),
        ([*GOOD_ROWS, "ct/a6.png,kidney,ct_abd,test"], None, "class(es) kidney only outside 'train'"),
        (["x/c0.png,one,solo,train", "x/c1.png,one,solo,test"], None, "has a single class 'one'"),
        ([*GOOD_ROWS, "us/d0.png,cyst,us,test", "us/d1.png,mass,us,val"], None, "task 'us' has no 'train' rows"),
    ],
)
def test_radimagenet_csv_errors(tmp_path: Path, rows: list[str], header: str | None, expected: str) -> None:
    path = _csv_set(tmp_path, rows, header or "filename,label,task,split")
    with pytest.raises(DatasetFormatError) as info:
        load_radimagenet_csv(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_radimagenet_csv_missing_and_unreadable_images(tmp_path: Path) -> None:
    path = _csv_set(tmp_path, GOOD_ROWS)
    (tmp_path / "ct/a1.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"1 listed image file\(s\) not found .*ct/a1.png"):
        load_radimagenet_csv(path)
    (tmp_path / "ct/a1.png").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="cannot read image"):
        load_radimagenet_csv(path)
