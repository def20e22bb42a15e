"""Convolutions with T low-rank region experts on top of a shared weight.

For a sample of region t the effective weight is ``W0 + s_t * reshape(B_t @ A_t)``. The factor shapes follow
LoRKD's kernel-aware factorisation, generalised to any kernel: for a weight of shape (d0, d1, k0, k1, ...),
``A_t`` is (r_t*k0, d1*k1*...) and ``B_t`` is (d0*k0, r_t*k0), so the product has exactly the weight's numel
and anisotropic kernels such as nnU-Net's (1, 3, 3) work.

Each class subclasses the torch layer it replaces and keeps that layer's ``weight``/``bias`` as the shared
backbone, so a fused network has the original classes and state_dict keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RoutingError, RoutingPlan

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


class ExpertLayer:
    """Expert state and the efficient-knowledge-separation forward shared by all expert layer classes.

    One forward serves a batch that mixes regions: the batch is split into per-region groups (``route``
    has already sorted it by region at the network input), each group runs one convolution with its own
    merged weight ``W0 + s_t * dW_t``, and only the regions present are computed. Autograd then gives
    expert t the gradient of region t's samples alone and W0 the gradient of all of them.
    """

    base_class: type[nn.Module]
    weight: nn.Parameter
    bias: nn.Parameter | None
    lora_A: nn.ParameterList
    lora_B: nn.ParameterList
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
    def num_experts(self) -> int:
        return len(self.lora_A)

    @property
    def ranks(self) -> tuple[int, ...]:
        k0 = self.weight.shape[2]
        return tuple(a.shape[0] // k0 for a in self.lora_A)

    def expert_parameter_count(self, region: int) -> int:
        """r*k0*(k1*...*d1 + k0*d0): the parameters of one expert of this layer."""
        return self.lora_A[region].numel() + self.lora_B[region].numel()

    # ------------------------------------------------------------------------------------------ the weights
    def get_delta_weight(self, region: int) -> torch.Tensor:
        """s_t * reshape(B_t @ A_t), the expert's change to the shared weight."""
        delta = self.lora_B[region] @ self.lora_A[region]
        return (delta * self.scaling[region]).view(self.weight.shape)

    def expert_weight(self, region: int) -> torch.Tensor:
        """W0 + s_t * dW_t in one fused kernel (addmm); differentiable w.r.t. W0, A_t and B_t."""
        rows, cols = self._matrix_shape()
        merged = torch.addmm(
            self.weight.reshape(rows, cols), self.lora_B[region], self.lora_A[region], alpha=self.scaling[region]
        )
        return merged.view(self.weight.shape)

    def expert_weights(self, regions: tuple[int, ...]) -> torch.Tensor:
        """(len(regions), *weight.shape): W0 + s_t * dW_t for several regions at once.

        With equal ranks (the default) this is one batched matmul instead of one addmm per region plus a
        concatenation: fewer kernels, and the grouped path can view the result as its weight directly.
        """
        if len({self.lora_A[t].shape for t in regions}) != 1:
            return torch.stack([self.expert_weight(t) for t in regions])
        rows, cols = self._matrix_shape()
        lora_b = torch.stack([self.lora_B[t] for t in regions])
        scalings = [self.scaling[t] for t in regions]
        alpha = scalings[0]
        if len(set(scalings)) != 1:
            lora_b = lora_b * lora_b.new_tensor(scalings).view(-1, 1, 1)
            alpha = 1.0
        lora_a = torch.stack([self.lora_A[t] for t in regions])
        merged = torch.baddbmm(self.weight.reshape(1, rows, cols), lora_b, lora_a, alpha=alpha)
        return merged.view(len(regions), *self.weight.shape)

    @torch.no_grad()
    def fused_weight(self, region: int) -> torch.Tensor:
        """W0 + s_t * dW_t computed in float64 from W0 (never by adding and subtracting deltas)."""
        w0 = self.weight.double()
        delta = (self.lora_B[region].double() @ self.lora_A[region].double()) * self.scaling[region]
        return (w0 + delta.view(w0.shape)).to(self.weight.dtype)

    def merge(self, region: int) -> None:
        """Precompute W0 + dW_region for inference; switching regions recomputes from W0 (no drift)."""
        self._check_region(region)
        self.merged_weight = self.fused_weight(region)
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

    def _grouped_conv_is_faster(self, x: torch.Tensor, sizes: tuple[int, ...]) -> bool:
        """Whether one grouped convolution (groups = regions present) beats one convolution per region.

        Only on CPU and only when every region has a single sample: PyTorch runs a one-sample, ungrouped
        float32 conv with a 3-wide kernel on its slow native kernel unless C*d2*d3 > 20480 (the oneDNN rule in
        ATen's Convolution.cpp), which makes a 3D U-Net's middle stages 2-5x slower than the plain batched
        conv; grouped convs always take oneDNN. Above that size one oneDNN call per sample is faster than the
        grouped conv (up to 1.3x at 32x64x64), and below 4x4x4 voxels the native kernel is faster again
        (docs/benchmarks.md has the measurements).
        """
        if x.device.type != "cpu" or x.dtype != torch.float32 or not self._grouped_path or len(sizes) < 2:
            return False
        if getattr(self, "padding_mode", "zeros") != "zeros":
            return False
        if any(n != 1 for n in sizes):
            return False
        spatial = x.shape[2:]
        if math.prod(spatial) < 64:
            return False
        native_rule = x.shape[1] * math.prod(spatial[:2]) <= 20480
        return native_rule and not (self.weight.shape[-1] > 3 and self.weight.shape[-2] > 3)

    def _activation_side_is_cheaper(self, x: torch.Tensor, regions: tuple[int, ...]) -> bool:
        """Whether to apply the experts to the activations instead of building a weight per region.

        Building ``W0 + s*B_t A_t`` costs about ``3 * rows * cols * r*k0`` multiply-adds per region (forward and
        both factor gradients) plus several passes over a weight-sized tensor, whatever the batch; the
        activation side runs the plain batched conv with W0 and adds a rank-``r*k0`` correction costing about
        ``k0*r*k0 / d0`` of that conv per sample. So it wins where the weights are big and the feature maps
        tiny: the deep stages of a U-Net (4^3 voxels, 256-320 channels), where building weights made a layer
        3-5x slower than the plain one. The rule compares the two estimates: batch * output voxels * k0
        against regions * out channels.
        """
        if not self._activation_path:
            return False
        k0 = self.weight.shape[2]
        out_voxels = 1
        dims = zip(x.shape[2:], self.kernel_size, self.stride, self._padding_pairs(), self.dilation, strict=True)
        for size, k, s, p, d in dims:
            out_voxels *= (size + p - d * (k - 1) - 1) // s + 1
        return x.shape[0] * out_voxels * k0 < len(regions) * self.weight.shape[0]

    def _padding_pairs(self) -> tuple[int, ...]:
        """Total padding per spatial dim (for the output size only), whatever form ``padding`` takes."""
        if isinstance(self.padding, str):  # 'same' keeps the size, 'valid' pads nothing
            if self.padding == "valid":
                return (0,) * len(self.kernel_size)
            return tuple(d * (k - 1) for k, d in zip(self.kernel_size, self.dilation, strict=True))
        return tuple(2 * p for p in self.padding)

    def _chunk_layout(self) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Where each of A_t's k0 input chunks lies in the input channels: (channels per chunk, starts, offsets).

        The expert's delta is ``(B_t @ A_t).view(weight.shape)``: output channel o takes rows o*k0 .. o*k0+k0-1
        of ``B_t @ A_t``, row o*k0+j applying to the j-th contiguous chunk (length L = d1*k1*k2) of the
        flattened (d1, k0, k1, k2) input window. Chunk j starts at flat position j*L, that is inside input
        channel floor(j*L / P) with P = k0*k1*k2, and covers about d1/k0 channels. So A_t applied to chunk j
        is a convolution over a channel slice of n channels whose weight is A_t padded with zeros at both
        ends of the slice: the k0 chunks together form a grouped conv (groups = k0) over k0 overlapping
        channel slices, which wastes a few channels' worth of zeros instead of the (k0-1)/k0 of a
        block-diagonal weight over all channels. The slices are widened to a multiple of 8 channels: the
        grouped conv's forward + backward measured 1.6x faster so (86 -> 88 channels at 4^3: 2.96 -> 1.78 ms).
        """
        layout = self.__dict__.get("_chunk_layout_cache")
        if layout is None:
            d1, k0 = self.weight.shape[1], self.weight.shape[2]
            per_channel = math.prod(self.weight.shape[2:])
            length = d1 * per_channel // k0
            first = [j * length // per_channel for j in range(k0)]
            last = [-(-(j + 1) * length // per_channel) for j in range(k0)]
            n = max(b - a for a, b in zip(first, last, strict=True))
            n = min(d1, -(-n // 8) * 8)  # multiples of 8 channels: 1.6x faster grouped conv (oneDNN)
            starts = tuple(min(a, d1 - n) for a in first)
            offsets = tuple(j * length - c * per_channel for j, c in enumerate(starts))
            layout = (n, starts, offsets)
            self.__dict__["_chunk_layout_cache"] = layout
        return layout

    def _chunked_input(self, x: torch.Tensor) -> torch.Tensor:
        """x with its channels rearranged into the k0 (overlapping) slices of ``_chunk_layout``."""
        n, starts, _ = self._chunk_layout()
        if n * len(starts) == x.shape[1]:  # d1 divisible by k0: the slices tile the channels
            return x
        index = self.__dict__.get("_chunk_index")
        if index is None or index.device != x.device:  # built once per device, not on every forward
            index = torch.cat([torch.arange(c, c + n, device=x.device) for c in starts])
            self.__dict__["_chunk_index"] = index
        return x.index_select(1, index)

    def _lora_a_as_conv(self, region: int) -> torch.Tensor:
        """A_t as the weight of the grouped conv (groups = k0) over ``_chunked_input``: k0*r*k0 output channels.

        Output channel j*r*k0 + i is row i of A_t applied to chunk j, the order in which ``B_t`` (viewed as
        d0 x k0*r*k0) consumes them: ``delta * window = B_t.view(d0, -1) @ z``.
        """
        n, _, offsets = self._chunk_layout()
        a = self.lora_A[region]
        padded = n * math.prod(self.weight.shape[2:])
        blocks = [F.pad(a, (off, padded - a.shape[1] - off)) for off in offsets]
        return torch.cat(blocks).view(-1, n, *self.weight.shape[2:])

    def _conv_groups(
        self, x: torch.Tensor, weight: torch.Tensor, groups: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This layer's convolution (stride, padding mode, dilation) with another weight and group count."""
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _run_activation_side(self, x: torch.Tensor, regions: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """``conv(x, W0) + s_t * B_t(A_t(x))`` per sample: one batched W0 conv, then the low-rank corrections.

        Expert t still sees only region t's samples, and W0 all of them, so the gradients are those of the
        weight-side forward.
        """
        y = self._run_conv(x, self.weight)
        d0, k0 = self.weight.shape[0], self.weight.shape[2]
        xc = self._chunked_input(x)
        equal_ranks = len({self.lora_A[t].shape for t in regions}) == 1
        if equal_ranks and len(regions) > 1 and all(n == 1 for n in sizes):
            # one sample per region: one grouped conv with the regions side by side in channels
            n_regions = len(regions)
            lora_b = torch.stack([self.lora_B[t] for t in regions]).view(n_regions, d0, -1)
            weight = torch.cat([self._lora_a_as_conv(t) for t in regions])
            z = self._conv_groups(xc.reshape(1, -1, *x.shape[2:]), weight, n_regions * k0)
            scalings = [self.scaling[t] for t in regions]
            alpha = scalings[0]
            if len(set(scalings)) != 1:
                lora_b = lora_b * lora_b.new_tensor(scalings).view(-1, 1, 1)
                alpha = 1.0
            # y + s_t * B_t z_t in one kernel: the output view (regions, d0, voxels) of y is one sample each
            out = torch.baddbmm(
                y.reshape(n_regions, d0, -1), lora_b, z.reshape(n_regions, lora_b.shape[-1], -1), alpha=alpha
            )
            return out.view_as(y)
        else:
            parts = []
            for t, chunk in zip(regions, torch.split(xc, sizes), strict=True):
                z = self._conv_groups(chunk, self._lora_a_as_conv(t), k0).flatten(2)
                parts.append(torch.matmul(self.lora_B[t].view(d0, -1), z) * self.scaling[t])
            corr = torch.cat(parts)
        return y + corr.view_as(y)

    def _run_grouped(self, x: torch.Tensor, regions: tuple[int, ...]) -> torch.Tensor:
        """One sample per region: view the batch as one sample with the regions side by side in channels."""
        t = len(regions)
        weight = self.expert_weights(regions).flatten(0, 1)
        bias = None if self.bias is None else self.bias.repeat(t)
        out = self._conv_groups(x.reshape(1, t * x.shape[1], *x.shape[2:]), weight, t, bias)
        return out.view(t, -1, *out.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.routing_plan
        if self.merged_region is not None:
            return self._forward_merged(x, plan)
        if plan is None:
            raise RoutingError(
                f"expert layer '{self.lorkd_name}' was called without routing. Wrap the forward in "
                "`with route(net, region_ids):` (one id per sample, or one int for all), or in "
                "`with backbone_only(net):` to run the shared backbone alone on purpose."
            )
        if plan.backbone_only:
            return self._run_conv(x, self.weight)
        regions, sizes = plan.groups_for_batch(x.shape[0], self.lorkd_name)
        activation_side = self._activation_side_is_cheaper(x, regions)
        if len(regions) == 1 and not activation_side:
            return self._run_conv(x, self.expert_weight(regions[0]))
        inv_perm = None
        if plan.perm is not None:  # called on its own, not through the routed network's forward
            perm, inv_perm = plan.permutations_on(x.device)
            x = x.index_select(0, perm)
        if activation_side:
            y = self._run_activation_side(x, regions, sizes)
        elif self._grouped_conv_is_faster(x, sizes):
            y = self._run_grouped(x, regions)
        else:
            weights = self.expert_weights(regions)
            y = torch.cat([self._run_conv(c, w) for c, w in zip(torch.split(x, sizes), weights, strict=True)])
        return y if inv_perm is None else y.index_select(0, inv_perm)

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
    def to_plain(self, region: int) -> nn.Module:
        """A layer of the original class with W = W0 + s*dW_region and the shared bias."""
        self._check_region(region)
        plain = self.base_class(**self._plain_kwargs(), device="meta")
        plain.weight = nn.Parameter(self.fused_weight(region), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        plain.train(self.training)
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
