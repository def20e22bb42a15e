"""Whole dynamic-network-architectures U-Nets: swapping, routing, fusion, checkpoints, reports."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_unet, randomize_experts
from torch import nn

from nnunetv2_lorkd.experts import (
    ExpertLayer,
    RoutingError,
    add_experts,
    backbone_only,
    expert_layers,
    expert_parameter_report,
    fuse_expert,
    merge_experts,
    route,
    unmerge_experts,
)

NETS = [("plain", 2), ("plain", 3), ("resenc", 2), ("resenc", 3)]
SHAPE = {2: (16, 20), 3: (8, 16, 12)}


def _module_types(net: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in net.named_modules(remove_duplicate=False)}


@pytest.mark.parametrize(("kind", "dim"), NETS)
def test_swap_covers_every_stage_conv_and_aliases(kind, dim):
    net = make_unet(kind, dim)
    convs_before = {
        name for name, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Conv3d) and ".seg_layers." not in name
    }
    lines: list[str] = []
    add_experts(net, 3, rank=2, report=lines.append)
    swapped = {layer.lorkd_name for layer in expert_layers(net)}
    assert swapped == convs_before  # encoder (incl. ResEnc stem and skip projections) + decoder stages
    assert "seg_head" in lines[1] and "transposed" in lines[1]
    for module in net.modules():  # `.conv` and `.all_modules.0` are the same (new) object
        if hasattr(module, "all_modules") and hasattr(module, "conv"):
            assert module.all_modules[0] is module.conv and isinstance(module.conv, ExpertLayer)
    assert net.decoder.encoder is net.encoder
    assert all(not isinstance(m, ExpertLayer) for m in net.decoder.seg_layers.modules())
    roles = {layer.lorkd_role for layer in expert_layers(net)}
    assert roles == {"encoder", "decoder"}
    for layer in expert_layers(net):
        assert layer.ranks == ((2, 2, 2) if layer.lorkd_role == "encoder" else (4, 4, 4))


@pytest.mark.parametrize(("kind", "dim"), NETS)
def test_fused_equals_routed_and_has_original_keys(kind, dim):
    net = make_unet(kind, dim)
    original_sd = {k: v.shape for k, v in net.state_dict().items()}
    original_types = _module_types(net)
    add_experts(net, 3, rank=2, ranks=(2, 1, 3), region_names=("abdomen", "thorax", "pelvis"))
    randomize_experts(net)
    net.eval()
    x = torch.randn(3, 2, *SHAPE[dim])
    with torch.no_grad(), route(net, [2, 0, 2]):
        routed = net(x)
    for region in (0, 2):
        fused = fuse_expert(net, region)
        assert {k: v.shape for k, v in fused.state_dict().items()} == original_sd
        assert _module_types(fused) == original_types
        assert not expert_layers(fused)
        idx = [b for b, t in enumerate([2, 0, 2]) if t == region]
        with torch.no_grad():
            out = fused(x[idx])
        for o, r in zip(out, routed, strict=True):
            assert (o - r[idx]).abs().max().item() <= 1e-5
    assert expert_layers(net)  # the routed network is left untouched


@pytest.mark.parametrize(("kind", "dim"), [("plain", 3), ("resenc", 2)])
def test_in_place_merge_matches_fusion(kind, dim):
    net = make_unet(kind, dim, deep_supervision=False)
    add_experts(net, 2, rank=2)
    randomize_experts(net)
    net.eval()
    x = torch.randn(2, 2, *SHAPE[dim])
    with torch.no_grad():
        expected = fuse_expert(net, 1)(x)
        merge_experts(net, 0)
        merge_experts(net, 1)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
    fused = dict(fuse_expert(net, 1).named_modules())
    for layer in expert_layers(net):  # fusion is merging: the same weights to the bit
        assert torch.equal(fused[layer.lorkd_name].weight, layer.merged_weight)
    unmerge_experts(net)
    with pytest.raises(RoutingError):
        net(x)


def test_state_dict_round_trip():
    net = make_unet("plain", 3)
    add_experts(net, 3, rank=2)
    randomize_experts(net)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert any(".lora_A.2" in k for k in state) and any("all_modules.0.lora_B.0" in k for k in state)
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    clone = add_experts(make_unet("plain", 3), 3, rank=2)
    clone.load_state_dict(state, strict=True)
    x = torch.randn(2, 2, *SHAPE[3])
    net.eval()
    clone.eval()
    with torch.no_grad(), route(net, [1, 2]), route(clone, [1, 2]):
        for a, b in zip(net(x), clone(x), strict=True):
            assert torch.equal(a, b)


def test_backbone_only_is_explicit_and_equals_fresh_network():
    net = make_unet("resenc", 3)
    plain_copy = make_unet("resenc", 3)
    plain_copy.load_state_dict(net.state_dict())
    add_experts(net, 2)
    x = torch.randn(2, 2, *SHAPE[3])
    with pytest.raises(RoutingError, match="without routing"):
        net(x)
    net.eval()
    plain_copy.eval()
    with torch.no_grad():
        with backbone_only(net):
            out = net(x)
        with route(net, 1):  # fresh experts: every region equals the backbone
            out_routed = net(x)
        ref = plain_copy(x)
    for a, b, c in zip(out, out_routed, ref, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_nested_routing_restores_previous_plan():
    net = add_experts(make_unet("plain", 2), 2, rank=1)
    x = torch.randn(2, 2, *SHAPE[2])
    with route(net, [0, 1]):
        with route(net, 1):
            net(x[:1])
        net(x)
    with pytest.raises(RoutingError):
        net(x)


def test_parameter_report_matches_formula():
    net = make_unet("plain", 3)
    n_original = sum(p.numel() for p in net.parameters())
    add_experts(net, 3, rank=2, ranks=(2, 1, 3), decoder_rank_factor=2, region_names=("a", "b", "c"))
    report = expert_parameter_report(net)
    assert report.backbone == n_original
    assert report.total == sum(p.numel() for p in net.parameters())
    expected = [0, 0, 0]
    for layer in expert_layers(net):
        shape = layer.weight.shape
        cout, cin, k0, rest = shape[0], shape[1], shape[2], shape[3:].numel()
        for t, r in enumerate(layer.ranks):
            assert r == (2, 1, 3)[t] * (1 if layer.lorkd_role == "encoder" else 2)
            expected[t] += r * k0 * (rest * cin + k0 * cout)
    assert list(report.per_expert) == expected
    text = report.format()
    assert "backbone" in text and "total stored" in text and "c " in text


def test_add_experts_options_and_errors():
    net = make_unet("plain", 3)
    add_experts(net, 2, rank=2, include_transposed=True, include_seg_heads=True, fixed_scaling=2.0)
    roles = {layer.lorkd_role for layer in expert_layers(net)}
    assert roles == {"encoder", "decoder", "transposed", "seg_head"}
    assert all(s == 2.0 for layer in expert_layers(net) for s in layer.scaling)
    randomize_experts(net)
    net.eval()
    x = torch.randn(1, 2, *SHAPE[3])
    with torch.no_grad(), route(net, 1):
        routed = net(x)
    fused = fuse_expert(net, 1)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], routed[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already has experts"):
        add_experts(net, 2)
    with pytest.raises(ValueError, match="ranks has 2 entries"):
        add_experts(make_unet("plain", 2), 3, ranks=(1, 2))
    with pytest.raises(ValueError, match="num_experts"):
        add_experts(make_unet("plain", 2), 0)
    with pytest.raises(ValueError, match="region_names"):
        add_experts(make_unet("plain", 2), 2, region_names=("a",))
    with pytest.raises(ValueError, match="no experts"):
        fuse_expert(make_unet("plain", 2), 0)
    with pytest.raises(RoutingError, match="out of range"):
        fuse_expert(net, 5)


def test_generic_network_and_grouped_convs_stay_shared():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)
    )
    lines: list[str] = []
    add_experts(net, 2, rank=2, report=lines.append)
    assert [type(m).__name__ for m in net] == ["ExpertConv2d", "ReLU", "Conv2d", "ExpertConv2d"]
    assert "groups=8" in lines[1]
