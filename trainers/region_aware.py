"""RegionAwareTrainer: what every trainer of this plugin does because its dataset merges regions that each annotate
only some classes (the dataset.json ``lorkd`` section, written by lorkd-merge).

It holds the region map and class mask, region-balanced sampling, the region-stratified split, the deep-supervision
weights of the partial-label loss, the validation step with region-restricted pseudo-Dice, the per-region pseudo-Dice
log, the data-loader hook, and the final validation that predicts every case over its region's classes only and
summarises Dice per region. Variants (nnUNetTrainerLoRKD, nnUNetTrainerMTL, nnUNetTrainerSATStyle) override hooks
only: ``_configure_network`` and ``build_network_architecture`` (network), ``_partial_label_loss`` (loss),
``_routing`` / ``_route_case`` (experts), ``_configure_distillation`` and ``_data_loader_class`` (distillation).

Not a trainer to run: nnU-Net's class search never sees this module (no shim in nnunet_ext re-exports it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from nnunetv2_lorkd.files import write_json
from nnunetv2_lorkd.folds import splits_for_cases
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss
from nnunetv2_lorkd.nnunet.runtime import (
    REGION_DICE_KEY,
    OutputRestriction,
    RegionBalancedDataLoader,
    nnunet_data_loader,
    region_balanced_probabilities,
    summarize_validation_by_region,
)
from nnunetv2_lorkd.regions import RegionMap

REGION_SUMMARY_FILE = "summary_lorkd_regions.json"


class RegionAwareTrainer(nnUNetTrainer):
    """nnU-Net's trainer on a merged multi-region dataset: every batch, validation step and validation case is
    scored only on the classes its region annotates (the others may be present but are unlabelled)."""

    # "balanced": every region gets the same share of samples; "cases": nnU-Net's uniform over cases
    lorkd_region_sampling: str = "balanced"
    # torch.compile where nnU-Net compiles (CUDA unless nnUNet_compile is false), and on CPU when nnUNet_compile
    # asks for it (nnU-Net itself never compiles there); False switches it off for a subclass
    lorkd_compile: bool = True
    _compile_logged: bool = False

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise RuntimeError(
                f"{type(self).__name__} needs plain integer labels without an ignore label: which classes a case "
                "annotates comes from the dataset.json 'lorkd' section instead (see lorkd-merge)"
            )
        self.region_map = RegionMap.from_dataset_json(dataset_json)
        num_classes = self.label_manager.num_segmentation_heads
        self.region_class_mask = torch.tensor(self.region_map.class_mask(num_classes), dtype=torch.bool)
        self._output_restriction: OutputRestriction | None = None  # only during the final validation
        self._configure_network(plans, configuration, dataset_json)
        self._register_log_keys()
        self._configure_distillation(configuration)

    # ------------------------------------------------------------------------------------------- hooks
    def _configure_network(self, plans: dict, configuration: str, dataset_json: dict) -> None:
        """Record the network's own settings in the plans: nnU-Net's predictor rebuilds the network from plans.json
        through build_network_architecture, which sees nothing else. The base network needs none."""

    def _configure_distillation(self, configuration: str) -> None:
        """Set up distillation from a teacher; the base trains on labels only (nnUNetTrainerLoRKD distils)."""

    def _partial_label_loss(self) -> nn.Module:
        """The per-output loss ``loss(output, target, class_mask)`` that only supervises each sample's classes."""
        raise NotImplementedError(f"{type(self).__name__} must define its partial-label loss")

    def _routing(self, region_ids: Sequence[int]) -> contextlib.AbstractContextManager:
        """Route a training/validation batch's samples to their regions for the forward inside (no experts here)."""
        return contextlib.nullcontext()

    def _route_case(self, region: int | None) -> None:
        """Route (or, with None, un-route) the network for one case of the final validation (no experts here)."""

    def _describe_network(self) -> str:
        return f"{type(self).__name__}: regions {self.region_map.names}, region sampling '{self.lorkd_region_sampling}'"

    def _data_loader_class(self) -> type[nnUNetDataLoader]:
        """The loader nnU-Net's get_dataloaders builds: region-balanced sampling (see get_tr_and_val_datasets)."""
        return RegionBalancedDataLoader

    # ------------------------------------------------------------------------------------------- setup
    def _do_i_compile(self) -> bool:
        """nnU-Net asks this before compiling the network; the decision and its reason go to the log once."""
        compile_it, reason = self._compile_decision()
        if not self._compile_logged:
            self.print_to_log_file(f"torch.compile: {'on' if compile_it else 'off'} ({reason})")
            self._compile_logged = True
        return compile_it

    def _compile_decision(self) -> tuple[bool, str]:
        requested = os.environ.get("nnUNet_compile")  # noqa: SIM112 (nnU-Net's own variable)
        if not self.lorkd_compile:
            return False, f"{type(self).__name__}.lorkd_compile is False"
        if requested is not None and requested.lower() not in ("true", "1", "t"):
            return False, f"nnUNet_compile={requested}"
        if self.device.type == "cpu":
            if requested is not None:
                return True, "nnUNet_compile is set; on CPU nnU-Net itself never compiles"
            return False, "CPU: set nnUNet_compile=t to compile here"
        if not super()._do_i_compile():
            return False, f"nnU-Net does not compile on {self.device.type}"
        return True, "nnU-Net's default; set nnUNet_compile=f to switch it off"

    def _register_log_keys(self) -> None:
        """The per-region pseudo-Dice list, also in a logger restored from a checkpoint that lacks it."""
        self.logger.local_logger.my_fantastic_logging.setdefault(REGION_DICE_KEY, [])

    def initialize(self) -> None:
        super().initialize()
        self.print_to_log_file(self._describe_network(), also_print_to_console=False)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._register_log_keys()

    def _build_loss(self) -> nn.Module:
        """The partial-label loss over every deep-supervision output, nnU-Net's weights (1/2^i, lowest head off)."""
        loss = self._partial_label_loss()
        if not self.enable_deep_supervision:
            return DeepSupervisionPartialLoss(loss)
        weights = np.array([1 / (2**i) for i in range(len(self._get_deep_supervision_scales()))])
        weights[-1] = 1e-6 if self.is_ddp else 0  # DDP needs the lowest head in the graph
        return DeepSupervisionPartialLoss(loss, (weights / weights.sum()).tolist())

    # ------------------------------------------------------------------------------------------- data
    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets; the training one carries the region-balanced sampling probabilities its loader uses."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.lorkd_region_sampling == "balanced":
            dataset_tr.lorkd_sampling_probabilities = region_balanced_probabilities(
                dataset_tr.identifiers, self.region_map
            )
        elif self.lorkd_region_sampling != "cases":
            raise ValueError(f"lorkd_region_sampling must be 'balanced' or 'cases', got {self.lorkd_region_sampling!r}")
        return dataset_tr, dataset_val

    def do_split(self):
        """Without a splits_final.json (lorkd-merge writes one), create a region-stratified one instead of
        nnU-Net's region-blind default."""
        splits_file = os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and not os.path.isfile(splits_file):
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            cases = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
            save_json(splits_for_cases(self.region_map, cases), splits_file)
            self.print_to_log_file(f"Created a region-stratified 5-fold split: {splits_file}")
        return super().do_split()

    def get_dataloaders(self):
        with nnunet_data_loader(self._data_loader_class()):
            return super().get_dataloaders()

    def _class_mask(self, region_ids: Sequence[int]) -> torch.Tensor:
        """(B, num_classes) which output channels each sample's region annotates (background always)."""
        return self.region_class_mask[list(region_ids)].to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, batch: dict) -> dict:
        region_ids = self.region_map.region_ids(batch["keys"])
        self.loss.set_class_mask(self._class_mask(region_ids))
        with self._routing(region_ids):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        """Validation loss plus pseudo-Dice the way the final validation (and a fused region model) predicts: argmax
        over background and the sample's region classes only, each class counted only on samples annotated for it."""
        region_ids = self.region_map.region_ids(batch["keys"])
        class_mask = self._class_mask(region_ids)
        self.loss.set_class_mask(class_mask)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device)
        )
        with (
            self._routing(region_ids),
            autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context(),
        ):
            output = self.network(data)
            loss = self.loss(output, target)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        spatial = [1] * (output.ndim - 2)
        logits = output.float().masked_fill(~class_mask.view(*class_mask.shape, *spatial), float("-inf"))
        onehot = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=list(range(2, output.ndim)))
        annotated = class_mask.float()
        stats = [(s * annotated).sum(0)[1:].detach().cpu().numpy() for s in (tp, fp, fn)]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": stats[0], "fp_hard": stats[1], "fn_hard": stats[2]}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        """nnU-Net's per-class pseudo-Dice, plus its mean per region (logged under REGION_DICE_KEY)."""
        with np.errstate(invalid="ignore", divide="ignore"):  # classes not validated this epoch are NaN
            super().on_validation_epoch_end(val_outputs)
        dice = np.array(self.logger.get_value("dice_per_class_or_region", step=-1), dtype=float)
        per_region = []
        for region in range(self.region_map.num_regions):
            values = dice[np.array(self.region_map.label_values(region)) - 1]
            per_region.append(float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"))
        self.logger.log(REGION_DICE_KEY, per_region, self.current_epoch)
        self.print_to_log_file(
            "Pseudo dice per region: "
            + ", ".join(f"{n} {d:.4f}" for n, d in zip(self.region_map.names, per_region, strict=True))
        )

    # ------------------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation with every case routed to its region and predicted over that region's classes only
        (an unannotated class may really be present in a case, and its reference cannot score it); then a per-region
        Dice summary."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        base_dataset_class = self.dataset_class
        self._output_restriction = OutputRestriction(self.network)
        self.dataset_class = self._routed_dataset_class(base_dataset_class)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = base_dataset_class
            self._output_restriction.remove()
            self._output_restriction = None
            self._route_case(None)
        if self.local_rank == 0:
            self._summarize_by_region()

    def _route_validation_case(self, case_id: str) -> None:
        """Called right before the final validation loads (and then predicts) ``case_id``: route the network to the
        case's region and let through only that region's classes, as the fused region model would predict."""
        region = self.region_map.region_of_case(case_id)
        self._route_case(region)
        num_classes = self.label_manager.num_segmentation_heads
        self._output_restriction.set_allowed(self.region_map.channels(region), num_classes, self.device)

    def _routed_dataset_class(self, dataset_class: type) -> type:
        """``dataset_class`` whose load_case first calls this trainer's _route_validation_case.

        nnU-Net 2.8.1's perform_actual_validation takes no per-case hook: it builds its validation dataset as
        ``self.dataset_class(...)`` and predicts each case right after ``dataset.load_case(key)``, so load_case is
        the only place that learns which case comes next. A subclass made per validation binds this trainer, so no
        module-level state is needed."""
        route = self._route_validation_case

        class RoutedDataset(dataset_class):
            def load_case(self, identifier: str):
                route(identifier)
                return super().load_case(identifier)

        RoutedDataset.__name__ = RoutedDataset.__qualname__ = f"Routed{dataset_class.__name__}"
        return RoutedDataset

    def _summarize_by_region(self) -> None:
        """Mean Dice per region over its own classes (nnU-Net's summary averages every class over every case)."""
        validation_folder = os.path.join(self.output_folder, "validation")
        summary_file = os.path.join(validation_folder, "summary.json")
        if not os.path.isfile(summary_file):
            return
        per_region = summarize_validation_by_region(summary_file, self.region_map, self.dataset_json["file_ending"])
        write_json(os.path.join(validation_folder, REGION_SUMMARY_FILE), per_region)
        for name, values in per_region.items():
            self.print_to_log_file(
                f"Final validation, region {name}: mean Dice {values['mean_dice']:.4f} "
                f"over {values['num_cases']} cases",
                also_print_to_console=True,
            )
