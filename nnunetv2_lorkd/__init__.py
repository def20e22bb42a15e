"""nnunetv2-lorkd: LoRKD (low-rank knowledge decomposition) for nnU-Net v2."""

from .experts import (
    add_experts,
    backbone_only,
    expert_parameter_report,
    fuse_expert,
    route,
)

__version__ = "0.1.0"
__all__ = ["add_experts", "backbone_only", "expert_parameter_report", "fuse_expert", "route"]
