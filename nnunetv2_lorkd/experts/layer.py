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

# torch's direct oneDNN convolution (differentiable); absent in builds without oneDNN
_ONEDNN_CONV = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()
# ATen's CPU rule (Convolution.cpp): a one-sample, ungrouped float32 conv with kernels of at most 3 takes oneDNN
# only when C*d2*d3 > this; below, its native kernel, which is slow except on maps under _MIN_ONEDNN_VOXELS
_ATEN_NATIVE_CONV_LIMIT = 20480
_MIN_ONEDNN_VOXELS = 64


def _aten_runs_one_sample_natively(x: torch.Tensor) -> bool:
    """Whether ATen would run one sample of ``x`` (B, C, d1, d2, ...) on its native kernel."""
    return x.shape[1] * math.prod(x.shape[2:4]) <= _ATEN_NATIVE_CONV_LIMIT


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


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

        Only on CPU and only when every region has a single sample. PyTorch runs a one-sample, ungrouped
        float32 conv with a 3-wide kernel on its slow native kernel unless C*d2*d3 > 20480 (the oneDNN rule in
        ATen's Convolution.cpp), which makes a 3D U-Net's middle stages 2-5x slower than the plain batched
        conv; grouped convs always take oneDNN. Above that size, one oneDNN call per sample is faster than the
        grouped conv on big maps (up to 1.3x at 32x64x64), but on 3D maps of at most 32^3 voxels the grouped
        conv wins inside a network: it needs no join of the per-sample outputs and input gradients, and the
        whole 32^3 training step measured about 2% faster so. Two cases keep one conv per sample: maps below
        4x4x4 voxels, where the native kernel is faster, and a single input channel (a CT network's first
        layer), where oneDNN's grouped conv is slow and one direct oneDNN call per sample is fastest
        (``_one_sample_conv_needs_onednn``; docs/benchmarks.md).
        """
        if x.device.type != "cpu" or x.dtype != torch.float32 or not self._grouped_path or len(sizes) < 2:
            return False
        if getattr(self, "padding_mode", "zeros") != "zeros":
            return False
        if any(n != 1 for n in sizes):
            return False
        spatial = x.shape[2:]
        voxels = math.prod(spatial)
        if voxels < _MIN_ONEDNN_VOXELS:
            return False
        three_d = len(spatial) == 3
        if three_d and x.shape[1] == 1:
            return False
        small_3d_maps = three_d and voxels <= 32**3
        wide_kernel = self.weight.shape[-1] > 3 and self.weight.shape[-2] > 3  # ATen takes oneDNN for these
        return (_aten_runs_one_sample_natively(x) or small_3d_maps) and not wide_kernel

    def _one_sample_conv_needs_onednn(self, x: torch.Tensor) -> bool:
        """Whether a one-sample 3D conv should call oneDNN itself instead of letting ATen choose.

        ATen's CPU dispatch (the 20480 rule above) sends a one-sample float32 3D conv with C*D*H <= 20480 to its
        native ``slow_conv3d``, which for a single input channel (a CT or MR network's first layer, run once
        per sample because oneDNN's grouped conv is slow there) took 1.3-1.7x the plain batched conv at 32^3
        and 64^3, forward + backward; ``torch.mkldnn_convolution`` on the same samples took 0.9-1.1x. It is also
        faster for the one-sample groups of a batch with uneven region sizes at 8^3-16^3 (1.1-1.6x). Tiny maps
        (below 4^3 voxels) keep the native kernel, which is faster there, and so does a user who switched
        oneDNN off (``torch.backends.mkldnn.enabled``). Under CPU autocast ATen's conv is kept, because autocast
        casts the inputs of ``F.conv3d`` to bfloat16 but not those of the direct call.
        """
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5 or x.shape[0] != 1:
            return False
        if not torch.backends.mkldnn.enabled or _cpu_autocast_enabled():  # autocast does not cover the direct call
            return False
        if self.transposed or not _ONEDNN_CONV or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return False
        return math.prod(x.shape[2:]) >= _MIN_ONEDNN_VOXELS and _aten_runs_one_sample_natively(x)

    def _run_region_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's conv for one region's samples, on oneDNN where ATen would pick its slow native kernel."""
        if self._one_sample_conv_needs_onednn(x):
            return torch.mkldnn_convolution(x, weight, self.bias, self.padding, self.stride, self.dilation, 1)
        return self._run_conv(x, weight)

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

    def _taps_input(self, x: torch.Tensor) -> torch.Tensor:
        """x unfolded along its first spatial dim by the kernel's k0 taps, viewed as (B, k0, d1, D', ...).

        Why this makes ``A_t`` an ordinary convolution: row o*k0+j of ``B_t @ A_t`` applies to chunk j of the
        flattened (d1, k0, k1, ...) input window, and chunk j is the run of (channel, first-dim tap) pairs
        ``c*k0 + kz`` from j*d1 to j*d1+d1-1, each with its whole (k1, ...) sub-window. Stacking the k0 taps next
        to the channels lays the pairs out in that order, so the (B, d1, k0, ...) stack viewed as (B, k0, d1, ...)
        holds chunk j at index j, and ``A_t`` is one conv with kernel (1, k1, ...) applied to every chunk: no
        zero padding of ``A_t``, no k0 copies of it, and its weight gradient is summed over the chunks by the
        convolution itself. The first dim's padding, stride and dilation are applied here; the other dims'
        are the conv's (``_lora_a_conv``).
        """
        k0 = self.weight.shape[2]
        stride, dilation = self.stride[0], self.dilation[0]
        pads = self._reversed_padding_repeated_twice
        if self.padding_mode != "zeros":
            x = F.pad(x, pads, mode=self.padding_mode)
        elif pads[-2] or pads[-1]:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (pads[-2], pads[-1]))
        out = (x.shape[2] - dilation * (k0 - 1) - 1) // stride + 1
        span = stride * (out - 1) + 1
        taps = torch.stack([x[:, :, j * dilation : j * dilation + span : stride] for j in range(k0)], dim=2)
        return taps.view(x.shape[0], k0, x.shape[1], *taps.shape[3:])

    def _lora_a_as_conv(self, region: int) -> torch.Tensor:
        """A_t as the weight of the (1, k1, ...) convolution over ``_taps_input`` chunks: a view, no copy."""
        a = self.lora_A[region]
        return a.view(a.shape[0], self.weight.shape[1], 1, *self.weight.shape[3:])

    def _lora_a_conv(self, taps: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """The (1, k1, ...) convolution of A over tap chunks: this layer's stride, padding and dilation on the
        dims after the first, which ``_taps_input`` has already resolved."""
        conv = F.conv2d if taps.dim() == 4 else F.conv3d
        if self.padding_mode != "zeros":
            padding: str | tuple[int, ...] | int = 0
        elif isinstance(self.padding, str):  # 'same' / 'valid': a kernel of 1 in the first dim pads nothing there
            padding = self.padding
        else:
            padding = (0, *self.padding[1:])
        return conv(taps, weight, None, (1, *self.stride[1:]), padding, (1, *self.dilation[1:]), groups)

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

        ``A_t(x)`` has k0*r*k0 channels per sample (``_taps_input``); ``B_t`` mixes them into the d0 output
        channels, added to the W0 conv's output by one ``baddbmm``. Expert t still sees only region t's samples,
        and W0 all of them, so the gradients are those of the weight-side forward.
        """
        y = self._run_conv(x, self.weight)
        d0, d1, k0 = self.weight.shape[:3]
        taps = self._taps_input(x)
        spatial = taps.shape[3:]
        voxels = y[0, 0].numel()
        n_regions = len(regions)
        equal_ranks = len({self.lora_A[t].shape for t in regions}) == 1
        if equal_ranks and n_regions > 1 and all(n == 1 for n in sizes):
            # one sample per region: one grouped conv (groups = regions) with the k0 chunks as its batch
            chunks = taps.transpose(0, 1).reshape(k0, n_regions * d1, *spatial)
            weight = torch.cat([self._lora_a_as_conv(t) for t in regions])
            z = self._lora_a_conv(chunks, weight, n_regions)
            z = z.view(k0, n_regions, -1, voxels).transpose(0, 1).reshape(n_regions, -1, voxels)
            lora_b = torch.stack([self.lora_B[t] for t in regions]).view(n_regions, d0, -1)
            scalings = [self.scaling[t] for t in regions]
            alpha = scalings[0]
            if len(set(scalings)) != 1:
                lora_b = lora_b * lora_b.new_tensor(scalings).view(-1, 1, 1)
                alpha = 1.0
            # y + s_t * B_t z_t in one kernel: the output view (regions, d0, voxels) of y is one sample each
            return torch.baddbmm(y.reshape(n_regions, d0, -1), lora_b, z, alpha=alpha).view_as(y)
        outs = []
        for t, n, taps_t, y_t in zip(regions, sizes, torch.split(taps, sizes), torch.split(y, sizes), strict=True):
            chunks = taps_t.reshape(n * k0, d1, *spatial)
            z = self._lora_a_conv(chunks, self._lora_a_as_conv(t), 1).view(n, -1, voxels)
            lora_b = self.lora_B[t].view(1, d0, -1).expand(n, -1, -1)
            outs.append(torch.baddbmm(y_t.reshape(n, d0, -1), lora_b, z, alpha=self.scaling[t]).view_as(y_t))
        return torch.cat(outs) if n_regions > 1 else outs[0]  # cat would copy a single part

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
            y = torch.cat([self._run_region_conv(c, w) for c, w in zip(torch.split(x, sizes), weights, strict=True)])
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
