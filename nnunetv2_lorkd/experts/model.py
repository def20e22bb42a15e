"""Network-level operations: add experts, fuse one region into a plain network, count parameters."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .layer import EXPERT_CLASS_FOR
from .routing import RoutingError, expert_layers

logger = logging.getLogger("nnunetv2_lorkd")

ROLES = ("encoder", "decoder", "transposed", "seg_head")


def unwrap_network(net: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(net, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(net, nn.parallel.DistributedDataParallel):
            inner = net.module
        if inner is None:
            return net
        net = inner


def _replace_by_identity(root: nn.Module, mapping: dict[int, nn.Module]) -> None:
    """Swap modules everywhere they are registered, so aliases (`.conv` and `.all_modules.0`, the encoder
    under `decoder.encoder`) all point at the replacement."""
    for module in list(root.modules()):
        for key, child in module._modules.items():
            if child is not None and id(child) in mapping:
                module._modules[key] = mapping[id(child)]


def _roles(net: nn.Module) -> dict[int, str]:
    """Role of each conv by identity. dynamic-network-architectures U-Nets have `encoder` and `decoder`
    (with `transpconvs`, `stages`, `seg_layers`); any other network is treated as one encoder."""
    roles: dict[int, str] = {}
    encoder = getattr(net, "encoder", None)
    decoder = getattr(net, "decoder", None)
    if not (isinstance(encoder, nn.Module) and isinstance(decoder, nn.Module)):
        return roles
    for sub, role in (  # later entries win: the encoder is also registered as decoder.encoder
        (decoder, "decoder"),
        (getattr(decoder, "seg_layers", None), "seg_head"),
        (getattr(decoder, "transpconvs", None), "transposed"),
        (encoder, "encoder"),
    ):
        if isinstance(sub, nn.Module):
            roles.update({id(m): role for m in sub.modules()})
    return roles


def add_experts(
    net: nn.Module,
    num_experts: int,
    rank: int = 8,
    alpha: float = 16.0,
    decoder_rank_factor: int = 2,
    ranks: Sequence[int] | None = None,
    *,
    fixed_scaling: float | None = None,
    include_transposed: bool = False,
    include_seg_heads: bool = False,
    region_names: Sequence[str] | None = None,
    report: Callable[[str], None] | None = None,
) -> nn.Module:
    """Give every convolution of the encoder and decoder stages `num_experts` low-rank experts, in place.

    Expert t of an encoder conv has rank ``ranks[t]`` (default `rank` for all), of a decoder conv
    ``decoder_rank_factor`` times that (LoRKD's default 2x). The scaling is ``alpha / r`` unless
    `fixed_scaling` is given (LoRKD's "imbalance" variant uses a fixed 2). Transposed convs and the 1x1
    segmentation heads stay shared unless asked for; grouped/depthwise convs always stay shared.
    Returns `net`; a summary of what was swapped goes to `report` (default: the package logger).
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    encoder_ranks = tuple(int(r) for r in ranks) if ranks is not None else (rank,) * num_experts
    if len(encoder_ranks) != num_experts:
        raise ValueError(
            f"ranks has {len(encoder_ranks)} entries but num_experts is {num_experts}; give one per expert"
        )
    if any(r < 1 for r in encoder_ranks):
        raise ValueError(f"every rank must be >= 1, got {encoder_ranks}")
    if not isinstance(decoder_rank_factor, int) or decoder_rank_factor < 1:
        raise ValueError(f"decoder_rank_factor must be a positive int, got {decoder_rank_factor!r}")
    names = tuple(region_names) if region_names is not None else None
    if names is not None and len(names) != num_experts:
        raise ValueError(f"region_names has {len(names)} entries but num_experts is {num_experts}")
    if expert_layers(net):
        raise ValueError("this network already has experts; build a fresh network to change them")
    decoder_ranks = tuple(r * decoder_rank_factor for r in encoder_ranks)

    roles = _roles(net)
    wanted = {"encoder", "decoder"} | ({"transposed"} if include_transposed else set())
    wanted |= {"seg_head"} if include_seg_heads else set()
    mapping: dict[int, nn.Module] = {}
    replaced_originals: list[nn.Module] = []  # keeps ids in `mapping` valid until the swap is done
    counts = dict.fromkeys(ROLES, 0)
    skipped: list[str] = []
    for name, module in net.named_modules():
        cls = EXPERT_CLASS_FOR.get(type(module))
        if cls is None:
            continue
        is_transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        role = roles.get(id(module), "transposed" if is_transposed else "encoder")
        if role not in wanted:
            skipped.append(f"{name} ({role})")
            continue
        if module.groups != 1:
            skipped.append(f"{name} (groups={module.groups})")
            continue
        layer_ranks = encoder_ranks if role == "encoder" else decoder_ranks
        scalings = tuple(fixed_scaling if fixed_scaling is not None else alpha / r for r in layer_ranks)
        mapping[id(module)] = cls(module, layer_ranks, scalings, names, name, role)
        replaced_originals.append(module)
        counts[role] += 1
    if not mapping:
        raise ValueError("add_experts found no convolution to give experts to")
    _replace_by_identity(net, mapping)
    summary = ", ".join(f"{n} {role}" for role, n in counts.items() if n)
    lines = [
        f"add_experts: {num_experts} experts on {len(mapping)} convolutions ({summary}); "
        f"encoder ranks {encoder_ranks}, decoder ranks {decoder_ranks}",
        f"add_experts: left shared: {', '.join(skipped) if skipped else 'nothing'}",
    ]
    for line in lines:
        (report or logger.info)(line)
    return net


def fuse_expert(net: nn.Module, region: int) -> nn.Module:
    """A new network of the original architecture with W = W0 + s*dW_region in every expert conv.

    The result has the module classes, state_dict keys and shapes of the network before add_experts and
    runs without this package. It is ``merge_experts`` on a copy followed by unloading every merged layer to
    its original class (PEFT's merge_and_unload), so in-place merging and fusion share one computation of
    W0 + s*dW, in float64 from W0: switching regions never drifts.
    """
    net = unwrap_network(net)
    layers = expert_layers(net)
    if not layers:
        raise ValueError("fuse_expert: this network has no experts (was add_experts applied?)")
    layers[0]._check_region(region)
    fused = copy.deepcopy(net)
    merge_experts(fused, region)
    _replace_by_identity(fused, {id(m): m.to_plain() for m in expert_layers(fused)})
    return fused


def merge_experts(net: nn.Module, region: int) -> None:
    """In place: every expert layer holds W0 + s*dW_region, for inference without routing or re-fusing."""
    for layer in expert_layers(net):
        layer.merge(region)


def unmerge_experts(net: nn.Module) -> None:
    """In place: drop the merged weights; the layers route again (and can train)."""
    for layer in expert_layers(net):
        layer.unmerge()


@dataclass(frozen=True)
class ConvExperts:
    name: str
    role: str
    ranks: tuple[int, ...]
    params_per_expert: tuple[int, ...]


@dataclass(frozen=True)
class ExpertParameterReport:
    """Parameter counts: the shared backbone (what one fused region network has), each expert, the total."""

    backbone: int
    per_expert: tuple[int, ...]
    convs: tuple[ConvExperts, ...]
    region_names: tuple[str, ...] | None

    @property
    def total(self) -> int:
        return self.backbone + sum(self.per_expert)

    def format(self) -> str:
        names = self.region_names or tuple(f"expert {i}" for i in range(len(self.per_expert)))
        width = max(len(n) for n in (*names, "backbone (= one fused region network)", "total stored"))
        rows = [f"{'backbone (= one fused region network)':<{width}}  {self.backbone:>12,}"]
        rows += [f"{n:<{width}}  {p:>12,}" for n, p in zip(names, self.per_expert, strict=True)]
        rows.append(f"{'total stored':<{width}}  {self.total:>12,}")
        return "\n".join(rows)


def backbone_parameter_count(net: nn.Module) -> int:
    """Parameters outside the experts: what one fused region network has (every parameter without experts)."""
    net = unwrap_network(net)
    expert_ids = {id(p) for layer in expert_layers(net) for p in (*layer.lora_A, *layer.lora_B)}
    return sum(p.numel() for p in net.parameters() if id(p) not in expert_ids)


def expert_parameter_report(net: nn.Module) -> ExpertParameterReport:
    net = unwrap_network(net)
    layers = expert_layers(net)
    if not layers:
        raise ValueError("expert_parameter_report: this network has no experts")
    num = layers[0].num_experts
    if any(layer.num_experts != num for layer in layers):
        raise RoutingError("expert layers disagree on the number of experts")
    convs = tuple(
        ConvExperts(
            layer.lorkd_name,
            layer.lorkd_role,
            layer.ranks,
            tuple(layer.expert_parameter_count(t) for t in range(num)),
        )
        for layer in layers
    )
    per_expert = tuple(sum(c.params_per_expert[t] for c in convs) for t in range(num))
    return ExpertParameterReport(backbone_parameter_count(net), per_expert, convs, layers[0].region_names)
