"""LoRKD core: low-rank region experts with efficient knowledge separation and fusion.

Imports nothing from nnU-Net; it works on any torch network and knows the layout of
dynamic-network-architectures U-Nets only by attribute names (`encoder`, `decoder.seg_layers`, ...).
"""

from .layer import (
    ExpertConv2d,
    ExpertConv3d,
    ExpertConvTranspose2d,
    ExpertConvTranspose3d,
    ExpertLayer,
)
from .model import (
    ConvExperts,
    ExpertParameterReport,
    add_experts,
    backbone_parameter_count,
    expert_parameter_report,
    fuse_expert,
    merge_experts,
    unmerge_experts,
    unwrap_network,
)
from .routing import (
    RoutedLayer,
    RoutingError,
    RoutingPlan,
    backbone_only,
    expert_layers,
    group_by_region,
    route,
    set_routing,
)

__all__ = [
    "ConvExperts",
    "ExpertConv2d",
    "ExpertConv3d",
    "ExpertConvTranspose2d",
    "ExpertConvTranspose3d",
    "ExpertLayer",
    "ExpertParameterReport",
    "RoutedLayer",
    "RoutingError",
    "RoutingPlan",
    "add_experts",
    "backbone_only",
    "backbone_parameter_count",
    "expert_layers",
    "expert_parameter_report",
    "fuse_expert",
    "group_by_region",
    "merge_experts",
    "route",
    "set_routing",
    "unmerge_experts",
    "unwrap_network",
]
