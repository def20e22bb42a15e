"""Tiny nnU-Net plans / model folders for the SAT-style model and teacher tests (no preprocessing needed)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch

CLASS_NAMES = ("liver", "spleen", "urinary_bladder", "femur_left", "lung")
CT_PROPERTIES = {
    "max": 5.08,
    "mean": 0.0118,
    "median": 0.46,
    "min": -4.52,
    "percentile_00_5": -3.6,
    "percentile_99_5": 4.57,
    "std": 2.30,
}


def tiny_plans(
    dim: int = 3,
    network: str = "PlainConvUNet",
    norm: str | None = None,
    spacing: list[float] | None = None,
    configuration: str | None = None,
) -> tuple[dict, str]:
    """An nnU-Net plans dict with one small configuration (3 stages, 8-32 features), and its name."""
    configuration = configuration or ("3d_fullres" if dim == 3 else "2d")
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = norm or ("torch.nn.modules.instancenorm.InstanceNorm3d" if dim == 3 else "torch.nn.InstanceNorm2d")
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dim == 3 else [[3, 3], [3, 3], [3, 3]]
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dim == 3 else [[1, 1], [2, 2], [2, 2]]
    arch = {
        "n_stages": 3,
        "features_per_stage": [8, 16, 32],
        "conv_op": conv,
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage_decoder": [1, 1],
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if network == "PlainConvUNet":
        arch["n_conv_per_stage"] = [2, 2, 2]
    else:
        arch["n_blocks_per_stage"] = [1, 2, 2]
    spacing = spacing or ([2.0, 1.0, 1.0] if dim == 3 else [1.0, 1.0])
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [8, 16, 16] if dim == 3 else [16, 16],
        "median_image_size_in_voxels": [14.0, 24.0, 24.0] if dim == 3 else [24.0, 24.0],
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": f"dynamic_network_architectures.architectures.unet.{network}",
            "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset900_Merged",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [14, 24, 24],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_PROPERTIES)},
        "configurations": {configuration: config},
    }
    return plans, configuration


def dataset_json(class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(class_names)}},
        "numTraining": 12,
        "file_ending": ".nii.gz",
        "lorkd": {
            "version": 1,
            "regions": [
                {"name": "abdomen", "labels": ["liver", "spleen"]},
                {"name": "pelvis", "labels": ["urinary_bladder", "femur_left"]},
                {"name": "thorax", "labels": ["lung"]},
            ],
            "case_regions": {"abd_000": "abdomen", "pel_000": "pelvis", "tho_000": "thorax"},
        },
    }


def sat_config(class_names: tuple[str, ...] = CLASS_NAMES, text_encoder: str | None = "all-MiniLM-L6-v2"):
    from nnunetv2_lorkd.sat import SATConfig, class_prompt

    return SATConfig(
        class_names=class_names,
        prompts=tuple(class_prompt(n) for n in class_names),
        text_encoder=text_encoder,
        text_dim=384 if text_encoder else 16,
        embedding_dim=8,
        query_hidden_dim=16,
    )


def managers(plans: dict, configuration: str):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(copy.deepcopy(plans))
    return plans_manager, plans_manager.get_configuration(configuration)


def sat_network(plans: dict, configuration: str, deep_supervision: bool = False, seed: int = 0):
    """A PromptedUNet from plans carrying a lorkd_sat entry, with random (non-trivial) class embeddings."""
    from nnunetv2_lorkd.sat import build_prompted_network

    torch.manual_seed(seed)
    plans_manager, cm = managers(plans, configuration)
    num_classes = len(plans["configurations"][configuration]["lorkd_sat"]["class_names"])
    net = build_prompted_network(plans_manager, cm, 1, num_classes + 1, deep_supervision)
    if not net.prompt.learned:
        net.prompt.set_class_embeddings(torch.randn(net.prompt.class_embeddings.shape))
    with torch.no_grad():  # visible class differences
        net.prompt.class_bias.copy_(torch.linspace(-1.0, 1.0, num_classes))
    return net


def plain_network(plans: dict, configuration: str, num_classes: int = len(CLASS_NAMES), seed: int = 0):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(seed)
    plans_manager, cm = managers(plans, configuration)
    return nnUNetTrainer.build_network_architecture(plans_manager, cm, 1, num_classes + 1, False)


def write_model_folder(
    folder: str,
    plans: dict,
    configuration: str,
    dataset: dict,
    network: torch.nn.Module,
    trainer_name: str = "nnUNetTrainer",
    fold: int = 0,
) -> str:
    """An nnU-Net results folder as nnUNetv2_train leaves it (checkpoint with numpy scalars in its logs)."""
    os.makedirs(os.path.join(folder, f"fold_{fold}"), exist_ok=True)
    for name, content in (("plans.json", plans), ("dataset.json", dataset)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": {},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)]},
        "_best_ema": np.float64(0.4),
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": configuration,
            "fold": fold,
            "dataset_json": dataset,
            "device": torch.device("cpu"),
        },
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth"))
    return folder
