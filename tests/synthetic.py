"""Tiny synthetic nnU-Net raw datasets, one per body region, for end-to-end tests.

Each region has its own structures (blobs of a region-specific intensity on a noisy background), written as
a normal nnU-Net v2 raw dataset (imagesTr/labelsTr/dataset.json) with anisotropic spacing and a
non-identity origin, so geometry handling is exercised.
"""

from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk

REGIONS = {
    # region: (dataset id, {label name: (value, intensity)})
    "abdomen": (901, {"liver": (1, 2.0), "spleen": (2, -1.5)}),
    "pelvis": (902, {"urinary_bladder": (1, 1.2), "femur_left": (2, 3.0)}),
    "thorax": (903, {"lung": (1, -2.5)}),
}
SHAPE = (14, 24, 24)  # z, y, x
SPACING = (1.0, 1.0, 2.0)  # x, y, z (SimpleITK order)


def _blob(shape: tuple[int, ...], center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (((grid - center) / radius) ** 2).sum(-1) <= 1.0


def write_region_dataset(raw_root: str, region: str, num_cases: int = 4, seed: int = 0) -> str:
    dataset_id, labels = REGIONS[region]
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{region.capitalize()}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(seed + dataset_id)
    for i in range(num_cases):
        seg = np.zeros(SHAPE, dtype=np.uint8)
        image = rng.normal(0, 0.5, SHAPE).astype(np.float32)
        for value, intensity in labels.values():
            center = rng.uniform([4, 6, 6], [SHAPE[0] - 4, SHAPE[1] - 6, SHAPE[2] - 6])
            mask = _blob(SHAPE, center, rng.uniform([2.5, 3.5, 3.5], [3.5, 5.5, 5.5]))
            seg[mask] = value
            image[mask] += intensity
        case = f"{region[:3]}_{i:03d}"
        for array, path in ((image, f"imagesTr/{case}_0000.nii.gz"), (seg, f"labelsTr/{case}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(SPACING)
            itk.SetOrigin((-12.0, 7.5, 30.0))
            sitk.WriteImage(itk, os.path.join(folder, path))
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: v for name, (v, _) in labels.items()}},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


def write_test_image(path: str, region: str, seed: int = 99) -> None:
    """One unseen image of a region (no label), for prediction."""
    _, labels = REGIONS[region]
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.5, SHAPE).astype(np.float32)
    for _value, intensity in labels.values():
        image[_blob(SHAPE, np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3), np.array([3.0, 4.5, 4.5]))] += intensity
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing(SPACING)
    itk.SetOrigin((-12.0, 7.5, 30.0))
    sitk.WriteImage(itk, path)
