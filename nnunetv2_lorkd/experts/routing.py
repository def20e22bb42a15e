"""Per-forward routing of samples to region experts.

nnU-Net always calls ``net(x)`` with a single tensor, so the region of each sample cannot travel through
``forward``. Instead :func:`route` installs a :class:`RoutingPlan` on every expert layer of the network for
the duration of a ``with`` block. The plan is computed once on the host (no device synchronisation inside
the layers) and holds everything each layer needs: which regions are present, how many samples each has,
and the permutation that groups samples by region when they are not already grouped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class RoutingError(RuntimeError):
    """Raised when an expert layer cannot know which expert a sample needs."""


@dataclass(frozen=True)
class RoutingPlan:
    """How one forward pass maps samples to experts.

    ``region_ids`` is ``None`` when one region applies to every sample of any batch size (``broadcast``);
    that is what sliding-window prediction and nnU-Net's final validation (batch size 1) need.
    ``backbone_only`` runs the shared weights alone, which must always be asked for explicitly.
    """

    region_ids: tuple[int, ...] | None = None
    broadcast: int | None = None
    backbone_only: bool = False
    # derived, for per-sample plans: regions in grouped order, their sample counts, and the permutation
    # that sorts the batch by region (None when the batch is already grouped)
    regions: tuple[int, ...] = ()
    split_sizes: tuple[int, ...] = ()
    perm: torch.Tensor | None = None
    inv_perm: torch.Tensor | None = None
    _device_perms: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_samples(cls, region_ids: Sequence[int]) -> RoutingPlan:
        ids = tuple(int(i) for i in region_ids)
        if not ids:
            raise RoutingError("route() got an empty list of region ids; give one id per sample in the batch")
        runs: list[list[int]] = []  # [region, count] for consecutive equal ids, in batch order
        for i in ids:
            if runs and runs[-1][0] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
        perm = inv_perm = None
        if len({r for r, _ in runs}) == len(runs):  # every region's samples are contiguous: no gather needed
            regions, sizes = [r for r, _ in runs], [c for _, c in runs]
        else:
            order = sorted(range(len(ids)), key=lambda i: ids[i])
            regions = sorted(set(ids))
            sizes = [ids.count(r) for r in regions]
            perm = torch.tensor(order, dtype=torch.long)
            inv_perm = torch.empty_like(perm)
            inv_perm[perm] = torch.arange(len(ids))
        return cls(region_ids=ids, regions=tuple(regions), split_sizes=tuple(sizes), perm=perm, inv_perm=inv_perm)

    def permutations_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The grouping permutation on ``device``, moved there once per plan and shared by all layers."""
        cached = self._device_perms.get(device)
        if cached is None:
            assert self.perm is not None and self.inv_perm is not None
            cached = (self.perm.to(device), self.inv_perm.to(device))
            self._device_perms[device] = cached
        return cached

    def groups_for_batch(self, batch_size: int, layer_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Regions present and their sample counts for a batch of ``batch_size``."""
        if self.broadcast is not None:
            return (self.broadcast,), (batch_size,)
        assert self.region_ids is not None
        if batch_size != len(self.region_ids):
            raise RoutingError(
                f"expert layer '{layer_name}' received a batch of {batch_size} samples but route() was given "
                f"{len(self.region_ids)} region ids; pass one id per sample, or a single int to use one "
                "region for every sample"
            )
        return self.regions, self.split_sizes


def _expert_layers(net: nn.Module) -> list[nn.Module]:
    from .layer import ExpertLayer

    # modules() de-duplicates aliases and descends into DDP(.module) and torch.compile (._orig_mod) wrappers
    return [m for m in net.modules() if isinstance(m, ExpertLayer)]


def _as_plan(
    region_ids: int | Sequence[int] | torch.Tensor, num_experts: int, names: Sequence[str] | None
) -> RoutingPlan:
    if isinstance(region_ids, torch.Tensor):
        if region_ids.dim() == 0:
            region_ids = int(region_ids)
        elif region_ids.dim() == 1:
            if region_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
                raise RoutingError(f"region ids must be an integer tensor, got dtype {region_ids.dtype}")
            region_ids = region_ids.tolist()  # one host sync per forward, never one per layer
        else:
            raise RoutingError(f"region ids must have shape (B,), got {tuple(region_ids.shape)}")
    if isinstance(region_ids, bool):
        raise RoutingError("region ids must be integers, got a bool")
    if isinstance(region_ids, int):
        ids: tuple[int, ...] = (region_ids,)
        plan = RoutingPlan(broadcast=region_ids)
    else:
        ids = tuple(int(i) for i in region_ids)
        plan = RoutingPlan.for_samples(ids)
    bad = sorted({i for i in ids if not 0 <= i < num_experts})
    if bad:
        valid = f"0..{num_experts - 1}"
        if names:
            valid += " (" + ", ".join(f"{i}={n}" for i, n in enumerate(names)) + ")"
        raise RoutingError(
            f"region id(s) {bad} out of range: this network has {num_experts} experts, valid ids are {valid}"
        )
    return plan


@contextlib.contextmanager
def _installed(net: nn.Module, plan_for: object) -> Iterator[None]:
    layers = _expert_layers(net)
    if not layers:
        raise RoutingError("this network has no expert layers; call add_experts(net, ...) first")
    plan = plan_for(layers[0]) if callable(plan_for) else plan_for
    previous = [layer.routing_plan for layer in layers]
    for layer in layers:
        layer.routing_plan = plan
    try:
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.routing_plan = old


def set_routing(net: nn.Module, region_ids: int | Sequence[int] | torch.Tensor | None) -> None:
    """Install routing until changed (``None`` removes it). For callers that cannot wrap the forward in
    ``with route(...)``, e.g. nnU-Net's final validation, which loads and predicts one case at a time."""
    layers = _expert_layers(net)
    if not layers:
        raise RoutingError("this network has no expert layers; call add_experts(net, ...) first")
    plan = None if region_ids is None else _as_plan(region_ids, layers[0].num_experts, layers[0].region_names)
    for layer in layers:
        layer.routing_plan = plan


def route(net: nn.Module, region_ids: int | Sequence[int] | torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Route the samples of every forward inside the block to their region experts.

    ``region_ids`` is a LongTensor or sequence of shape (B,), one region per sample, or a single int that
    applies to every sample of any batch size. Ids are checked against the number of experts here, once.
    """

    def plan_for(layer: nn.Module) -> RoutingPlan:
        return _as_plan(region_ids, layer.num_experts, layer.region_names)

    return _installed(net, plan_for)


def backbone_only(net: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run the shared backbone W0 alone, without any expert. Never the default: it must be asked for."""
    return _installed(net, RoutingPlan(backbone_only=True))
