"""Pieces the region-aware trainers (trainers/region_aware.py) plug into nnU-Net's loop: balanced sampling, the
data-loader swap, restricting outputs to a region's classes, and the per-region validation summary."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn

from nnunetv2_lorkd.regions import RegionMap

# the logging key of the per-region pseudo-Dice of every epoch (nnunetv2_lorkd.demo.curves reads it from checkpoints)
REGION_DICE_KEY = "lorkd_region_dice"

# classes outside the routed region get (lowest allowed logit - this margin) per voxel: argmax never picks
# them, softmax gives them < 1e-21, and the values stay in the range of real logits, so nnU-Net's
# Gaussian-weighted fp16 accumulation cannot overflow (a constant like -1e4 does)
EXCLUDED_CLASS_MARGIN = 50.0


def region_balanced_probabilities(case_ids: Sequence[str], region_map: RegionMap) -> np.ndarray:
    """Sampling probabilities aligned with `case_ids`: every region present gets the same share, spread
    evenly over its cases, so a region with few scans is not drowned out by one with many."""
    regions = np.array(region_map.region_ids(case_ids))
    present, counts = np.unique(regions, return_counts=True)
    per_case = {int(r): 1.0 / (len(present) * c) for r, c in zip(present, counts, strict=True)}
    probs = np.array([per_case[int(r)] for r in regions])
    return probs / probs.sum()


class RegionBalancedDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader, sampling with the probabilities its dataset carries (if any)."""

    def __init__(self, data, *args, sampling_probabilities=None, **kwargs):
        probabilities = getattr(data, "lorkd_sampling_probabilities", None)
        super().__init__(
            data,
            *args,
            sampling_probabilities=probabilities if probabilities is not None else sampling_probabilities,
            **kwargs,
        )


@contextlib.contextmanager
def nnunet_data_loader(loader_class: type[nnUNetDataLoader]) -> Iterator[None]:
    """While active, nnU-Net's get_dataloaders builds ``loader_class`` instead of nnUNetDataLoader.

    nnU-Net 2.8.1 names nnUNetDataLoader inside get_dataloaders (a global of its trainer module) and takes no loader
    class, so swapping that global for the duration of the call is the only way in short of copying the method.
    The one place that swaps it: RegionAwareTrainer.get_dataloaders (trainers/region_aware.py)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = loader_class
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original


class OutputRestriction:
    """A forward hook that sets the logits of classes outside the current region to a very low value, so a
    routed network predicts exactly like the fused region model (whose heads only have the region's classes)."""

    def __init__(self, net: nn.Module):
        self.excluded: torch.Tensor | None = None
        # on the module that is called (a torch.compile or DDP wrapper included), so the hook runs eagerly around
        # the compiled graph; a hook on the wrapped module would be traced into the graph, or, added after the
        # graph was built, never run at all (dynamo does not guard on hooks)
        self._handle = net.register_forward_hook(self._hook)

    def set_allowed(self, channels: Sequence[int], num_classes: int, device: torch.device) -> None:
        excluded = torch.ones(num_classes, dtype=torch.bool)
        excluded[list(channels)] = False
        self.excluded = excluded.to(device)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor | list[torch.Tensor]):
        if self.excluded is None:
            return output
        outputs = output if isinstance(output, list | tuple) else [output]
        for out in outputs:
            floor = out[:, ~self.excluded].amin(1, keepdim=True) - EXCLUDED_CLASS_MARGIN
            out[:, self.excluded] = floor.expand(-1, int(self.excluded.sum()), *out.shape[2:])
        return output

    def remove(self) -> None:
        self._handle.remove()


def summarize_validation_by_region(summary_file: str, region_map: RegionMap, file_ending: str) -> dict:
    """Mean Dice per region over that region's classes and validation cases, from nnU-Net's summary.json."""
    with open(summary_file) as f:
        summary = json.load(f)
    per_region: dict[str, dict] = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["reference_file"])[: -len(file_ending)]
        region = region_map.region_of_case(case)
        name = region_map.names[region]
        bucket = per_region.setdefault(name, {"cases": [], "per_class": {}})
        bucket["cases"].append(case)
        for label in region_map.label_values(region):
            dice = entry["metrics"].get(str(label), {}).get("Dice")
            if dice is not None and not np.isnan(dice):
                bucket["per_class"].setdefault(str(label), []).append(dice)
    result = {}
    for name, bucket in per_region.items():
        class_means = {k: float(np.mean(v)) for k, v in bucket["per_class"].items()}
        result[name] = {
            "num_cases": len(bucket["cases"]),
            "mean_dice": float(np.mean(list(class_means.values()))) if class_means else float("nan"),
            "dice_per_class": class_means,
        }
    return result
