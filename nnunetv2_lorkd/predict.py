"""lorkd-predict: predict with a trained (unfused) LoRKD model for one explicitly named region.

The region is required: a LoRKD network has no meaningful "default" expert, and guessing would silently
use the wrong one. The region's expert is fused in memory (no speed cost) and the outputs are restricted
to that region's labels, numbered as in the region's own dataset.json (what lorkd-fuse writes), so
lorkd-predict and the fused vanilla model give the same files.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from nnunetv2_lorkd.fuse import (
    FuseError,
    LoRKDModel,
    fused_region_weights,
    load_checkpoint,
    region_dataset_json,
    region_plans,
)
from nnunetv2_lorkd.regions import RegionMapError


def predict_region(
    model_folder: str,
    region_name: str,
    input_folder: str,
    output_folder: str,
    folds: list[int] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    device: str = "cuda",
    use_mirroring: bool = True,
    num_processes: int = 1,
) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folds = (
        folds
        if folds is not None
        else sorted(int(d[5:]) for d in os.listdir(model_folder) if d.startswith("fold_") and d[5:].isdigit())
    )
    checkpoints = [load_checkpoint(os.path.join(model_folder, f"fold_{f}", checkpoint_name)) for f in folds]
    if not checkpoints:
        raise FuseError(f"{model_folder} has no trained folds")
    model = LoRKDModel.open(model_folder, checkpoints[0])
    try:
        region = model.region_map.region_index(region_name)
    except RegionMapError as error:
        raise FuseError(str(error)) from None
    parameters = [fused_region_weights(model, model.build_routed(c["network_weights"]), region) for c in checkpoints]
    dataset_json = region_dataset_json(model, region)
    plans_manager = PlansManager(region_plans(model, f"{model.plans.get('plans_name', 'plans')}_{region_name}"))
    network = model.build_plain(len(dataset_json["labels"]))
    predictor = nnUNetPredictor(
        use_mirroring=use_mirroring,
        perform_everything_on_device=device == "cuda",
        device=torch.device(device),
        allow_tqdm=True,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        plans_manager.get_configuration(model.configuration),
        parameters,
        dataset_json,
        "nnUNetTrainer",
        checkpoints[0].get("inference_allowed_mirroring_axes"),
    )
    os.makedirs(output_folder, exist_ok=True)
    if num_processes == 0:
        predictor.predict_from_files_sequential(input_folder, output_folder, False, True, None)
    else:
        predictor.predict_from_files(input_folder, output_folder, False, True, num_processes, num_processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorkd-predict", description="Predict with a trained LoRKD model for one named region (required)."
    )
    parser.add_argument("-i", "--input", required=True, help="input folder (nnU-Net naming: CASE_0000.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("--region", required=True, help="region whose expert to use (see the dataset's lorkd section)")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=None, help="folds (default: all trained)")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerLoRKD")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument(
        "-device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu", "mps"]
    )
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("-np", "--num_processes", type=int, default=1, help="0 = sequential, no worker processes")
    args = parser.parse_args(argv)
    try:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        folder = get_output_folder(
            maybe_convert_to_dataset_name(args.dataset), args.trainer, args.plans, args.configuration
        )
        predict_region(
            folder,
            args.region,
            args.input,
            args.output,
            args.folds,
            args.checkpoint,
            args.device,
            not args.disable_tta,
            args.num_processes,
        )
    except (FuseError, RuntimeError) as error:
        print(f"lorkd-predict: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
