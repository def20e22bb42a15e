"""A tiny nnU-Net *preprocessed* multi-region dataset written directly (no planning/preprocessing run) and a
small frozen-able fake teacher, for the fast distillation and MTL tests.

The dataset has the layout nnU-Net's trainer reads (plans, dataset.json with a ``lorkd`` section, blosc2
cases with properties, splits, gt_segmentations for the final validation), two regions of different class
counts (so teacher channels get padded), and both a 3d_fullres and a 2d configuration.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from torch import nn

DATASET = "Dataset950_KDToy"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "urinary_bladder": 3}
REGIONS = [{"name": "abdomen", "labels": ["liver", "spleen"]}, {"name": "pelvis", "labels": ["urinary_bladder"]}]
SHAPE = (10, 20, 20)  # z, y, x
PATCH_3D = (8, 16, 16)
PATCH_2D = (16, 16)
CASES = {f"abd_{i:03d}": "abdomen" for i in range(4)} | {f"pel_{i:03d}": "pelvis" for i in range(4)}
TRAIN = ["abd_000", "abd_001", "abd_002", "pel_000", "pel_001", "pel_002"]
VAL = ["abd_003", "pel_003"]


def _architecture(dim: int) -> dict:
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = (
        "torch.nn.modules.instancenorm.InstanceNorm3d" if dim == 3 else "torch.nn.modules.instancenorm.InstanceNorm2d"
    )
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dim == 3 else [[3, 3]] * 3
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dim == 3 else [[1, 1], [2, 2], [2, 2]]
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [4, 8, 16],
            "conv_op": conv,
            "kernel_sizes": kernels,
            "strides": strides,
            "n_conv_per_stage": [1, 1, 1],
            "n_conv_per_stage_decoder": [1, 1],
            "conv_bias": True,
            "norm_op": norm,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _configuration(dim: int) -> dict:
    patch = list(PATCH_3D) if dim == 3 else list(PATCH_2D)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": "nnUNetPlans_3d_fullres" if dim == 3 else "nnUNetPlans_2d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2 if dim == 3 else 4,
        "patch_size": patch,
        "median_image_size_in_voxels": [float(s) for s in (SHAPE if dim == 3 else SHAPE[1:])],
        "spacing": [2.0, 1.0, 1.0] if dim == 3 else [1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": _architecture(dim),
        "batch_dice": False,
    }


def plans() -> dict:
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(SHAPE),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 4.0,
                "mean": 0.5,
                "median": 0.5,
                "min": -3.0,
                "percentile_00_5": -2.0,
                "percentile_99_5": 3.5,
                "std": 1.2,
            }
        },
        "configurations": {"3d_fullres": _configuration(3), "2d": _configuration(2)},
    }


def dataset_json() -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": len(CASES),
        "file_ending": ".nii.gz",
        "lorkd": {"version": 1, "regions": copy.deepcopy(REGIONS), "case_regions": dict(CASES)},
    }


def _blob(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    return (((grid - center) / radius) ** 2).sum(-1) <= 1.0


def write_dataset(preprocessed_root: str, seed: int = 0) -> str:
    """Write the toy dataset under ``preprocessed_root``; returns its folder."""
    folder = os.path.join(preprocessed_root, DATASET)
    gt = os.path.join(folder, "gt_segmentations")
    os.makedirs(gt, exist_ok=True)
    for name, data in (("nnUNetPlans.json", plans()), ("dataset.json", dataset_json()),
                       ("dataset_fingerprint.json", {"toy": True}),
                       ("splits_final.json", [{"train": TRAIN, "val": VAL}])):  # fmt: skip
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f, indent=1)
    rng = np.random.default_rng(seed)
    region_labels = {r["name"]: [LABELS[n] for n in r["labels"]] for r in REGIONS}
    for case, region in CASES.items():
        seg = np.zeros(SHAPE, dtype=np.int8)
        image = rng.normal(0, 0.5, SHAPE).astype(np.float32)
        for value in region_labels[region]:
            mask = _blob(rng.uniform([3, 6, 6], [7, 14, 14]), rng.uniform([2.0, 3.0, 3.0], [3.0, 5.0, 5.0]))
            seg[mask] = value
            image[mask] += 1.0 + value
        locations = {v: np.argwhere(seg[None] == v)[:, :] for v in (1, 2, 3)}
        properties = {
            "sitk_stuff": {
                "spacing": (1.0, 1.0, 2.0),
                "origin": (0.0, 0.0, 0.0),
                "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            },
            "spacing": [2.0, 1.0, 1.0],
            "shape_before_cropping": SHAPE,
            "bbox_used_for_cropping": [[0, s] for s in SHAPE],
            "shape_after_cropping_and_before_resampling": SHAPE,
            "class_locations": {k: (v if len(v) else []) for k, v in locations.items()},
        }
        for identifier, patch in (("nnUNetPlans_3d_fullres", PATCH_3D), ("nnUNetPlans_2d", PATCH_2D)):
            out = os.path.join(folder, identifier)
            os.makedirs(out, exist_ok=True)
            blocks, chunks = comp_blosc2_params((1, *SHAPE), patch)
            nnUNetDatasetBlosc2.save_case(image[None], seg[None], properties, os.path.join(out, case),
                                          chunks=chunks, blocks=blocks)  # fmt: skip
        itk = sitk.GetImageFromArray(seg.astype(np.uint8))
        itk.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(itk, os.path.join(gt, case + ".nii.gz"))
    return folder


def nnunet_env(monkeypatch, root: str) -> dict:
    """Point nnU-Net at temp folders under ``root`` (and train single-process)."""
    env = {
        "nnUNet_raw": os.path.join(root, "raw"),
        "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
        "nnUNet_results": os.path.join(root, "results"),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": "1",
    }
    for key, value in env.items():
        os.makedirs(value, exist_ok=True) if key.endswith(("raw", "preprocessed", "results")) else None
        monkeypatch.setenv(key, value)
    return env


def make_trainer(trainer_class: type, configuration: str = "3d_fullres", iterations: int = 2):
    """A trainer on the toy dataset, CPU, one short epoch."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    folder = os.path.join(os.fspath(nnUNet_preprocessed), DATASET)
    p = load_json(os.path.join(folder, "nnUNetPlans.json"))
    p["continue_training"] = False
    trainer = trainer_class(p, configuration, 0, load_json(os.path.join(folder, "dataset.json")), torch.device("cpu"))
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 1
    return trainer


class FakeTeacher:
    """A pointwise teacher (BatchNorm over channels, then a 1x1 linear map): pointwise, so a sliding window
    over a case equals one forward over it, and it commutes with flips. Deliberately created in TRAIN mode with
    gradients on: the distillation code must freeze it."""

    def __init__(self, class_names: Sequence[str], exclusive: bool = False, in_channels: int = 1, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.class_names = tuple(class_names)
        self.exclusive = exclusive
        self.norm = nn.BatchNorm1d(in_channels)
        with torch.no_grad():
            self.norm.running_mean.fill_(0.3)
            self.norm.running_var.fill_(2.0)
        self.head = nn.Linear(in_channels, len(self.class_names) + int(exclusive))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 2)
            self.head.bias.copy_(torch.randn(self.head.bias.shape, generator=gen))
        self.calls = 0

    def to(self, device: torch.device) -> FakeTeacher:
        self.norm.to(device)
        self.head.to(device)
        return self

    def probabilities(self, x: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        b, c = x.shape[:2]
        flat = self.norm(x.reshape(b, c, -1))  # (B, C, N)
        logits = self.head(flat.transpose(1, 2)).transpose(1, 2).reshape(b, -1, *x.shape[2:])
        offset = int(self.exclusive)
        index = [self.class_names.index(n) + offset for n in class_names]
        probs = torch.softmax(logits, 1) if self.exclusive else torch.sigmoid(logits)
        return probs[:, index]


def teacher_folder(root: str) -> str:
    """A model folder with a (dummy) checkpoint file, which the cache fingerprints."""
    folder = os.path.join(root, "teacher_model")
    os.makedirs(os.path.join(folder, "fold_0"), exist_ok=True)
    with open(os.path.join(folder, "fold_0", "checkpoint_final.pth"), "wb") as f:
        f.write(b"fake teacher weights v1")
    return folder


def patch_load_teacher(monkeypatch, teacher: FakeTeacher) -> list:
    """Make nnunetv2_lorkd.teachers.load_teacher return ``teacher``; returns the list of call kwargs."""
    import nnunetv2_lorkd.teachers as teachers

    calls: list = []

    def fake_load_teacher(model_folder, fold, checkpoint_name="checkpoint_final.pth", device="cpu", **kwargs):
        calls.append({"model_folder": model_folder, "fold": fold, "checkpoint_name": checkpoint_name, **kwargs})
        return teacher.to(torch.device(device))

    monkeypatch.setattr(teachers, "load_teacher", fake_load_teacher)
    return calls
