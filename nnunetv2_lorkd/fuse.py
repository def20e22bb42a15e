"""lorkd-fuse: turn a trained LoRKD model folder into one vanilla nnU-Net model folder per region.

Each region folder holds, for every fold, the network with W = W0 + s*dW_region and the segmentation heads
sliced to background + that region's classes, saved as an ordinary ``nnUNetTrainer`` checkpoint, plus a
plans.json without expert entries and a dataset.json with only that region's labels. Plain
``nnUNetv2_predict -tr nnUNetTrainer -p <plans>_<region>`` runs it without this package installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nnunetv2_lorkd.experts import fuse_expert, route
from nnunetv2_lorkd.files import read_json
from nnunetv2_lorkd.nnunet.config import PLANS_KEY, ExpertConfig
from nnunetv2_lorkd.regions import RegionMap, RegionMapError, region_labels_for_dataset_json

SEG_HEAD_KEY = re.compile(r"(^|\.)decoder\.seg_layers\.\d+\.(weight|bias)$")


class FuseError(RuntimeError):
    """A model folder, fold or region that cannot be fused, with what to do about it."""


# ------------------------------------------------------------------------------------------- loading
# what safe checkpoint reading needs (keep in step with pyproject.toml): torch.serialization.safe_globals came with
# torch 2.5; numpy 2 pickles its scalars as numpy._core.multiarray.scalar, which numpy 1.x cannot even import
MIN_TORCH = "2.5"
MIN_NUMPY = "2"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _require_checkpoint_support(path: str) -> tuple:
    """(safe_globals, numpy's scalar reconstructor), or a FuseError naming the too-old package: an old
    environment must not be reported as a corrupt file."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        raise FuseError(
            f"cannot read checkpoint {path}: this environment has torch {torch.__version__}, but reading nnU-Net "
            f"checkpoints safely (weights_only=True with numpy values allowed, torch.serialization.safe_globals) "
            f"needs torch >= {MIN_TORCH}, as nnunetv2-lorkd declares; the file itself was not checked. Fix: "
            f"pip install 'torch>={MIN_TORCH},!=2.9.*'"
        )
    numpy_core = getattr(np, "_core", None)
    if numpy_core is None:
        raise FuseError(
            f"cannot read checkpoint {path}: this environment has numpy {np.__version__}, but nnU-Net checkpoints "
            f"written with numpy 2 store numpy._core values, which need numpy >= {MIN_NUMPY}, as nnunetv2-lorkd "
            f"declares; the file itself was not checked. Fix: pip install 'numpy>={MIN_NUMPY}'"
        )
    return safe_globals, numpy_core.multiarray.scalar


def load_checkpoint(path: str) -> dict:
    """An nnU-Net checkpoint, read with weights_only=True (numpy scalars/dtypes in its logs allowed): no code in
    the file runs. Errors say whether the environment, the file's content or the file itself is the problem."""
    if not os.path.isfile(path):
        raise FuseError(f"checkpoint {path} does not exist")
    safe_globals, numpy_scalar = _require_checkpoint_support(path)
    allowed = [
        numpy_scalar,
        np.dtype,
        *{type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "u1", "b1")},
    ]
    try:
        with safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = _UNSUPPORTED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused:
            raise FuseError(
                f"cannot read checkpoint {path}: it holds a Python object of type {refused.group(1)}, which safe "
                "loading refuses (nnunetv2-lorkd reads checkpoints with weights_only=True and never runs code from "
                "them); use a checkpoint written by nnUNetv2_train, or re-save its contents as tensors and plain "
                "values"
            ) from error
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FuseError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {first}); the file is corrupt or not an "
            f"nnU-Net checkpoint (torch {torch.__version__}, numpy {np.__version__})"
        ) from error


@dataclass
class LoRKDModel:
    """A trained LoRKD model folder, loaded and validated."""

    folder: str
    plans: dict
    dataset_json: dict
    configuration: str
    region_map: RegionMap

    @classmethod
    def open(cls, folder: str, first_checkpoint: dict) -> LoRKDModel:
        hint = "is this an nnU-Net model folder?"
        plans = read_json(os.path.join(folder, "plans.json"), FuseError, missing_hint=hint)
        dataset_json = read_json(os.path.join(folder, "dataset.json"), FuseError, missing_hint=hint)
        configuration = first_checkpoint.get("init_args", {}).get("configuration")
        if configuration not in plans.get("configurations", {}):
            raise FuseError(f"the checkpoint's configuration {configuration!r} is not in {folder}/plans.json")
        if PLANS_KEY not in plans["configurations"][configuration]:
            raise FuseError(
                f"{folder} is not a LoRKD model (trainer {first_checkpoint.get('trainer_name')!r}): its plans have no "
                f"'{PLANS_KEY}'. lorkd-fuse only fuses models trained with nnUNetTrainerLoRKD."
            )
        try:
            region_map = RegionMap.from_dataset_json(dataset_json, os.path.join(folder, "dataset.json"))
        except RegionMapError as error:
            raise FuseError(str(error)) from None
        return cls(folder, plans, dataset_json, configuration, region_map)

    def _managers(self) -> tuple:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans_manager = PlansManager(copy.deepcopy(self.plans))
        return plans_manager, plans_manager.get_configuration(self.configuration)

    def _num_inputs(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        plans_manager, cm = self._managers()
        return determine_num_input_channels(plans_manager, cm, self.dataset_json)

    def build_plain(self, num_outputs: int) -> nn.Module:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        plans_manager, cm = self._managers()
        return nnUNetTrainer.build_network_architecture(plans_manager, cm, self._num_inputs(), num_outputs, False)

    def build_routed(self, weights: dict) -> nn.Module:
        plans_manager, cm = self._managers()
        num_outputs = plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads
        net = ExpertConfig.from_configuration(cm.configuration).apply(self.build_plain(num_outputs))
        if not any(".lora_A." in k for k in weights):
            raise FuseError(f"the checkpoints in {self.folder} hold no expert weights; they are not LoRKD checkpoints")
        try:
            net.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise FuseError(
                f"the checkpoint does not match the plans of {self.folder}: {str(error).splitlines()[0]}"
            ) from None
        return net.eval()


def fused_region_weights(model: LoRKDModel, routed: nn.Module, region: int) -> dict[str, torch.Tensor]:
    """state_dict of the vanilla network for one region: fused experts, heads sliced to the region's classes."""
    channels = torch.tensor(model.region_map.channels(region))
    weights = fuse_expert(routed, region).state_dict()
    return {k: (v.index_select(0, channels).clone() if SEG_HEAD_KEY.search(k) else v) for k, v in weights.items()}


def region_dataset_json(model: LoRKDModel, region: int) -> dict:
    info = model.region_map.regions[region]
    dataset_json = {k: v for k, v in model.dataset_json.items() if k not in ("lorkd", "dataset", "labels")}
    dataset_json["labels"] = region_labels_for_dataset_json(info)
    dataset_json["lorkd_fused"] = {
        "region": info.name,
        "source_model": os.path.abspath(model.folder),
        "union_label_values": dict(zip(info.label_names, info.label_values, strict=True)),
    }
    return dataset_json


def region_plans(model: LoRKDModel, plans_identifier: str) -> dict:
    plans = copy.deepcopy(model.plans)
    plans["plans_name"] = plans_identifier
    for configuration in plans["configurations"].values():
        configuration.pop(PLANS_KEY, None)
    return plans


# ----------------------------------------------------------------------------------------- verifying
def verify_region(model: LoRKDModel, routed: nn.Module, weights: dict, region: int) -> float:
    """max |routed - fused| logits on a real preprocessed case of the region (centre patch)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    plans_manager, cm = model._managers()
    folder = os.path.join(str(nnUNet_preprocessed), plans_manager.dataset_name, cm.data_identifier)
    cases = model.region_map.cases_of(region)
    if not os.path.isdir(folder) or not cases:
        raise FuseError(f"--verify needs the preprocessed cases of region {model.region_map.names[region]} in {folder}")
    dataset = infer_dataset_class(folder)(folder, [cases[0]])
    data = np.asarray(dataset.load_case(cases[0])[0][:], dtype=np.float32)
    if len(cm.patch_size) == 2:  # 2d configurations see single axial slices: take the middle one
        data = data[:, data.shape[1] // 2]
    patch = []
    for size, want in zip(data.shape[1:], cm.patch_size, strict=True):
        start = max(0, (size - want) // 2)
        patch.append(slice(start, start + min(size, want)))
    x = torch.from_numpy(data[(slice(None), *patch)].copy())[None]
    pad = [
        p
        for size, want in zip(reversed(x.shape[2:]), reversed(cm.patch_size), strict=True)
        for p in (0, max(0, want - size))
    ]
    x = torch.nn.functional.pad(x, pad)
    plain = model.build_plain(len(model.region_map.channels(region)))
    plain.load_state_dict(weights, strict=True)
    plain.eval()
    with torch.no_grad(), route(routed, region):
        reference = routed(x)[:, model.region_map.channels(region)]
        fused = plain(x)
    return float((reference - fused).abs().max())


# --------------------------------------------------------------------------------------------- fusing
def fuse_model_folder(
    model_folder: str,
    regions: Sequence[str],
    folds: Sequence[int] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    overwrite: bool = False,
    verify: bool = False,
    log=print,
) -> list[str]:
    """Write one vanilla model folder per region next to `model_folder`; returns their paths."""
    if not os.path.isdir(model_folder):
        raise FuseError(f"model folder {model_folder} does not exist; check -d/-c/-tr/-p")
    available = sorted(int(d[5:]) for d in os.listdir(model_folder) if re.fullmatch(r"fold_\d+", d))
    folds = list(available if folds is None else folds)
    if not folds:
        raise FuseError(f"{model_folder} has no fold_* folders; train first")
    paths = {f: os.path.join(model_folder, f"fold_{f}", checkpoint_name) for f in folds}
    missing = [f for f, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise FuseError(
            f"fold(s) {missing} have no {checkpoint_name} in {model_folder}; train them or pass -f with existing folds"
        )
    checkpoints = {f: load_checkpoint(p) for f, p in paths.items()}
    model = LoRKDModel.open(model_folder, checkpoints[folds[0]])
    names = list(model.region_map.names) if list(regions) == ["all"] else list(dict.fromkeys(regions))
    indices = []
    for name in names:
        try:
            indices.append(model.region_map.region_index(name))
        except RegionMapError as error:
            raise FuseError(str(error)) from None

    trainer, plans_id, configuration = os.path.basename(os.path.normpath(model_folder)).split("__")
    parent = os.path.dirname(os.path.normpath(model_folder))
    targets = {
        r: os.path.join(parent, f"nnUNetTrainer__{plans_id}_{model.region_map.names[r]}__{configuration}")
        for r in indices
    }
    existing = [t for t in targets.values() if os.path.exists(t)]
    if existing and not overwrite:
        raise FuseError(f"output folder(s) exist: {existing}; pass --overwrite to replace them")

    staging = {r: tempfile.mkdtemp(prefix=".lorkd-fuse-", dir=parent) for r in indices}
    try:
        for fold, checkpoint in checkpoints.items():
            routed = model.build_routed(checkpoint["network_weights"])
            for r in indices:
                weights = fused_region_weights(model, routed, r)
                if verify:
                    delta = verify_region(model, routed, weights, r)
                    log(f"verify fold {fold} region {model.region_map.names[r]}: max |routed - fused| = {delta:.3e}")
                    if not delta <= 1e-4:
                        raise FuseError(
                            f"fused region {model.region_map.names[r]} differs from the routed model by "
                            f"{delta:.3e} > 1e-4"
                        )
                os.makedirs(os.path.join(staging[r], f"fold_{fold}"))
                torch.save(
                    {
                        "network_weights": weights,
                        "trainer_name": "nnUNetTrainer",
                        "init_args": {"configuration": model.configuration},
                        "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
                        "lorkd_fused": {"region": model.region_map.names[r], "source_trainer": trainer, "fold": fold},
                    },
                    os.path.join(staging[r], f"fold_{fold}", "checkpoint_final.pth"),
                )
        for r in indices:
            region_plans_id = f"{plans_id}_{model.region_map.names[r]}"
            with open(os.path.join(staging[r], "plans.json"), "w") as f:
                json.dump(region_plans(model, region_plans_id), f, indent=2)
            with open(os.path.join(staging[r], "dataset.json"), "w") as f:
                json.dump(region_dataset_json(model, r), f, indent=2)
            fingerprint = os.path.join(model_folder, "dataset_fingerprint.json")
            if os.path.isfile(fingerprint):
                shutil.copy(fingerprint, staging[r])
        for r in indices:  # all built: now swap them in
            if os.path.exists(targets[r]):
                shutil.rmtree(targets[r])
            os.rename(staging[r], targets[r])
            log(f"region {model.region_map.names[r]}: {targets[r]}")
    finally:
        for path in staging.values():
            if os.path.isdir(path):
                shutil.rmtree(path)
    return [targets[r] for r in indices]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorkd-fuse",
        description="Fuse a trained nnUNetTrainerLoRKD model into one vanilla nnU-Net model folder per region. "
        "Predict with: nnUNetv2_predict -d D -c C -tr nnUNetTrainer -p <PLANS>_<REGION> -i IN -o OUT",
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    parser.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=None, help="folds to fuse (default: all trained)")
    parser.add_argument(
        "-tr", "--trainer", default="nnUNetTrainerLoRKD", help="LoRKD trainer name (default nnUNetTrainerLoRKD)"
    )
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--region", action="append", required=True, help="region name (repeatable), or 'all'")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--verify", action="store_true", help="compare routed and fused logits on a preprocessed case")
    parser.add_argument("--overwrite", action="store_true", help="replace existing region model folders")
    args = parser.parse_args(argv)
    try:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        folder = get_output_folder(
            maybe_convert_to_dataset_name(args.dataset), args.trainer, args.plans, args.configuration
        )
    except RuntimeError as error:
        print(f"lorkd-fuse: error: {error}", file=sys.stderr)
        return 2
    try:
        fuse_model_folder(folder, args.region, args.folds, args.checkpoint, args.overwrite, args.verify)
    except FuseError as error:
        print(f"lorkd-fuse: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
