"""nnUNetTrainerLoRKD: nnU-Net's trainer with low-rank region experts, one forward per mixed-region batch,
a partial-label loss and, when the dataset's lorkd_kd.json turns it on, distillation from a frozen teacher
(L = L_seg + lambda * L_KD, docs/distillation.md). Region-balanced sampling, per-region validation and the
region-restricted final validation come from RegionAwareTrainer (region_aware.py).

Thin by design: each override routes the batch (or case) to its experts or adds the distillation term and hands
over to the base; the logic lives in ``nnunetv2_lorkd``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_lorkd_trainers._variants import length_variants, smoke_variant
from nnunetv2_lorkd_trainers.region_aware import RegionAwareTrainer
from torch import nn

from nnunetv2_lorkd.experts import expert_parameter_report, route, set_routing, unwrap_network
from nnunetv2_lorkd.kd.data import KDDataLoader
from nnunetv2_lorkd.kd.progress import KD_LOSS_KEY, SEG_LOSS_KEY, LoRKDLocalLogger
from nnunetv2_lorkd.kd.session import Distillation
from nnunetv2_lorkd.kd.teacher_inference import student_preprocessing
from nnunetv2_lorkd.losses import PartialLabelDiceCELoss
from nnunetv2_lorkd.nnunet.config import ExpertConfig
from nnunetv2_lorkd.nnunet.pretrained import (
    PretrainedReport,
    class_names_by_channel,
    load_pretrained_into,
    read_source_checkpoint,
    register_pretrained_loader,
)


class nnUNetTrainerLoRKD(RegionAwareTrainer):
    """Region experts on nnU-Net's network, plus distillation. Every expert-specific step goes through the hooks
    ``_configure_network``, ``build_network_architecture``, ``_routing``, ``_route_case`` and
    ``_describe_network``, so a subclass can switch the experts off (nnUNetTrainerMTL) and keep the rest;
    distillation through ``_configure_distillation``, ``_build_loss``, ``_data_loader_class`` and ``train_step``."""

    # expert defaults (LoRKD: r=8, alpha=16, decoder 2x); a dataset's dataset.json `lorkd.experts` overrides
    lorkd_rank: int = 8
    lorkd_alpha: float = 16.0
    lorkd_decoder_rank_factor: int = 2
    lorkd_ranks: tuple[int, ...] | None = None
    lorkd_fixed_scaling: float | None = None
    # False: never distil, whatever lorkd_kd.json says (for a subclass that must train on labels only)
    lorkd_distill: bool = True

    # ------------------------------------------------------------------------------------------- network
    def _configure_network(self, plans: dict, configuration: str, dataset_json: dict) -> None:
        """Resolve the expert hyper-parameters and record them in the plans (the predictor rebuilds from them)."""
        defaults = {
            "rank": self.lorkd_rank,
            "alpha": self.lorkd_alpha,
            "decoder_rank_factor": self.lorkd_decoder_rank_factor,
            "ranks": self.lorkd_ranks,
            "fixed_scaling": self.lorkd_fixed_scaling,
        }
        self.expert_config: ExpertConfig | None = ExpertConfig.resolve(defaults, self.region_map, dataset_json)
        self.expert_config.store_in(plans, configuration, self.configuration_manager.configuration)

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
        self._accept_pretrained_weights()

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

    # ------------------------------------------------------------------------------- pretrained weights
    def _accept_pretrained_weights(self) -> None:
        """nnU-Net's -pretrained_weights calls a module function with the network alone; have it call
        load_pretrained_weights below instead (nnU-Net's would demand expert weights and drop the heads)."""
        register_pretrained_loader(self.network, self.load_pretrained_weights)

    def load_pretrained_weights(self, fname: str) -> PretrainedReport:
        """Start from a trained model: the plain network (W0) and the heads of the classes the source has,
        matched by name, from any nnU-Net checkpoint of these plans; experts fresh (nnunet/pretrained.py)."""
        if not self.was_initialized:
            self.initialize()
        source = read_source_checkpoint(fname)
        names = class_names_by_channel(self.dataset_json, "this training's dataset.json")
        report = load_pretrained_into(self.network, source, names)
        self.print_to_log_file(report.summary())
        return report

    # ------------------------------------------------------------------------------------- distillation
    def _register_log_keys(self) -> None:
        """The base's keys plus the KD ones; the logger becomes nnU-Net's plus the KD keys and panel."""
        if not isinstance(self.logger.local_logger, LoRKDLocalLogger):
            local = LoRKDLocalLogger(self.logger.local_logger.verbose)
            local.my_fantastic_logging.update(self.logger.local_logger.my_fantastic_logging)
            self.logger.local_logger = local
        super()._register_log_keys()
        self.logger.local_logger.ensure_keys()

    def _configure_distillation(self, configuration: str) -> None:
        """The dataset's lorkd_kd.json decides (no entry for this configuration = off, said so in the log)."""
        self.distillation: Distillation | None = None
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
            note = f"Distillation: OFF ({type(self).__name__}.lorkd_distill is False)"
        self.print_to_log_file(note)

    def _partial_label_loss(self) -> nn.Module:
        return PartialLabelDiceCELoss(batch_dice=self.configuration_manager.batch_dice)

    def _build_loss(self) -> nn.Module:
        """The base's partial-label loss, plus lambda * KD when distillation is on."""
        segmentation = super()._build_loss()
        return segmentation if self.distillation is None else self.distillation.wrap_loss(segmentation)

    def _data_loader_class(self) -> type[nnUNetDataLoader]:
        """Cached soft labels ride along with each patch (augmented together with it) in the KD loader."""
        if self.distillation is not None and self.distillation.cached:
            return KDDataLoader
        return super()._data_loader_class()

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
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

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.distillation is not None and self.local_rank == 0:
            self.print_to_log_file(f"KD settings of this run: {self.distillation.write_record(self.output_folder)}")

    def train_step(self, batch: dict) -> dict:
        """The base's step; with distillation the teacher sees exactly the augmented patch the student sees
        (online), or its cached soft labels come augmented together with it (cached)."""
        if self.distillation is None:
            return super().train_step(batch)
        region_ids = self.region_map.region_ids(batch["keys"])
        data = batch["data"].to(self.device, non_blocking=True)
        self.loss.set_teacher(self.distillation.batch_probabilities(batch, data, region_ids), region_ids)
        try:
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


nnUNetTrainerLoRKD_smoke = smoke_variant(nnUNetTrainerLoRKD, __name__)
# the same training lengths nnU-Net offers for nnUNetTrainer: nnUNetTrainerLoRKD_1epoch ... _4000epochs
_LENGTH_VARIANTS = length_variants(nnUNetTrainerLoRKD, __name__)
globals().update(_LENGTH_VARIANTS)
__all__ = ["nnUNetTrainerLoRKD", "nnUNetTrainerLoRKD_smoke", *_LENGTH_VARIANTS]
