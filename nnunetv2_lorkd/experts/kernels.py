"""Which convolution kernel an expert layer runs, and the convolutions of its activation side.

Pure functions of tensors and convolution geometry, with no layer state, so each dispatch rule reads and tests
on its own. The rules are CPU-only: ATen's own choice between oneDNN and its native kernel is slow for the
one-sample convolutions that region routing creates. Every threshold is a measurement; the numbers and the
machine they come from are in docs/kernels.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# torch's direct oneDNN convolution (differentiable); absent in builds without oneDNN
ONEDNN_CONV = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()
# ATen's CPU rule (Convolution.cpp): a one-sample, ungrouped float32 conv with kernels of at most 3 takes oneDNN
# only when C*d2*d3 > this; below, its native kernel, which is slow except on maps under MIN_ONEDNN_VOXELS
ATEN_NATIVE_CONV_LIMIT = 20480
MIN_ONEDNN_VOXELS = 4**3
# 3D maps up to this size run one grouped conv even where ATen would take oneDNN for each sample
MAX_GROUPED_3D_VOXELS = 32**3


@dataclass(frozen=True)
class ConvGeometry:
    """What a convolution does besides its weight and bias, copied from a torch conv module once."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str
    reversed_padding: tuple[int, ...]  # F.pad's order: last spatial dim first, (before, after) per dim
    transposed: bool

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        return cls(
            tuple(conv.kernel_size),
            tuple(conv.stride),
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.dilation),
            conv.padding_mode,
            tuple(conv._reversed_padding_repeated_twice),
            bool(conv.transposed),
        )


def aten_runs_one_sample_natively(x: torch.Tensor) -> bool:
    """Whether ATen would run one sample of ``x`` (B, C, d1, d2, ...) on its native kernel."""
    return x.shape[1] * math.prod(x.shape[2:4]) <= ATEN_NATIVE_CONV_LIMIT


def cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


def output_voxels(spatial: Sequence[int], geometry: ConvGeometry) -> int:
    """Voxels of the output of a (non-transposed) convolution with this geometry."""
    if geometry.padding == "valid":
        pads: tuple[int, ...] = (0,) * len(geometry.kernel_size)
    elif geometry.padding == "same":  # total padding that keeps the size
        pads = tuple(d * (k - 1) for k, d in zip(geometry.kernel_size, geometry.dilation, strict=True))
    else:
        pads = tuple(2 * p for p in geometry.padding)
    voxels = 1
    for size, k, s, p, d in zip(spatial, geometry.kernel_size, geometry.stride, pads, geometry.dilation, strict=True):
        voxels *= (size + p - d * (k - 1) - 1) // s + 1
    return voxels


# ------------------------------------------------------------------------------------------------ dispatch rules
def activation_side_is_cheaper(
    x: torch.Tensor, weight_shape: Sequence[int], geometry: ConvGeometry, num_regions: int
) -> bool:
    """Whether to apply the experts to the activations (``conv(x, W0) + s*B(A(x))``) instead of building weights.

    Building ``W0 + s*B_t A_t`` costs the same whatever the batch, the activation-side correction about
    ``k0*r*k0 / d0`` of the conv per sample, so it wins where weights are big and maps tiny: it is taken when
    batch * output voxels * k0 < regions * out channels (docs/kernels.md, "Activation side").
    """
    k0, d0 = weight_shape[2], weight_shape[0]
    return x.shape[0] * output_voxels(x.shape[2:], geometry) * k0 < num_regions * d0


def grouped_conv_is_faster(
    x: torch.Tensor, sizes: Sequence[int], weight_shape: Sequence[int], geometry: ConvGeometry
) -> bool:
    """Whether one grouped conv (groups = regions, one sample each) beats one conv per region on CPU.

    Grouped convs always take oneDNN, while ATen sends a one-sample conv with C*d2*d3 <= 20480 to its slow native
    kernel; on 3D maps of at most 32^3 the grouped conv also saves joining the per-sample outputs and input
    gradients. Not below 4^3 voxels, with a single input channel, or with kernels ATen already sends to oneDNN
    (docs/kernels.md, "Grouped convolution").
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or len(sizes) < 2:
        return False
    if geometry.padding_mode != "zeros" or any(n != 1 for n in sizes):
        return False
    spatial = x.shape[2:]
    voxels = math.prod(spatial)
    if voxels < MIN_ONEDNN_VOXELS:
        return False
    three_d = len(spatial) == 3
    if three_d and x.shape[1] == 1:
        return False
    small_3d_maps = three_d and voxels <= MAX_GROUPED_3D_VOXELS
    wide_kernel = weight_shape[-1] > 3 and weight_shape[-2] > 3  # ATen takes oneDNN for these
    return (aten_runs_one_sample_natively(x) or small_3d_maps) and not wide_kernel


def one_sample_conv_needs_onednn(x: torch.Tensor, geometry: ConvGeometry) -> bool:
    """Whether a one-sample float32 3D conv should call oneDNN itself instead of letting ATen choose.

    Where ATen would run its native kernel (C*D*H <= 20480, at least 4^3 voxels), the direct oneDNN call is
    faster: a CT network's first layer, and the one-sample groups of a batch with uneven region sizes. Never when
    oneDNN is switched off or under CPU autocast, which does not cast the direct call's inputs
    (docs/kernels.md, "Direct oneDNN call").
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5 or x.shape[0] != 1:
        return False
    if not torch.backends.mkldnn.enabled or cpu_autocast_enabled():
        return False
    if geometry.transposed or not ONEDNN_CONV or isinstance(geometry.padding, str):
        return False
    if geometry.padding_mode != "zeros":
        return False
    return math.prod(x.shape[2:]) >= MIN_ONEDNN_VOXELS and aten_runs_one_sample_natively(x)


# ----------------------------------------------------------------------------------------------------- kernels
def onednn_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
) -> torch.Tensor:
    """The convolution on oneDNN, bypassing ATen's dispatch (see ``one_sample_conv_needs_onednn``)."""
    return torch.mkldnn_convolution(x, weight, bias, geometry.padding, geometry.stride, geometry.dilation, 1)


def conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry, groups: int = 1
) -> torch.Tensor:
    """A convolution with this geometry (padding mode included) and any weight and group count."""
    fn = F.conv2d if x.dim() == 4 else F.conv3d
    if geometry.padding_mode != "zeros":
        x = F.pad(x, geometry.reversed_padding, mode=geometry.padding_mode)
        return fn(x, weight, bias, geometry.stride, 0, geometry.dilation, groups)
    return fn(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, groups)


def taps_input(x: torch.Tensor, k0: int, geometry: ConvGeometry) -> torch.Tensor:
    """x unfolded along its first spatial dim by the kernel's k0 taps, viewed as (B, k0, d1, D', ...).

    Why this makes ``A_t`` an ordinary convolution: row o*k0+j of ``B_t @ A_t`` applies to chunk j of the
    flattened (d1, k0, k1, ...) input window, the run of (channel, first-dim tap) pairs ``c*k0 + kz`` from j*d1
    to j*d1+d1-1, each with its whole (k1, ...) sub-window. The (B, d1, k0, ...) stack of taps viewed as
    (B, k0, d1, ...) holds chunk j at index j, so ``A_t`` is one conv with kernel (1, k1, ...) over every chunk:
    no zero padding or copies of ``A_t``, and the conv sums its weight gradient over the chunks. The first dim's
    padding, stride and dilation are applied here, the other dims' by ``lora_a_conv``.
    """
    stride, dilation = geometry.stride[0], geometry.dilation[0]
    pads = geometry.reversed_padding
    if geometry.padding_mode != "zeros":
        x = F.pad(x, pads, mode=geometry.padding_mode)
    elif pads[-2] or pads[-1]:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (pads[-2], pads[-1]))
    out = (x.shape[2] - dilation * (k0 - 1) - 1) // stride + 1
    span = stride * (out - 1) + 1
    taps = torch.stack([x[:, :, j * dilation : j * dilation + span : stride] for j in range(k0)], dim=2)
    return taps.view(x.shape[0], k0, x.shape[1], *taps.shape[3:])


def lora_a_conv(taps: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry, groups: int = 1) -> torch.Tensor:
    """The (1, k1, ...) convolution of A over ``taps_input`` chunks: the stride, padding and dilation of the dims
    after the first, which ``taps_input`` has already resolved."""
    fn = F.conv2d if taps.dim() == 4 else F.conv3d
    if geometry.padding_mode != "zeros":
        padding: str | tuple[int, ...] | int = 0
    elif isinstance(geometry.padding, str):  # 'same' / 'valid': a kernel of 1 in the first dim pads nothing there
        padding = geometry.padding
    else:
        padding = (0, *geometry.padding[1:])
    return fn(taps, weight, None, (1, *geometry.stride[1:]), padding, (1, *geometry.dilation[1:]), groups)
