"""nnUNetTrainerLoRKD: nnU-Net's trainer with low-rank region experts, one forward per mixed-region batch,
a partial-label loss, region-balanced sampling, per-region validation and, when the dataset's
lorkd_kd.json turns it on, distillation from a frozen teacher (L = L_seg + lambda * L_KD, docs/distillation.md).

Thin by design: each override routes the batch (or case) to its experts and hands over to nnU-Net's own
implementation; the logic lives in ``nnunetv2_lorkd``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_lorkd_trainers._variants import LENGTHS, length_name, length_variant, smoke_variant
from torch import autocast, nn

from nnunetv2_lorkd.experts import expert_parameter_report, route, set_routing, unwrap_network
from nnunetv2_lorkd.kd.data import kd_loaders
from nnunetv2_lorkd.kd.progress import KD_LOSS_KEY, SEG_LOSS_KEY, LoRKDLocalLogger
from nnunetv2_lorkd.kd.session import Distillation
from nnunetv2_lorkd.kd.teacher import student_preprocessing
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss, PartialLabelDiceCELoss
from nnunetv2_lorkd.nnunet.config import ExpertConfig
from nnunetv2_lorkd.nnunet.runtime import (
    ROUTED_DATASET_FOR,
    OutputRestriction,
    case_hook,
    region_balanced_probabilities,
    summarize_validation_by_region,
)
from nnunetv2_lorkd.pretrained import (
    PretrainedReport,
    class_names_by_channel,
    load_pretrained_into,
    read_source_checkpoint,
    register_pretrained_loader,
)
from nnunetv2_lorkd.regions import RegionMap
from nnunetv2_lorkd.splits import splits_for_cases

REGION_DICE_KEY = "lorkd_region_dice"
__all__ = [
    "nnUNetTrainerLoRKD",
    "nnUNetTrainerLoRKD_smoke",
    *(length_name("nnUNetTrainerLoRKD", n) for n in LENGTHS),
]


class nnUNetTrainerLoRKD(nnUNetTrainer):
    """Region experts on nnU-Net's network. Every expert-specific step goes through the hooks
    ``build_network_architecture``, ``_configure_experts``, ``_routing``, ``_route_case`` and
    ``_describe_network``, so a subclass can switch the experts off (nnUNetTrainerMTL) and keep the rest."""

    # expert defaults (LoRKD: r=8, alpha=16, decoder 2x); a dataset's dataset.json `lorkd.experts` overrides
    lorkd_rank: int = 8
    lorkd_alpha: float = 16.0
    lorkd_decoder_rank_factor: int = 2
    lorkd_ranks: tuple[int, ...] | None = None
    lorkd_fixed_scaling: float | None = None
    # "balanced": every region gets the same share of samples; "cases": nnU-Net's uniform over cases
    lorkd_region_sampling: str = "balanced"
    # False: never distil, whatever lorkd_kd.json says (for a subclass that must train on labels only)
    lorkd_distill: bool = True

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
                f"{type(self).__name__} needs plain integer labels without an ignore label: regions are defined by the "
                "dataset.json 'lorkd' section instead (see lorkd-merge)"
            )
        self.region_map = RegionMap.from_dataset_json(dataset_json)
        self.expert_config: ExpertConfig | None = self._configure_experts(plans, configuration, dataset_json)
        num_classes = self.label_manager.num_segmentation_heads
        self.region_class_mask = torch.tensor(self.region_map.class_mask(num_classes), dtype=torch.bool)
        local = LoRKDLocalLogger(self.logger.local_logger.verbose)  # nnU-Net's logger plus the KD keys and panel
        local.my_fantastic_logging.update(self.logger.local_logger.my_fantastic_logging)
        self.logger.local_logger = local
        self._register_log_keys()
        self._compile_note_logged = False
        # distillation: the dataset's lorkd_kd.json decides (no entry for this configuration = off, said so here)
        if self.lorkd_distill:
            self.distillation, note = Distillation.from_preprocessed(
                self.preprocessed_dataset_folder_base,
                self.plans_manager.dataset_name,
                configuration,
                self.plans_manager.plans_name,
                self.configuration_manager.data_identifier,
                self.region_map,
            )
        else:
            self.distillation, note = None, f"Distillation: OFF ({type(self).__name__}.lorkd_distill is False)"
        self.print_to_log_file(note)

    def _configure_experts(self, plans: dict, configuration: str, dataset_json: dict) -> ExpertConfig | None:
        """Resolve the expert hyper-parameters and record them in the plans (the predictor rebuilds from them)."""
        defaults = {
            "rank": self.lorkd_rank,
            "alpha": self.lorkd_alpha,
            "decoder_rank_factor": self.lorkd_decoder_rank_factor,
            "ranks": self.lorkd_ranks,
            "fixed_scaling": self.lorkd_fixed_scaling,
        }
        config = ExpertConfig.resolve(defaults, self.region_map, dataset_json)
        config.store_in(plans, configuration, self.configuration_manager.configuration)
        return config

    def _register_log_keys(self) -> None:
        self.logger.local_logger.my_fantastic_logging.setdefault(REGION_DICE_KEY, [])
        self.logger.local_logger.ensure_keys()

    # ------------------------------------------------------------------------------------------- network
    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """nnU-Net's network from the plans, with the experts recorded in the plans configuration."""
        config = ExpertConfig.from_configuration(configuration_manager.configuration)
        net = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )
        return config.apply(net)

    def initialize(self) -> None:
        super().initialize()
        self.print_to_log_file(self._describe_network(), also_print_to_console=False)
        self._accept_pretrained_weights()

    # ------------------------------------------------------------------------------- pretrained weights
    def _accept_pretrained_weights(self) -> None:
        """nnU-Net's -pretrained_weights calls a module function with the network alone; have it call
        load_pretrained_weights below instead (nnU-Net's would demand expert weights and drop the heads)."""
        register_pretrained_loader(self.network, self.load_pretrained_weights)

    def load_pretrained_weights(self, fname: str) -> PretrainedReport:
        """Start from a trained model: the plain network (W0) and the heads of the classes the source has,
        matched by name, from any nnU-Net checkpoint of these plans; experts fresh (nnunetv2_lorkd.pretrained)."""
        if not self.was_initialized:
            self.initialize()
        source = read_source_checkpoint(fname)
        names = class_names_by_channel(self.dataset_json, "this training's dataset.json")
        report = load_pretrained_into(self.network, source, names)
        self.print_to_log_file(report.summary())
        return report

    def _describe_network(self) -> str:
        report = expert_parameter_report(self.network)
        return (
            f"LoRKD: {len(self.region_map.names)} region experts {self.region_map.names}, {self.expert_config}\n"
            + report.format()
        )

    def _routing(self, region_ids: Sequence[int]) -> contextlib.AbstractContextManager:
        """Route a training/validation batch's samples to their region experts for the forward inside."""
        return route(self.network, region_ids)

    def _route_case(self, region: int | None) -> None:
        """Route (or, with None, un-route) the network for one case of the final validation."""
        set_routing(unwrap_network(self.network), region)

    def _do_i_compile(self) -> bool:
        if super()._do_i_compile() and not self._compile_note_logged:
            self.print_to_log_file(
                f"torch.compile is off for {type(self).__name__}: the region mix of each batch decides which expert "
                "weights are built (and which output channels count), which would recompile or break the graph on "
                "every new mix"
            )
            self._compile_note_logged = True
        return False

    def _build_loss(self) -> nn.Module:
        """The partial-label Dice+CE over the deep-supervision outputs, plus lambda * KD when distillation is on."""
        loss = PartialLabelDiceCELoss(batch_dice=self.configuration_manager.batch_dice)
        if not self.enable_deep_supervision:
            segmentation = DeepSupervisionPartialLoss(loss)
        else:
            weights = np.array([1 / (2**i) for i in range(len(self._get_deep_supervision_scales()))])
            weights[-1] = 1e-6 if self.is_ddp else 0  # DDP needs the lowest head in the graph
            segmentation = DeepSupervisionPartialLoss(loss, (weights / weights.sum()).tolist())
        return segmentation if self.distillation is None else self.distillation.wrap_loss(segmentation)

    # ------------------------------------------------------------------------------------------- data
    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.lorkd_region_sampling == "balanced":
            dataset_tr.lorkd_sampling_probabilities = region_balanced_probabilities(
                dataset_tr.identifiers, self.region_map
            )
        elif self.lorkd_region_sampling != "cases":
            raise ValueError(f"lorkd_region_sampling must be 'balanced' or 'cases', got {self.lorkd_region_sampling!r}")
        if self.distillation is not None:  # before any step: load the teacher, or check the cache and attach it
            case_regions = {case: self.region_map.region_of_case(case) for case in dataset_tr.identifiers}
            student = student_preprocessing(
                self.plans_manager.plans, self.configuration_name, self.dataset_json, f"student {type(self).__name__}"
            )
            note = self.distillation.prepare(
                self.device,
                dataset_tr,
                case_regions,
                self.loss,
                student,
                validation_cases=dataset_val.identifiers,
                fold=self.fold,
            )
            self.print_to_log_file(note)
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
        with kd_loaders():  # region-balanced sampling; cached soft labels ride along when the dataset has them
            return super().get_dataloaders()

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.distillation is not None and self.local_rank == 0:
            self.print_to_log_file(f"KD settings of this run: {self.distillation.write_record(self.output_folder)}")

    def _class_mask(self, region_ids: list[int]) -> torch.Tensor:
        return self.region_class_mask[region_ids].to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, batch: dict) -> dict:
        region_ids = self.region_map.region_ids(batch["keys"])
        self.loss.set_class_mask(self._class_mask(region_ids))
        if self.distillation is None:
            with self._routing(region_ids):
                return super().train_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        # the teacher sees exactly the augmented patch the student sees (online), or its cached soft labels
        # augmented together with it (cached)
        self.loss.set_teacher(self.distillation.batch_probabilities(batch, data, region_ids), region_ids)
        try:
            with self._routing(region_ids):
                result = super().train_step({**batch, "data": data})
        finally:
            self.loss.set_teacher(None)
        result["kd_loss"] = self.loss.last_distillation.cpu().numpy()
        result["seg_loss"] = self.loss.last_segmentation.cpu().numpy()
        return result

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        for key, log_key in (("kd_loss", KD_LOSS_KEY), ("seg_loss", SEG_LOSS_KEY)):
            values = [float(o[key]) for o in train_outputs if key in o]
            if self.is_ddp:
                gathered: list = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, values)
                values = [v for part in gathered for v in part]
            if key == "seg_loss" and not values:  # without KD the training loss is the segmentation loss
                value = float(self.logger.get_value("train_losses", step=-1))
            else:
                value = float(np.mean(values)) if values else math.nan
            self.logger.log(log_key, value, self.current_epoch)
        if self.distillation is not None:
            self.print_to_log_file(
                f"train seg loss {self.logger.get_value(SEG_LOSS_KEY, step=-1):.4f}, "
                f"KD loss {self.logger.get_value(KD_LOSS_KEY, step=-1):.4f} "
                f"(weight {self.distillation.settings.weight:g})"
            )

    def validation_step(self, batch: dict) -> dict:
        """Validation loss plus pseudo-Dice the way a fused region model predicts: argmax over background and
        the sample's region classes only, each class counted only on samples annotated for it."""
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
        with np.errstate(invalid="ignore", divide="ignore"):  # classes not validated this epoch are NaN
            super().on_validation_epoch_end(val_outputs)
        dice = np.array(self.logger.get_value("dice_per_class_or_region", step=-1), dtype=float)
        per_region = [
            float(np.nanmean(dice[np.array(v) - 1])) if np.isfinite(dice[np.array(v) - 1]).any() else float("nan")
            for v in (self.region_map.label_values(r) for r in range(self.region_map.num_regions))
        ]
        self.logger.log(REGION_DICE_KEY, per_region, self.current_epoch)
        self.print_to_log_file(
            "Pseudo dice per region: "
            + ", ".join(f"{n} {d:.4f}" for n, d in zip(self.region_map.names, per_region, strict=True))
        )

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._register_log_keys()

    # ------------------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation, with every case routed to its region's expert and predicted over that
        region's classes only; then a per-region Dice summary."""
        restriction = OutputRestriction(self.network)
        num_classes = self.label_manager.num_segmentation_heads

        def on_case(case_id: str) -> None:
            region = self.region_map.region_of_case(case_id)
            self._route_case(region)
            restriction.set_allowed(self.region_map.channels(region), num_classes, self.device)

        base_dataset_class = self.dataset_class
        self.dataset_class = ROUTED_DATASET_FOR.get(base_dataset_class, base_dataset_class)
        if self.dataset_class is base_dataset_class:
            raise RuntimeError(
                f"nnUNetTrainerLoRKD cannot route validation cases of dataset class {base_dataset_class}"
            )
        try:
            with case_hook(on_case):
                super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = base_dataset_class
            restriction.remove()
            self._route_case(None)
        if self.local_rank == 0:
            self._summarize_by_region()

    def _summarize_by_region(self) -> None:
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if not os.path.isfile(summary_file):
            return
        per_region = summarize_validation_by_region(summary_file, self.region_map, self.dataset_json["file_ending"])
        with open(os.path.join(self.output_folder, "validation", "summary_lorkd_regions.json"), "w") as f:
            json.dump(per_region, f, indent=2)
        for name, values in per_region.items():
            self.print_to_log_file(
                f"Final validation, region {name}: mean Dice {values['mean_dice']:.4f} "
                f"over {values['num_cases']} cases",
                also_print_to_console=True,
            )


nnUNetTrainerLoRKD_smoke = smoke_variant(nnUNetTrainerLoRKD, __name__)


def _length_variant(epochs: int) -> type[nnUNetTrainerLoRKD]:
    return length_variant(nnUNetTrainerLoRKD, epochs, __name__)


# the same training lengths nnU-Net offers for nnUNetTrainer
nnUNetTrainerLoRKD_1epoch = _length_variant(1)
nnUNetTrainerLoRKD_5epochs = _length_variant(5)
nnUNetTrainerLoRKD_10epochs = _length_variant(10)
nnUNetTrainerLoRKD_20epochs = _length_variant(20)
nnUNetTrainerLoRKD_50epochs = _length_variant(50)
nnUNetTrainerLoRKD_100epochs = _length_variant(100)
nnUNetTrainerLoRKD_250epochs = _length_variant(250)
nnUNetTrainerLoRKD_500epochs = _length_variant(500)
nnUNetTrainerLoRKD_2000epochs = _length_variant(2000)
nnUNetTrainerLoRKD_4000epochs = _length_variant(4000)
