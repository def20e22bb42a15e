"""Tiny nnU-Net plans / model folders for the SAT-style model and teacher tests (no preprocessing needed)."""

from __future__ import annotations

import copy
import json
import math
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


# ------------------------------------------------------------------------- synthetic SAT-style training
# Three regions of three classes each; a class is a disc of its own intensity (classes of different regions may
# share the image but are only annotated in their own region's cases, as in a merged dataset).
SYNTH_INTENSITIES = ((2.0, -1.5, 1.0), (1.2, 3.0, -2.0), (-2.5, 2.5, 1.8))
SYNTH_SIZE = 32


def _synth_offsets() -> list[int]:
    return [sum(len(r) for r in SYNTH_INTENSITIES[:i]) for i in range(len(SYNTH_INTENSITIES))]


def synthetic_cases(per_region: int, seed: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(region, image (H, W) float32, label map (H, W) int64 with values 0..9) per case."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SYNTH_SIZE, :SYNTH_SIZE]
    cases = []
    for region, (offset, intensities) in enumerate(zip(_synth_offsets(), SYNTH_INTENSITIES, strict=True)):
        for _ in range(per_region):
            image = rng.normal(0, 0.5, (SYNTH_SIZE, SYNTH_SIZE)).astype(np.float32)
            seg = np.zeros((SYNTH_SIZE, SYNTH_SIZE), dtype=np.int64)
            for j, intensity in enumerate(intensities):
                cy, cx = rng.uniform(5, SYNTH_SIZE - 5, 2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(2.0, 4.0) ** 2
                seg[disc] = offset + j + 1
                image[disc] += intensity
            cases.append((region, image, seg))
    return cases


def synthetic_labels(region: int) -> tuple[int, ...]:
    offset = _synth_offsets()[region]
    return tuple(range(offset + 1, offset + 1 + len(SYNTH_INTENSITIES[region])))


def synthetic_class_mask(regions: list[int]) -> torch.Tensor:
    num_classes = sum(len(r) for r in SYNTH_INTENSITIES)
    mask = torch.zeros(len(regions), num_classes + 1, dtype=torch.bool)
    mask[:, 0] = True
    for row, region in enumerate(regions):
        mask[row, list(synthetic_labels(region))] = True
    return mask


def text_like_embeddings(num_classes: int, seed: int, mean_cosine: float = 0.3, dim: int = 384) -> torch.Tensor:
    """Unit vectors sharing a common direction, pairwise cosine ~``mean_cosine`` (MiniLM gives 0.28 on the
    demo's 36 anatomy names), so tests need no text model."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    own = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    return torch.nn.functional.normalize(math.sqrt(mean_cosine / (1 - mean_cosine)) * common + own, dim=1)


def to_legacy(net) -> None:
    """Make ``net`` what a checkpoint from before the cosine head loads as, at the old initialisation: bias 0, no
    logit_scale / head_version in the state (so the old formula)."""
    state = {k: v for k, v in net.state_dict().items() if k not in ("prompt.logit_scale", "prompt.head_version")}
    state["prompt.class_bias"] = torch.zeros_like(state["prompt.class_bias"])
    net.load_state_dict(state, strict=True)


def synthetic_sat_network(seed: int, init: str, cases, embedding_dim: int = 32, hidden_dim: int = 256):
    """The 2D SAT-style network of :func:`tiny_plans` on the synthetic problem, initialised the new way (bias at
    logit(prior) from ``cases``, cosine head) or the old way (``init="old"``)."""
    from nnunetv2_lorkd.sat import SATConfig, build_prompted_network, foreground_priors

    num_classes = sum(len(r) for r in SYNTH_INTENSITIES)
    plans, configuration = tiny_plans(2)
    plans["configurations"][configuration]["patch_size"] = [SYNTH_SIZE, SYNTH_SIZE]
    names = tuple(f"class {i}" for i in range(num_classes))
    SATConfig(names, names, "all-MiniLM-L6-v2", 384, embedding_dim, hidden_dim).store_in(plans, configuration, {})
    plans_manager, cm = managers(plans, configuration)
    torch.manual_seed(seed)
    net = build_prompted_network(plans_manager, cm, 1, num_classes + 1, False)
    net.prompt.set_class_embeddings(text_like_embeddings(num_classes, 1000 + seed))
    if init == "old":
        to_legacy(net)
    elif init == "new":
        priors = foreground_priors(((seg, synthetic_labels(region)) for region, _, seg in cases), num_classes)
        net.prompt.init_class_bias(priors.priors)
    else:
        raise ValueError(f"init must be 'new' or 'old', got {init!r}")
    return net


def pseudo_dice(net, cases) -> np.ndarray:
    """Per-class Dice of the trainer's online validation: argmax over background + each case's annotated classes,
    each class scored on the cases annotated for it."""
    mask = synthetic_class_mask([c[0] for c in cases])
    x = torch.from_numpy(np.stack([c[1] for c in cases]))[:, None]
    target = torch.from_numpy(np.stack([c[2] for c in cases]))
    net.eval()
    with torch.no_grad():
        logits = net(x)
    net.train()
    prediction = logits.masked_fill(~mask[:, :, None, None], float("-inf")).argmax(1)
    dice = []
    for k in range(1, mask.shape[1]):
        p, t = prediction[mask[:, k]] == k, target[mask[:, k]] == k
        tp, wrong = int((p & t).sum()), int((p ^ t).sum())
        dice.append(2 * tp / max(2 * tp + wrong, 1))
    return np.array(dice)


def train_until_dice(
    net, cases, val_cases, max_iterations: int, every: int = 10, seed: int = 0, batch_size: int = 4
) -> dict:
    """nnU-Net's optimiser (SGD 1e-2, Nesterov 0.99, poly schedule over ``max_iterations``, clip 12) on the masked
    sigmoid Dice + BCE; the pseudo-Dice on ``val_cases`` before training and every ``every`` iterations.

    Returns the first iteration at which some class has Dice > 0 (``first_any``; at iteration 0 the old
    initialisation already scores a little, by predicting some class almost everywhere), some class Dice > 0.5
    (``first_class_half``) and the mean class Dice > 0.5 (``first_mean_half``; training stops there), each None if
    not reached, and the history [(iteration, max Dice, mean Dice)]."""
    from nnunetv2_lorkd.sat import MaskedSigmoidDiceBCELoss

    rng = np.random.default_rng(seed)
    loss_fn = MaskedSigmoidDiceBCELoss(batch_dice=True)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    result: dict = {"first_any": None, "first_class_half": None, "first_mean_half": None, "history": []}
    for iteration in range(max_iterations + 1):
        if iteration > 0:
            batch = [cases[i] for i in rng.integers(0, len(cases), batch_size)]
            x = torch.from_numpy(np.stack([c[1] for c in batch]))[:, None]
            y = torch.from_numpy(np.stack([c[2] for c in batch]))[:, None]
            optimizer.param_groups[0]["lr"] = 1e-2 * (1 - (iteration - 1) / max_iterations) ** 0.9
            loss = loss_fn(net(x), y, synthetic_class_mask([c[0] for c in batch]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()
        if iteration % every == 0:
            dice = pseudo_dice(net, val_cases)
            result["history"].append((iteration, float(dice.max()), float(dice.mean())))
            for key, reached in (("first_any", dice.max() > 0), ("first_class_half", dice.max() > 0.5)):
                if result[key] is None and reached:
                    result[key] = iteration
            if dice.mean() > 0.5:
                result["first_mean_half"] = iteration
                break
    return result
