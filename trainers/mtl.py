"""nnUNetTrainerMTL: the multi-task baseline of LoRKD — the same nnU-Net network WITHOUT region experts,
trained on all regions with the same partial-label loss, region-balanced sampling, region-restricted
validation and per-region summary as nnUNetTrainerLoRKD, and optionally the same distillation
(the dataset's lorkd_kd.json). The only difference is the network: one shared set of weights for every region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_lorkd_trainers._variants import LENGTHS, length_name, length_variant, smoke_variant
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from torch import nn

from nnunetv2_lorkd.nnunet.config import PLANS_KEY, ExpertConfig

__all__ = [
    "nnUNetTrainerMTL",
    "nnUNetTrainerMTL_smoke",
    *(length_name("nnUNetTrainerMTL", n) for n in LENGTHS),
]


class nnUNetTrainerMTL(nnUNetTrainerLoRKD):
    """nnUNetTrainerLoRKD with the experts switched off through its hooks."""

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """nnU-Net's plain network from the plans: no expert layers, so its checkpoints are vanilla."""
        return nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )

    def _configure_experts(self, plans: dict, configuration: str, dataset_json: dict) -> ExpertConfig | None:
        # plans.json of an MTL model must not describe experts its network does not have
        plans["configurations"][configuration].pop(PLANS_KEY, None)
        self.configuration_manager.configuration.pop(PLANS_KEY, None)
        return None

    def _describe_network(self) -> str:
        total = sum(p.numel() for p in self.network.parameters())
        return f"MTL baseline: one shared network for regions {self.region_map.names}, {total:,} parameters"

    def _routing(self, region_ids: Sequence[int]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _route_case(self, region: int | None) -> None:
        return None


nnUNetTrainerMTL_smoke = smoke_variant(nnUNetTrainerMTL, __name__)


def _length_variant(epochs: int) -> type[nnUNetTrainerMTL]:
    return length_variant(nnUNetTrainerMTL, epochs, __name__)


# the same training lengths as nnUNetTrainerLoRKD
nnUNetTrainerMTL_1epoch = _length_variant(1)
nnUNetTrainerMTL_5epochs = _length_variant(5)
nnUNetTrainerMTL_10epochs = _length_variant(10)
nnUNetTrainerMTL_20epochs = _length_variant(20)
nnUNetTrainerMTL_50epochs = _length_variant(50)
nnUNetTrainerMTL_100epochs = _length_variant(100)
nnUNetTrainerMTL_250epochs = _length_variant(250)
nnUNetTrainerMTL_500epochs = _length_variant(500)
nnUNetTrainerMTL_2000epochs = _length_variant(2000)
nnUNetTrainerMTL_4000epochs = _length_variant(4000)
