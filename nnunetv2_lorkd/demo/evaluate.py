"""Score every model's test predictions of every region against the region's test labels.

Labels are matched by name: each model folder's dataset.json says which value means which class, and the
region dataset's dataset.json gives the reference values. The teacher and the MTL baseline predict the
union label space of all regions; like the fused experts (which only have their region's heads) and like
SAT (which is prompted with the classes a user asks for), they are scored on the region's classes only: the
saved probabilities are reduced to background + the region's classes before the argmax. This is the
same restriction nnUNetTrainerLoRKD/MTL/SATStyle apply in their own final validation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .metrics import DEFAULT_TOLERANCE_MM, score_cases

if TYPE_CHECKING:
    from .run import Demo

FOLD_NAME = 0  # the demo trains fold 0
METHODS = ("teacher", "lorkd", "mtl", "specialist")
METHOD_NAMES = {
    "teacher": "SAT-style teacher",
    "lorkd": "LoRKD fused experts",
    "mtl": "MTL baseline",
    "specialist": "nnU-Net specialists",
}


class EvaluationError(RuntimeError):
    """A prediction or label file is missing or does not fit its reference."""


def _labels(dataset_json: Path) -> dict[str, int]:
    labels = json.loads(dataset_json.read_text())["labels"]
    return {name: int(value) for name, value in labels.items() if name not in ("background", "ignore")}


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    if not path.is_file():
        raise EvaluationError(f"{path} is missing")
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))


def to_local(prediction: np.ndarray, model_labels: dict[str, int], classes: list[str]) -> np.ndarray:
    """A label map in a model's values -> the region's local values 1..K (`classes` order); other labels -> 0."""
    lut = np.zeros(max([*model_labels.values(), 0]) + 1, np.uint8)
    for local, name in enumerate(classes, start=1):
        if name not in model_labels:
            raise EvaluationError(f"the model has no label {name!r} (it knows {sorted(model_labels)})")
        lut[model_labels[name]] = local
    if prediction.size and int(prediction.max()) >= len(lut):
        raise EvaluationError(f"prediction value {int(prediction.max())} is not a label of the model")
    return lut[prediction]


def restricted_argmax(probabilities: np.ndarray, model_labels: dict[str, int], classes: list[str]) -> np.ndarray:
    """Argmax over background + the region's classes only -> local values 1..K (`classes` order)."""
    channels = [0, *(model_labels[name] for name in classes)]
    if max(channels) >= probabilities.shape[0]:
        raise EvaluationError(f"probabilities have {probabilities.shape[0]} channels; class channels {channels}")
    return np.asarray(probabilities[channels]).argmax(0).astype(np.uint8)


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def count_parameters(checkpoint: Path) -> dict[str, int]:
    """Parameters stored in an nnU-Net checkpoint: total, and the expert (lora_) share where present."""
    from nnunetv2_lorkd.fuse import load_checkpoint

    weights = load_checkpoint(str(checkpoint))["network_weights"]
    total = sum(int(v.numel()) for v in weights.values())
    experts = sum(int(v.numel()) for k, v in weights.items() if ".lora_" in k)
    return {"total": total, "experts": experts}


def evaluate_all(demo: Demo, tolerance_mm: float = DEFAULT_TOLERANCE_MM, log: Callable[[str], None] = print) -> dict:
    merged_labels = _labels(demo.raw / demo.merged / "dataset.json")
    regions: dict[str, dict] = {}
    for region, dataset in demo.region_datasets.items():
        region_labels = _labels(demo.raw / dataset / "dataset.json")
        classes = [name for name, _ in sorted(region_labels.items(), key=lambda kv: kv[1])]
        if [region_labels[c] for c in classes] != list(range(1, len(classes) + 1)):
            raise EvaluationError(f"{dataset}: labels are not 1..K")
        references = {}
        for case in demo.test_cases(region):
            references[case] = _read(demo.raw / dataset / "labelsTs" / f"{case}.nii.gz")
        model_labels = {
            "lorkd": _labels(demo.fused_folder(region) / "dataset.json"),
            "specialist": _labels(demo.model_folder(dataset, "nnUNetTrainer") / "dataset.json"),
        }
        per_method: dict[str, dict] = {}
        for method in METHODS:
            cases = []
            for case, (reference, spacing) in references.items():
                if method in ("teacher", "mtl"):
                    npz = demo.prediction_folder(method) / f"{case}.npz"
                    if not npz.is_file():
                        raise EvaluationError(f"{npz} is missing")
                    with np.load(npz) as data:
                        prediction = restricted_argmax(data["probabilities"], merged_labels, classes)
                else:
                    raw_prediction, _ = _read(demo.prediction_folder(method, region) / f"{case}.nii.gz")
                    prediction = to_local(raw_prediction, model_labels[method], classes)
                if prediction.shape != reference.shape:
                    raise EvaluationError(
                        f"{method} {case}: prediction {prediction.shape} and reference {reference.shape} differ"
                    )
                cases.append((prediction, reference, spacing))
            scores = score_cases(cases, classes, tolerance_mm)
            per_method[method] = {
                "dice": {c: _clean(v) for c, v in scores.dice().items()},
                "nsd": {c: _clean(v) for c, v in scores.nsd().items()},
                "mean_dice": _clean(scores.mean_dice()),
                "mean_nsd": _clean(scores.mean_nsd()),
            }
            log(
                f"{region:>15s} {METHOD_NAMES[method]:<22s} mean Dice {per_method[method]['mean_dice'] or 0:.4f} "
                f"NSD {per_method[method]['mean_nsd'] or 0:.4f}"
            )
        reference_voxels = {
            c: int(sum((r == i).sum() for r, _ in references.values())) for i, c in enumerate(classes, 1)
        }
        regions[region] = {
            "dataset": dataset,
            "classes": classes,
            "test_cases": list(references),
            "test_voxels": reference_voxels,
            "methods": per_method,
        }
    parameters = {
        "teacher": count_parameters(
            demo.model_folder(demo.merged, "nnUNetTrainerSATStyle") / "fold_0" / "checkpoint_final.pth"
        ),
        "lorkd": count_parameters(
            demo.model_folder(demo.merged, "nnUNetTrainerLoRKD") / "fold_0" / "checkpoint_final.pth"
        ),
        "mtl": count_parameters(demo.model_folder(demo.merged, "nnUNetTrainerMTL") / "fold_0" / "checkpoint_final.pth"),
        "lorkd_fused": {
            r: count_parameters(demo.fused_folder(r) / "fold_0" / "checkpoint_final.pth")["total"] for r in demo.regions
        },
        "specialist": {
            r: count_parameters(demo.model_folder(d, "nnUNetTrainer") / "fold_0" / "checkpoint_final.pth")["total"]
            for r, d in demo.region_datasets.items()
        },
    }
    return {
        "tolerance_mm": tolerance_mm,
        "methods": {m: METHOD_NAMES[m] for m in METHODS},
        "regions": regions,
        "parameters": parameters,
        "curves": learning_curves(demo),
    }


def learning_curves(demo: Demo) -> dict:
    """method -> region -> {"iterations_per_epoch", "values" (pseudo-Dice per epoch), "end" (where it stands)}."""
    from .curves import curve_end, region_curves

    merged_json = json.loads((demo.raw / demo.merged / "dataset.json").read_text())
    merged_regions = [r["name"] for r in merged_json["lorkd"]["regions"]]
    checkpoints = {
        "teacher": demo.model_folder(demo.merged, "nnUNetTrainerSATStyle"),
        "lorkd": demo.model_folder(demo.merged, "nnUNetTrainerLoRKD"),
        "mtl": demo.model_folder(demo.merged, "nnUNetTrainerMTL"),
    }
    curves: dict[str, dict] = {}
    for method, folder in checkpoints.items():
        per_region = region_curves(folder / f"fold_{FOLD_NAME}" / "checkpoint_final.pth", merged_regions, True)
        curves[method] = {r: per_region[r] for r in demo.regions}
    curves["specialist"] = {}
    for region, dataset in demo.region_datasets.items():
        checkpoint = demo.model_folder(dataset, "nnUNetTrainer") / f"fold_{FOLD_NAME}" / "checkpoint_final.pth"
        curves["specialist"].update(region_curves(checkpoint, [region], False))
    iterations = demo.preset.iterations
    return {
        method: {
            region: {"iterations_per_epoch": iterations, "values": values, "end": curve_end(values)}
            for region, values in per_region.items()
        }
        for method, per_region in curves.items()
    }
