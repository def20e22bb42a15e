"""Per-forward routing of samples to region experts.

nnU-Net always calls ``net(x)`` with a single tensor, so the region of each sample cannot travel through
``forward``. Instead :func:`route` installs a :class:`RoutingPlan` on every expert layer of the network for
the duration of a ``with`` block. The plan is computed once on the host (no device synchronisation inside
the layers) and holds everything each layer needs: which regions are present, how many samples each has,
and the permutation that groups samples by region when they are not already grouped.

``route`` also hooks the forward of the network it is given, for two jobs that belong to the whole forward
rather than to each layer: a batch whose regions are interleaved is sorted by region once at the input
(and the outputs are put back in the caller's order), so no layer has to gather; and in a DDP training
step, the experts of regions absent from the batch are tied into the graph once, with an exact-zero
gradient, so every parameter is used in every step (DDP without ``find_unused_parameters``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class RoutingError(RuntimeError):
    """Raised when an expert layer cannot know which expert a sample needs."""


def group_by_region(region_ids: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(region, sample positions) for each region present, in region order, positions in batch order.

    The one grouping of a batch by region: routing sorts a batch by it, and callers that handle each region's
    samples apart (per-task heads, per-region teachers) get the same groups in the same order.
    """
    groups: dict[int, list[int]] = {}
    for position, region in enumerate(region_ids):
        groups.setdefault(int(region), []).append(position)
    return sorted(groups.items())


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
    _device_index: dict = field(default_factory=dict, compare=False, repr=False)

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
            groups = group_by_region(ids)
            regions, sizes = [r for r, _ in groups], [len(positions) for _, positions in groups]
            perm = torch.tensor([i for _, positions in groups for i in positions], dtype=torch.long)
            inv_perm = torch.empty_like(perm)
            inv_perm[perm] = torch.arange(len(ids))
        return cls(region_ids=ids, regions=tuple(regions), split_sizes=tuple(sizes), perm=perm, inv_perm=inv_perm)

    def grouped(self) -> RoutingPlan:
        """The plan for the same batch after it was sorted by region: same groups, nothing left to gather."""
        if self.perm is None:
            return self
        assert self.region_ids is not None
        ids = tuple(self.region_ids[i] for i in self.perm.tolist())
        return RoutingPlan(region_ids=ids, regions=self.regions, split_sizes=self.split_sizes)

    def permutations_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The grouping permutation on ``device``, moved there once per plan and shared by all layers.

        On CUDA the copy comes from pinned memory without blocking, so routing adds no host synchronisation.
        """
        cached = self._device_perms.get(device)
        if cached is None:
            assert self.perm is not None and self.inv_perm is not None
            if device.type == "cuda":
                cached = tuple(p.pin_memory().to(device, non_blocking=True) for p in (self.perm, self.inv_perm))
            else:
                cached = (self.perm.to(device), self.inv_perm.to(device))
            self._device_perms[device] = cached
        return cached

    def index_on(self, device: torch.device) -> torch.Tensor | None:
        """The regions as a LongTensor on ``device``: (B,) per sample, (1,) for a broadcast, None for the backbone.

        A compiled forward reads routing only through this tensor (``RoutedLayer.route_index``), so one graph
        serves every region mix: the ids are data, not constants the graph is specialised on.
        """
        if self.backbone_only:
            return None
        cached = self._device_index.get(device)
        if cached is None:
            ids = torch.tensor(self.region_ids if self.broadcast is None else (self.broadcast,), dtype=torch.long)
            cached = ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids.to(device)
            self._device_index[device] = cached
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


class RoutedLayer:
    """Base class of every expert layer: what routing reads and writes on one.

    Routing finds layers by this class, so it never imports the layer module (which imports this one).
    """

    region_names: tuple[str, ...] | None
    lora_A: nn.ParameterList
    lora_B: nn.ParameterList
    weight: torch.Tensor
    _routing_plan: RoutingPlan | None = None
    # the plan's regions on this layer's device (RoutingPlan.index_on): what a compiled forward reads
    route_index: torch.Tensor | None = None

    @property
    def routing_plan(self) -> RoutingPlan | None:
        return self._routing_plan

    @routing_plan.setter
    def routing_plan(self, plan: RoutingPlan | None) -> None:
        self._routing_plan = plan
        self.route_index = None if plan is None else plan.index_on(self.weight.device)

    @property
    def num_experts(self) -> int:
        return len(self.lora_A)


def expert_layers(net: nn.Module) -> list[RoutedLayer]:
    """Every expert layer of ``net`` once, in module order.

    ``modules()`` de-duplicates aliases (``.conv`` / ``.all_modules.0``) and descends into DDP (``.module``) and
    torch.compile (``._orig_mod``) wrappers.
    """
    return [m for m in net.modules() if isinstance(m, RoutedLayer)]


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


class _TouchParameters(torch.autograd.Function):
    """An exact zero that depends on the given parameters and gives each of them an exact-zero gradient.

    Unlike ``sum(p) * 0`` it stays zero (and its gradients stay zero) even when a parameter holds inf/nan,
    and its forward reads no parameter memory.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return (None, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes))


def _absent_expert_parameters(layers: Sequence[RoutedLayer], plan: RoutingPlan) -> list[torch.Tensor]:
    if plan.backbone_only:
        present: set[int] = set()
    elif plan.broadcast is not None:
        present = {plan.broadcast}
    else:
        present = set(plan.regions)
    return [
        p
        for layer in layers
        for t in range(layer.num_experts)
        if t not in present
        for p in (layer.lora_A[t], layer.lora_B[t])
        if p.requires_grad
    ]


def _map_batch(output: object, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> object:
    """Apply ``fn`` to the output tensor, or to each tensor of a list/tuple of outputs (deep supervision)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in output):
        return type(output)(fn(o) for o in output)
    raise RoutingError(
        f"route() {what}, but the network returned {type(output).__name__}; it supports a tensor or a "
        "list/tuple of tensors (deep supervision) with the batch as the first dimension"
    )


class _ForwardHooks:
    """Network-level work of one routed forward: sort the batch by region once, restore the caller's order
    on the outputs, and keep absent experts in the autograd graph during training."""

    def __init__(self, layers: list[RoutedLayer], plan: RoutingPlan, touch_absent: bool | None) -> None:
        self.layers = layers
        self.plan = plan
        self.grouped = plan.grouped()
        self.touch_absent = touch_absent

    def _touch_wanted(self) -> bool:
        if self.touch_absent is not None:
            return self.touch_absent
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.plan.perm is None:
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise RoutingError("route() regroups the batch by region and needs the input tensor as first argument")
        x = args[0]
        self.plan.groups_for_batch(x.shape[0], type(module).__name__)  # clear error for a wrong batch size
        perm, _ = self.plan.permutations_on(x.device)
        for layer in self.layers:
            layer.routing_plan = self.grouped
        return (x.index_select(0, perm), *args[1:])

    def after(self, module: nn.Module, args: tuple, output: object) -> object:
        if self.plan.perm is not None:
            for layer in self.layers:
                layer.routing_plan = self.plan
            _, inv_perm = self.plan.permutations_on(args[0].device)
            output = _map_batch(output, lambda y: y.index_select(0, inv_perm), "restored the batch order")
        if module.training and torch.is_grad_enabled() and self._touch_wanted():
            absent = _absent_expert_parameters(self.layers, self.plan)
            if absent:
                first = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
                zero = _TouchParameters.apply(first, *absent)
                touched = [True]

                def add_zero(y: torch.Tensor) -> torch.Tensor:
                    if touched:
                        touched.clear()
                        return y + zero
                    return y

                output = _map_batch(output, add_zero, "keeps absent experts in the graph")
        return output


@contextlib.contextmanager
def _installed(net: nn.Module, plan_for: object, touch_absent: bool | None) -> Iterator[None]:
    layers = expert_layers(net)
    if not layers:
        raise RoutingError("this network has no expert layers; call add_experts(net, ...) first")
    plan = plan_for(layers[0]) if callable(plan_for) else plan_for
    previous = [layer.routing_plan for layer in layers]
    for layer in layers:
        layer.routing_plan = plan
    hooks = _ForwardHooks(layers, plan, touch_absent)
    handles = [net.register_forward_pre_hook(hooks.before), net.register_forward_hook(hooks.after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, old in zip(layers, previous, strict=True):
            layer.routing_plan = old


def set_routing(net: nn.Module, region_ids: int | Sequence[int] | torch.Tensor | None) -> None:
    """Install routing until changed (``None`` removes it). For callers that cannot wrap the forward in
    ``with route(...)``, e.g. nnU-Net's final validation, which loads and predicts one case at a time.

    It installs no forward hooks: use it for inference. In training use :func:`route`, which also keeps
    the experts of absent regions in the graph (DDP) and sorts interleaved batches once.
    """
    layers = expert_layers(net)
    if not layers:
        raise RoutingError("this network has no expert layers; call add_experts(net, ...) first")
    plan = None if region_ids is None else _as_plan(region_ids, layers[0].num_experts, layers[0].region_names)
    for layer in layers:
        layer.routing_plan = plan


def route(
    net: nn.Module, region_ids: int | Sequence[int] | torch.Tensor, *, touch_absent_experts: bool | None = None
) -> contextlib.AbstractContextManager[None]:
    """Route the samples of every forward inside the block to their region experts.

    ``region_ids`` is a LongTensor or sequence of shape (B,), one region per sample, or a single int that
    applies to every sample of any batch size. Ids are checked against the number of experts here, once.

    ``touch_absent_experts``: in a training forward, give the experts of regions absent from the batch an
    exact-zero gradient so every parameter takes part in every step, as DDP without
    ``find_unused_parameters`` requires. ``None`` (default) does so exactly when torch.distributed is
    initialised. Outside DDP it is better left off: absent experts then get no gradient at all, so the
    optimiser skips them (no momentum or weight-decay step from a batch they never saw, and no optimiser
    work for them).
    """

    def plan_for(layer: RoutedLayer) -> RoutingPlan:
        return _as_plan(region_ids, layer.num_experts, layer.region_names)

    return _installed(net, plan_for, touch_absent_experts)


def backbone_only(
    net: nn.Module, *, touch_absent_experts: bool | None = None
) -> contextlib.AbstractContextManager[None]:
    """Run the shared backbone W0 alone, without any expert. Never the default: it must be asked for."""
    return _installed(net, RoutingPlan(backbone_only=True), touch_absent_experts)
