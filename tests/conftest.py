from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunetv2_lorkd.experts import expert_layers


def make_unet(kind: str, dim: int, num_classes: int = 3, deep_supervision: bool = True) -> nn.Module:
    """Small dynamic-network-architectures U-Nets shaped like nnU-Net's (anisotropic first kernel in 3D)."""
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dim == 3 else [[3, 3], [3, 3], [3, 3]]
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dim == 3 else [[1, 1], [2, 2], [2, 2]]
    common = dict(
        input_channels=2,
        n_stages=3,
        features_per_stage=(4, 8, 16),
        conv_op=conv,
        kernel_sizes=kernels,
        strides=strides,
        num_classes=num_classes,
        n_conv_per_stage_decoder=(1, 1),
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=(2, 2, 2), **common)
    return ResidualEncoderUNet(n_blocks_per_stage=(1, 2, 2), **common)


def randomize_experts(net: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Fresh experts are zero (B = 0); tests need non-trivial ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in expert_layers(net):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * std)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
