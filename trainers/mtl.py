"""nnUNetTrainerMTL: the multi-task baseline of LoRKD — the same nnU-Net network WITHOUT region experts,
trained on all regions with the same partial-label loss, region-balanced sampling, region-restricted
validation and per-region summary as nnUNetTrainerLoRKD, and optionally the same distillation
(the dataset's lorkd_kd.json). The only difference is the network: one shared set of weights for every region.
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_lorkd_trainers._variants import length_variants, smoke_variant
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from nnunetv2_lorkd_trainers.region_aware import RegionAwareTrainer

from nnunetv2_lorkd.nnunet.config import PLANS_KEY


class nnUNetTrainerMTL(nnUNetTrainerLoRKD):
    """nnUNetTrainerLoRKD with the experts switched off through its hooks."""

    # nnU-Net's plain network from the plans: no expert layers, so its checkpoints are vanilla
    build_network_architecture = staticmethod(nnUNetTrainer.build_network_architecture)

    def _configure_network(self, plans: dict, configuration: str, dataset_json: dict) -> None:
        """No experts: plans.json of an MTL model must not describe experts its network does not have."""
        plans["configurations"][configuration].pop(PLANS_KEY, None)
        self.configuration_manager.configuration.pop(PLANS_KEY, None)
        self.expert_config = None

    def _describe_network(self) -> str:
        total = sum(p.numel() for p in self.network.parameters())
        return f"MTL baseline: one shared network for regions {self.region_map.names}, {total:,} parameters"

    # no experts to route to: the base's routing, which leaves the one shared network as it is
    _routing = RegionAwareTrainer._routing
    _route_case = RegionAwareTrainer._route_case


nnUNetTrainerMTL_smoke = smoke_variant(nnUNetTrainerMTL, __name__)

# the same training lengths as nnUNetTrainerLoRKD: nnUNetTrainerMTL_1epoch ... _4000epochs
_LENGTH_VARIANTS = length_variants(nnUNetTrainerMTL, __name__)
globals().update(_LENGTH_VARIANTS)
__all__ = ["nnUNetTrainerMTL", "nnUNetTrainerMTL_smoke", *_LENGTH_VARIANTS]
