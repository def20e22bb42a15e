"""Convolutions with T low-rank region experts on top of a shared weight.

For a sample of region t the effective weight is ``W0 + s_t * reshape(B_t @ A_t)``. The factor shapes follow
LoRKD's kernel-aware factorisation, generalised to any kernel: for a weight of shape (d0, d1, k0, k1, ...),
``A_t`` is (r_t*k0, d1*k1*...) and ``B_t`` is (d0*k0, r_t*k0), so the product has exactly the weight's numel
and anisotropic kernels such as nnU-Net's (1, 3, 3) work.

Each class subclasses the torch layer it replaces and keeps that layer's ``weight``/``bias`` as the shared
backbone, so a fused network has the original classes and state_dict keys. Which convolution kernel runs is
decided by the pure rules of ``kernels.py`` (measurements in docs/kernels.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .routing import RoutedLayer, RoutingError, RoutingPlan

_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


def _fold_scalings(lora_b: torch.Tensor, scalings: Sequence[float]) -> tuple[torch.Tensor, float]:
    """(B', alpha) with alpha * B'[i] = scalings[i] * B[i] for stacked factors B: one shared alpha costs no kernel."""
    if len(set(scalings)) == 1:
        return lora_b, scalings[0]
    return lora_b * lora_b.new_tensor(scalings).view(-1, 1, 1), 1.0


class ExpertLayer(RoutedLayer):
    """Expert state and the efficient-knowledge-separation forward shared by all expert layer classes.

    One forward serves a batch that mixes regions: the batch is split into per-region groups (``route``
    has already sorted it by region at the network input), each group runs one convolution with its own
    merged weight ``W0 + s_t * dW_t``, and only the regions present are computed. Autograd then gives
    expert t the gradient of region t's samples alone and W0 the gradient of all of them.
    """

    base_class: type[nn.Module]
    weight: nn.Parameter
    bias: nn.Parameter | None
    geometry: kernels.ConvGeometry
    _grouped_path: bool = False
    _activation_path: bool = False

    def _init_experts(
        self,
        base: nn.Module,
        ranks: tuple[int, ...],
        scalings: tuple[float, ...],
        region_names: tuple[str, ...] | None,
        name: str,
        role: str,
    ) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        for attr in _CONV_ATTRS:
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        self.geometry = kernels.ConvGeometry.of(base)
        self.training = base.training
        # share, not copy, the base parameters: optimisers holding them keep working
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        if len(ranks) != len(scalings) or not ranks:
            raise ValueError("one rank and one scaling per expert are required")
        self.scaling = tuple(float(s) for s in scalings)
        self.region_names = region_names
        self.lorkd_name = name
        self.lorkd_role = role
        self.routing_plan: RoutingPlan | None = None
        self.merged_region: int | None = None
        self.register_buffer("merged_weight", None, persistent=False)
        rows, cols = self._matrix_shape()
        k0 = self.weight.shape[2]
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r * k0, cols, **kw)) for r in ranks)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(rows, r * k0, **kw)) for r in ranks)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    # ---------------------------------------------------------------------------------------------- shapes
    def _matrix_shape(self) -> tuple[int, int]:
        shape = self.weight.shape
        return shape[0] * shape[2], shape[1] * math.prod(shape[3:])

    @property
    def ranks(self) -> tuple[int, ...]:
        k0 = self.weight.shape[2]
        return tuple(a.shape[0] // k0 for a in self.lora_A)

    def expert_parameter_count(self, region: int) -> int:
        """r*k0*(k1*...*d1 + k0*d0): the parameters of one expert of this layer."""
        return self.lora_A[region].numel() + self.lora_B[region].numel()

    def _equal_ranks(self, regions: tuple[int, ...]) -> bool:
        return len({self.lora_A[t].shape for t in regions}) == 1

    # ------------------------------------------------------------------------------------------ the weights
    def _low_rank_update(
        self, regions: tuple[int, ...], base: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """(len(regions), *weight.shape): ``base + s_t * reshape(B_t @ A_t)`` per region, or the update alone.

        The one place the expert update is computed; the forward, merge and fusion all go through it. With a base
        the product and the add are one kernel (addmm, or one baddbmm for several regions of equal rank).
        """
        rows, cols = self._matrix_shape()
        lora_b = [self.lora_B[t] if dtype is None else self.lora_B[t].to(dtype) for t in regions]
        lora_a = [self.lora_A[t] if dtype is None else self.lora_A[t].to(dtype) for t in regions]
        scalings = [self.scaling[t] for t in regions]
        if base is None:
            parts = [(b @ a) * s for b, a, s in zip(lora_b, lora_a, scalings, strict=True)]
        elif len(regions) > 1 and self._equal_ranks(regions):
            stacked_b, alpha = _fold_scalings(torch.stack(lora_b), scalings)
            merged = torch.baddbmm(base.reshape(1, rows, cols), stacked_b, torch.stack(lora_a), alpha=alpha)
            return merged.view(len(regions), *self.weight.shape)
        else:
            matrix = base.reshape(rows, cols)
            parts = [torch.addmm(matrix, b, a, alpha=s) for b, a, s in zip(lora_b, lora_a, scalings, strict=True)]
        joined = parts[0] if len(parts) == 1 else torch.stack(parts)
        return joined.view(len(regions), *self.weight.shape)

    def get_delta_weight(self, region: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s_t * reshape(B_t @ A_t), the expert's change to the shared weight (in ``dtype`` if given)."""
        return self._low_rank_update((region,), dtype=dtype).view(self.weight.shape)

    def expert_weight(self, region: int) -> torch.Tensor:
        """W0 + s_t * dW_t in one fused kernel (addmm); differentiable w.r.t. W0, A_t and B_t."""
        return self._low_rank_update((region,), self.weight).view(self.weight.shape)

    def expert_weights(self, regions: tuple[int, ...]) -> torch.Tensor:
        """(len(regions), *weight.shape): W0 + s_t * dW_t for several regions; with equal ranks one batched
        matmul, which the grouped path views as its weight directly."""
        return self._low_rank_update(regions, self.weight)

    @torch.no_grad()
    def merge(self, region: int) -> None:
        """Hold W0 + s*dW_region for inference, computed in float64 from W0: switching regions never drifts."""
        self._check_region(region)
        merged = self.weight.double() + self.get_delta_weight(region, torch.float64)
        self.merged_weight = merged.to(self.weight.dtype)
        self.merged_region = region

    def unmerge(self) -> None:
        self.merged_weight = None
        self.merged_region = None

    def _check_region(self, region: int) -> None:
        if not 0 <= region < self.num_experts:
            names = f" ({', '.join(self.region_names)})" if self.region_names else ""
            raise RoutingError(f"region {region} out of range: valid ids are 0..{self.num_experts - 1}{names}")

    # ----------------------------------------------------------------------------------------------- forward
    def _run_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run_region_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's conv for one region's samples, on oneDNN where ATen would pick its slow native kernel."""
        if kernels.one_sample_conv_needs_onednn(x, self.geometry):
            return kernels.onednn_conv(x, weight, self.bias, self.geometry)
        return self._run_conv(x, weight)

    def _lora_a_as_conv(self, region: int) -> torch.Tensor:
        """A_t as the weight of the (1, k1, ...) convolution over ``kernels.taps_input`` chunks: a view, no copy."""
        a = self.lora_A[region]
        return a.view(a.shape[0], self.weight.shape[1], 1, *self.weight.shape[3:])

    def _run_activation_side(self, x: torch.Tensor, regions: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """``conv(x, W0) + s_t * B_t(A_t(x))`` per sample: one batched W0 conv, then the low-rank corrections.

        ``A_t(x)`` has k0*r*k0 channels per sample (``kernels.taps_input``); ``B_t`` mixes them into the d0 output
        channels, added to the W0 conv's output by one ``baddbmm``. Expert t still sees only region t's samples,
        and W0 all of them, so the gradients are those of the weight-side forward.
        """
        y = self._run_conv(x, self.weight)
        d0, d1, k0 = self.weight.shape[:3]
        taps = kernels.taps_input(x, k0, self.geometry)
        spatial = taps.shape[3:]
        voxels = y[0, 0].numel()
        n_regions = len(regions)
        if self._equal_ranks(regions) and n_regions > 1 and all(n == 1 for n in sizes):
            # one sample per region: one grouped conv (groups = regions) with the k0 chunks as its batch
            chunks = taps.transpose(0, 1).reshape(k0, n_regions * d1, *spatial)
            weight = torch.cat([self._lora_a_as_conv(t) for t in regions])
            z = kernels.lora_a_conv(chunks, weight, self.geometry, n_regions)
            z = z.view(k0, n_regions, -1, voxels).transpose(0, 1).reshape(n_regions, -1, voxels)
            lora_b = torch.stack([self.lora_B[t] for t in regions]).view(n_regions, d0, -1)
            lora_b, alpha = _fold_scalings(lora_b, [self.scaling[t] for t in regions])
            # y + s_t * B_t z_t in one kernel: the output view (regions, d0, voxels) of y is one sample each
            return torch.baddbmm(y.reshape(n_regions, d0, -1), lora_b, z, alpha=alpha).view_as(y)
        outs = []
        for t, n, taps_t, y_t in zip(regions, sizes, torch.split(taps, sizes), torch.split(y, sizes), strict=True):
            chunks = taps_t.reshape(n * k0, d1, *spatial)
            z = kernels.lora_a_conv(chunks, self._lora_a_as_conv(t), self.geometry).view(n, -1, voxels)
            lora_b = self.lora_B[t].view(1, d0, -1).expand(n, -1, -1)
            outs.append(torch.baddbmm(y_t.reshape(n, d0, -1), lora_b, z, alpha=self.scaling[t]).view_as(y_t))
        return torch.cat(outs) if n_regions > 1 else outs[0]  # cat would copy a single part

    def _run_grouped(self, x: torch.Tensor, regions: tuple[int, ...]) -> torch.Tensor:
        """One sample per region: view the batch as one sample with the regions side by side in channels."""
        t = len(regions)
        weight = self.expert_weights(regions).flatten(0, 1)
        bias = None if self.bias is None else self.bias.repeat(t)
        out = kernels.conv(x.reshape(1, t * x.shape[1], *x.shape[2:]), weight, bias, self.geometry, groups=t)
        return out.view(t, -1, *out.shape[2:])

    def _unrouted_error(self) -> RoutingError:
        return RoutingError(
            f"expert layer '{self.lorkd_name}' was called without routing. Wrap the forward in "
            "`with route(net, region_ids):` (one id per sample, or one int for all), or in "
            "`with backbone_only(net):` to run the shared backbone alone on purpose."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.routing_plan
        if self.merged_region is not None:
            return self._forward_merged(x, plan)
        if plan is None:
            raise self._unrouted_error()
        if plan.backbone_only:
            return self._run_conv(x, self.weight)
        if torch.compiler.is_compiling():
            return self._forward_compiled(x)
        regions, sizes = plan.groups_for_batch(x.shape[0], self.lorkd_name)
        activation_side = self._activation_path and kernels.activation_side_is_cheaper(
            x, self.weight.shape, self.geometry, len(regions)
        )
        if len(regions) == 1 and not activation_side:
            return self._run_conv(x, self.expert_weight(regions[0]))
        inv_perm = None
        if plan.perm is not None:  # called on its own, not through the routed network's forward
            perm, inv_perm = plan.permutations_on(x.device)
            x = x.index_select(0, perm)
        if activation_side:
            y = self._run_activation_side(x, regions, sizes)
        elif self._grouped_path and kernels.grouped_conv_is_faster(x, sizes, self.weight.shape, self.geometry):
            y = self._run_grouped(x, regions)
        else:
            weights = self.expert_weights(regions)
            y = torch.cat([self._run_region_conv(c, w) for c, w in zip(torch.split(x, sizes), weights, strict=True)])
        return y if inv_perm is None else y.index_select(0, inv_perm)

    def _forward_compiled(self, x: torch.Tensor) -> torch.Tensor:
        """The forward torch.compile traces: routing enters only as the tensor ``route_index``, never as Python
        values, so one graph serves every region mix of a batch size (no recompile when the mix changes).

        Every expert's weight W0 + s_t*dW_t is built (one batched matmul) and each sample takes its region's by
        ``index_select``; then one grouped convolution runs the batch (groups = samples), or one plain
        convolution for a broadcast region.
        Expert t still gets the gradient of region t's samples alone; the experts of regions absent from the
        batch get an exact-zero gradient instead of none, as under DDP. (Merged, unrouted and backbone-only
        forwards are handled by ``forward`` before it comes here.)
        """
        index = self.route_index
        assert index is not None
        if index.device != self.weight.device:
            raise RoutingError(
                f"expert layer '{self.lorkd_name}' was routed while on {index.device} and now runs on "
                f"{self.weight.device}; install the routing again after moving the network"
            )
        weights = self._low_rank_update(tuple(range(self.num_experts)), self.weight)
        if index.shape[0] == 1:  # one region for the whole batch
            return self._run_conv(x, weights.index_select(0, index).squeeze(0))
        if index.shape[0] != x.shape[0]:
            raise RoutingError(
                f"expert layer '{self.lorkd_name}' received a batch of {x.shape[0]} samples but route() was given "
                f"{index.shape[0]} region ids; pass one id per sample, or a single int to use one region for every "
                "sample"
            )
        # one grouped conv over the samples even where the eager path's CPU rule runs one conv per sample: measured
        # compiled on CPU, the per-sample convs made the 3D training step slower (docs/benchmarks.md)
        return self._run_per_sample(x, weights.index_select(0, index))

    def _run_per_sample(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sample b with weights[b]: the batch as one sample with the samples side by side in the channels."""
        n = x.shape[0]
        bias = None if self.bias is None else self.bias.repeat(n)
        out = self._run_conv_groups(x.reshape(1, n * x.shape[1], *x.shape[2:]), weights.flatten(0, 1), bias, n)
        return out.view(n, -1, *out.shape[2:])

    def _run_conv_groups(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        return kernels.conv(x, weight, bias, self.geometry, groups=groups)

    def _forward_merged(self, x: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        if self.training:
            raise RoutingError(
                f"expert layer '{self.lorkd_name}' is merged (region {self.merged_region}); merged weights are "
                "for inference, call unmerge_experts(net) before training"
            )
        if plan is not None:
            wanted = set(plan.region_ids) if plan.region_ids is not None else {plan.broadcast}
            if plan.backbone_only or wanted != {self.merged_region}:
                raise RoutingError(
                    f"expert layer '{self.lorkd_name}' is merged for region {self.merged_region} but the routing "
                    f"asks for {'the backbone alone' if plan.backbone_only else sorted(wanted)}; unmerge first"
                )
        assert self.merged_weight is not None
        return self._run_conv(x, self.merged_weight)

    # ------------------------------------------------------------------------------------------------ export
    def to_plain(self) -> nn.Module:
        """This merged layer as a layer of the original class (PEFT's unload): W = the merged weight, the shared
        bias. The merged weight moves into the new layer, so this one is left unmerged and nothing is copied."""
        if self.merged_region is None:
            raise RoutingError(f"expert layer '{self.lorkd_name}' is not merged; call merge(region) first")
        plain = self.base_class(**self._plain_kwargs(), device="meta")
        plain.weight = nn.Parameter(self.merged_weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        plain.train(self.training)
        self.unmerge()
        return plain

    def _plain_kwargs(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
        }

    def _expert_repr(self) -> str:
        return f"experts={self.num_experts}, ranks={self.ranks}, scaling={self.scaling}"


class _ExpertConvNd(ExpertLayer):
    _grouped_path = True
    _activation_path = True

    def __init__(
        self,
        base: nn.Module,
        ranks: tuple[int, ...],
        scalings: tuple[float, ...],
        region_names: tuple[str, ...] | None = None,
        name: str = "",
        role: str = "encoder",
    ) -> None:
        if type(base) is not self.base_class:
            raise TypeError(f"{type(self).__name__} wraps {self.base_class.__name__}, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"grouped/depthwise convolutions (groups={base.groups}) get no experts")
        self._init_experts(base, ranks, scalings, region_names, name, role)

    def _run_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return self.base_class.extra_repr(self) + ", " + self._expert_repr()  # type: ignore[arg-type]


class ExpertConv2d(_ExpertConvNd, nn.Conv2d):
    """nn.Conv2d with region experts (2D nnU-Net, 2D classification backbones)."""

    base_class = nn.Conv2d


class ExpertConv3d(_ExpertConvNd, nn.Conv3d):
    """nn.Conv3d with region experts (3D nnU-Net)."""

    base_class = nn.Conv3d


class _ExpertConvTransposeNd(_ExpertConvNd):
    _grouped_path = False
    _activation_path = False
    _functional = staticmethod(F.conv_transpose2d)

    def _run_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._functional(
            x, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )

    def _run_conv_groups(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        return self._functional(x, weight, bias, self.stride, self.padding, self.output_padding, groups, self.dilation)

    def _plain_kwargs(self) -> dict:
        return {**super()._plain_kwargs(), "output_padding": self.output_padding}


class ExpertConvTranspose2d(_ExpertConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with region experts (only when add_experts(include_transposed=True))."""

    base_class = nn.ConvTranspose2d


class ExpertConvTranspose3d(_ExpertConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d with region experts (only when add_experts(include_transposed=True))."""

    base_class = nn.ConvTranspose3d
    _functional = staticmethod(F.conv_transpose3d)


EXPERT_CLASS_FOR = {
    nn.Conv2d: ExpertConv2d,
    nn.Conv3d: ExpertConv3d,
    nn.ConvTranspose2d: ExpertConvTranspose2d,
    nn.ConvTranspose3d: ExpertConvTranspose3d,
}
