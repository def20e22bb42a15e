"""Numerical contract of a single expert layer: per-sample equivalence, gradient isolation, merge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_lorkd.experts import (
    ExpertConv2d,
    ExpertConv3d,
    ExpertConvTranspose3d,
    ExpertLayer,
    RoutingError,
    backbone_only,
    kernels,
    route,
)

CASES = [
    # (conv class, in, out, kernel, stride, padding, dilation, bias, spatial)
    (nn.Conv2d, 3, 5, (3, 3), 1, 1, 1, True, (9, 11)),
    (nn.Conv2d, 4, 6, (3, 3), 2, 1, 1, False, (10, 9)),
    (nn.Conv2d, 3, 4, (1, 1), 1, 0, 1, True, (7, 7)),
    (nn.Conv2d, 3, 4, (3, 5), 1, (1, 2), 2, True, (12, 13)),
    (nn.Conv3d, 2, 3, (3, 3, 3), 1, 1, 1, True, (6, 7, 8)),
    (nn.Conv3d, 3, 4, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, False, (5, 8, 9)),
    (nn.Conv3d, 2, 5, (3, 3, 3), 2, 1, 1, False, (7, 8, 6)),
    (nn.Conv3d, 2, 2, (3, 1, 3), 1, (1, 0, 1), 1, True, (6, 5, 7)),
]
EXPERT_CLASS = {nn.Conv2d: ExpertConv2d, nn.Conv3d: ExpertConv3d}


@pytest.fixture(params=["weight-side", "activation-side"])
def expert_path(request, monkeypatch):
    """Run a test once with per-region weights W0 + s*dW_t and once with conv(x, W0) + s*B_t(A_t(x))."""
    activation = request.param == "activation-side"
    monkeypatch.setattr(kernels, "activation_side_is_cheaper", lambda *args: activation)
    return request.param


def _layer(case, ranks=(2, 3, 1), dtype=torch.float64, seed=0):
    cls, cin, cout, k, stride, pad, dil, bias, _ = case
    torch.manual_seed(seed)
    base = cls(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias).to(dtype)
    layer = EXPERT_CLASS[cls](base, ranks, tuple(4.0 / r for r in ranks), name="test")
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.3)
    return base, layer


def _reference(layer, x, ids):
    """One plain conv per sample with its own W0 + s*reshape(B@A), computed from the definition."""
    outs = []
    for b, t in enumerate(ids):
        delta = (layer.lora_B[t] @ layer.lora_A[t]).reshape(layer.weight.shape) * layer.scaling[t]
        outs.append(
            F.conv2d(x[b : b + 1], layer.weight + delta, layer.bias, layer.stride, layer.padding, layer.dilation)
            if x.dim() == 4
            else F.conv3d(x[b : b + 1], layer.weight + delta, layer.bias, layer.stride, layer.padding, layer.dilation)
        )
    return torch.cat(outs)


def _grouped(layer: ExpertLayer, x: torch.Tensor, sizes: tuple[int, ...]) -> bool:
    return layer._grouped_path and kernels.grouped_conv_is_faster(x, sizes, layer.weight.shape, layer.geometry)


def _direct_onednn(layer: ExpertLayer, x: torch.Tensor) -> bool:
    return kernels.one_sample_conv_needs_onednn(x, layer.geometry)


def _activation_side(layer: ExpertLayer, x: torch.Tensor, regions: tuple[int, ...]) -> bool:
    cheaper = kernels.activation_side_is_cheaper(x, layer.weight.shape, layer.geometry, len(regions))
    return layer._activation_path and cheaper


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}-k{c[3]}-s{c[4]}-bias{c[7]}")
@pytest.mark.parametrize("ids", [[2, 0, 2, 1, 0], [1, 1, 0, 0, 2], [2, 2, 2, 2, 2]], ids=["mixed", "grouped", "one"])
def test_per_sample_equivalence_fp64(case, ids, expert_path):
    _, layer = _layer(case)
    x = torch.randn(len(ids), case[1], *case[8], dtype=torch.float64)
    with route(layer, ids):
        y = layer(x)
    assert (y - _reference(layer, x, ids)).abs().max().item() <= 1e-10


def test_factor_shapes_follow_kernel_aware_factorisation():
    _, layer = _layer(CASES[5], ranks=(2, 3, 1))  # Conv3d 3->4, kernel (1,3,3)
    for r, a, b in zip((2, 3, 1), layer.lora_A, layer.lora_B, strict=True):
        assert a.shape == (r * 1, 3 * 3 * 3)
        assert b.shape == (4 * 1, r * 1)
        assert a.numel() + b.numel() == r * 1 * (3 * 3 * 3 + 1 * 4)  # r*k0*(k1*k2*Cin + k0*Cout)
    _, layer = _layer(CASES[4], ranks=(2, 2, 2))  # Conv3d 2->3, kernel 3
    assert layer.lora_A[0].shape == (6, 2 * 9) and layer.lora_B[0].shape == (9, 6)
    assert layer.ranks == (2, 2, 2)


def test_fresh_experts_equal_backbone_and_init():
    base = nn.Conv3d(3, 4, 3, padding=1)
    layer = ExpertConv3d(base, (4, 4), (4.0, 4.0))
    assert all(torch.count_nonzero(b) == 0 for b in layer.lora_B)
    bound = 1 / math.sqrt(layer.lora_A[0].shape[1])  # kaiming_uniform(a=sqrt(5)) bound
    assert layer.lora_A[0].abs().max() <= bound
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(2, 3, 5, 5, 5)
    with route(layer, 1):
        assert torch.equal(layer(x), base(x))  # dW = 0 exactly, same kernel
    with route(layer, [0, 1]):  # split batch: a different kernel call per sample, same math
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["2d", "3d-aniso"])
def test_gradient_isolation_exact(case, expert_path):
    ids = [0, 2, 0, 2]  # region 1 absent
    _, layer = _layer(case)
    x = torch.randn(len(ids), case[1], *case[8], dtype=torch.float64)
    layer.train()
    with route(layer, ids, touch_absent_experts=True):
        y = layer(x)
    target = torch.randn_like(y)
    ((y - target) ** 2).sum().backward()
    assert layer.lora_A[1].grad is not None and layer.lora_B[1].grad is not None  # takes part in the graph (DDP)
    assert torch.count_nonzero(layer.lora_A[1].grad) == 0 and torch.count_nonzero(layer.lora_B[1].grad) == 0
    for t in (0, 2):
        assert layer.lora_A[t].grad.abs().sum() > 0 and layer.lora_B[t].grad.abs().sum() > 0
    # expert t's gradient is exactly the gradient of region t's samples alone; W0's of all samples
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for t in (0, 2):
        layer.zero_grad()
        idx = [b for b, i in enumerate(ids) if i == t]
        with route(layer, [t] * len(idx)):
            yt = layer(x[idx])
        ((yt - target[idx]) ** 2).sum().backward()
        torch.testing.assert_close(layer.lora_A[t].grad, grads[f"lora_A.{t}"], rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.lora_B[t].grad, grads[f"lora_B.{t}"], rtol=0, atol=1e-10)
    ref_w0 = torch.zeros_like(layer.weight)
    for b, t in enumerate(ids):
        w = (layer.weight.detach() + layer.get_delta_weight(t).detach()).requires_grad_(True)
        out = F.conv2d if x.dim() == 4 else F.conv3d
        yb = out(x[b : b + 1], w, layer.bias, layer.stride, layer.padding, layer.dilation)
        ref_w0 += torch.autograd.grad(((yb - target[b : b + 1]) ** 2).sum(), w)[0]
    torch.testing.assert_close(grads["weight"], ref_w0, rtol=0, atol=1e-9)


def test_every_expert_gets_a_gradient_tensor_in_training_only():
    _, layer = _layer(CASES[0], dtype=torch.float32)
    x = torch.randn(2, 3, 9, 11)
    layer.eval()
    with route(layer, [0, 0]):
        layer(x).sum().backward()
    assert layer.lora_A[1].grad is None  # no zero-touch outside training
    layer.zero_grad(set_to_none=True)
    layer.train()
    with route(layer, [0, 0]):  # outside DDP, by default: absent experts get no gradient, the optimiser skips them
        layer(x).sum().backward()
    assert layer.lora_A[1].grad is None and layer.lora_A[0].grad is not None
    layer.zero_grad(set_to_none=True)
    with backbone_only(layer, touch_absent_experts=True):
        layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert all(torch.count_nonzero(a.grad) == 0 for a in layer.lora_A)


def test_transposed_conv_experts():
    base = nn.ConvTranspose3d(4, 3, (1, 2, 2), stride=(1, 2, 2), bias=False).double()
    layer = ExpertConvTranspose3d(base, (2, 2), (1.0, 1.0))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(3, 4, 2, 3, 3, dtype=torch.float64)
    with route(layer, [1, 0, 1]):
        y = layer(x)
    for b, t in enumerate([1, 0, 1]):
        w = layer.weight + layer.get_delta_weight(t)
        ref = F.conv_transpose3d(x[b : b + 1], w, None, layer.stride)
        assert (y[b : b + 1] - ref).abs().max() <= 1e-10
    with pytest.raises(RoutingError, match="not merged"):
        layer.to_plain()
    layer.merge(1)
    plain = layer.to_plain()
    assert type(plain) is nn.ConvTranspose3d and layer.merged_region is None
    assert (plain(x[:1]) - y[:1]).abs().max() <= 1e-10


def test_merge_and_switch_recompute_from_w0():
    _, layer = _layer(CASES[4], dtype=torch.float32)
    layer.eval()
    x = torch.randn(2, 2, 6, 7, 8)
    with torch.no_grad(), route(layer, 1):
        routed = layer(x)
    layer.merge(2)
    layer.merge(0)
    layer.merge(1)
    first = layer.merged_weight.clone()
    for _ in range(5):
        layer.merge(0)
        layer.merge(1)
    assert torch.equal(first, layer.merged_weight)  # no drift
    with torch.no_grad():
        torch.testing.assert_close(layer(x), routed, rtol=0, atol=1e-5)  # no routing needed once merged
        with route(layer, 1):
            layer(x)
        with pytest.raises(RoutingError, match="merged for region 1"), route(layer, [0, 1]):
            layer(x)
    layer.train()
    with pytest.raises(RoutingError, match="unmerge"):
        layer(x)
    layer.unmerge()
    with pytest.raises(RoutingError, match="without routing"):
        layer(x)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize(
    "cin, stride, ids, bias",
    [(1, 1, [1, 0], True), (1, 2, [0, 2], False), (4, 1, [0, 1, 1], True)],
    ids=["first-layer", "first-layer-stride2-nobias", "uneven-groups"],
)
def test_cpu_onednn_path_for_one_sample_groups(cin, stride, ids, bias, monkeypatch):
    """One-sample groups that ATen would send to its slow native 3D kernel call oneDNN directly; exact all the same."""
    torch.manual_seed(0)
    layer = ExpertConv3d(nn.Conv3d(cin, 5, 3, stride=stride, padding=1, bias=bias), (2, 2, 2), (2.0, 2.0, 2.0))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.3)
    layer.train()
    x = torch.randn(len(ids), cin, 8, 8, 8, requires_grad=True)
    assert _direct_onednn(layer, x[:1])
    assert not _direct_onednn(layer, x[:2])  # two samples: ATen already picks oneDNN
    assert not _direct_onednn(layer, x[:1].double())
    assert not _direct_onednn(layer, torch.empty(1, cin, 3, 3, 3))  # tiny maps: native is faster
    assert not _direct_onednn(layer, torch.empty(1, 32, 32, 32, 32))  # above ATen's 20480 rule
    with monkeypatch.context() as off:  # the user switched oneDNN off: ATen's choice stands
        off.setattr(torch.backends.mkldnn, "enabled", False)
        assert not _direct_onednn(layer, x[:1])
    assert torch.backends.mkldnn.enabled
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs ATen's conv in bfloat16: keep it
        assert not _direct_onednn(layer, x[:1])
        with route(layer, ids):
            assert layer(x.detach()).dtype == torch.bfloat16
    calls = []
    onednn = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(a[0].shape) or onednn(*a))
    with route(layer, ids):
        y = layer(x)
    assert len(calls) == sum(1 for t in set(ids) if ids.count(t) == 1)  # every one-sample group, nothing else
    layer64 = ExpertConv3d(nn.Conv3d(cin, 5, 3, stride=stride, padding=1, bias=bias).double(), (2, 2, 2), (2.0,) * 3)
    layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().requires_grad_(True)
    ref = _reference(layer64, x64, ids)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    target = torch.randn_like(y)
    ((y - target) ** 2).sum().backward()
    ((ref - target.double()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for t in range(3):
        if t not in ids:  # an absent expert gets no gradient at all, a present one its own samples' gradient
            assert layer.lora_A[t].grad is None and layer.lora_B[t].grad is None
            continue
        for got, want in zip((layer.lora_A[t], layer.lora_B[t]), (layer64.lora_A[t], layer64.lora_B[t]), strict=True):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), layer64.weight.grad, rtol=1e-4, atol=1e-4)


def test_layer_errors():
    base = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="grouped"):
        ExpertConv2d(nn.Conv2d(2, 2, 3, groups=2), (1,), (1.0,))
    with pytest.raises(TypeError, match="wraps Conv2d"):
        ExpertConv2d(nn.Conv3d(2, 2, 3), (1,), (1.0,))
    layer = ExpertConv2d(base, (1, 1), (1.0, 1.0), region_names=("abdomen", "thorax"), name="c")
    x = torch.randn(3, 2, 5, 5)
    with pytest.raises(RoutingError, match="without routing"):
        layer(x)
    with pytest.raises(RoutingError, match=r"valid ids are 0..1 \(0=abdomen, 1=thorax\)"), route(layer, [0, 2, 1]):
        pass
    with pytest.raises(RoutingError, match="batch of 3 samples but route"), route(layer, [0, 1]):
        layer(x)
    with pytest.raises(RoutingError, match="integer tensor"), route(layer, torch.zeros(3)):
        pass
    with route(layer, torch.tensor([1, 0, 1])):
        layer(x)
    with route(layer, 1):  # one region for any batch size
        layer(x)
        layer(x[:1])


def test_cpu_grouped_path_for_one_sample_per_region():
    """Two regions with one sample each take the grouped-conv path on CPU; outputs and gradients are exact."""
    torch.manual_seed(0)
    base = nn.Conv3d(4, 5, 3, padding=1)
    layer = ExpertConv3d(base, (2, 2, 2), (2.0, 2.0, 2.0), name="g")
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.3)
    layer.train()
    x = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    assert _grouped(layer, x, (1, 1))
    assert not _grouped(layer, x.double(), (1, 1))  # fp64 and uneven groups keep the split path
    assert not _grouped(layer, torch.randn(3, 4, 6, 6, 6), (2, 1))
    assert not _grouped(layer, torch.empty(2, 4, 3, 3, 3), (1, 1))  # below 4^3: native kernel
    wide = ExpertConv3d(nn.Conv3d(32, 32, 3, padding=1), (2, 2), (2.0, 2.0))
    assert _grouped(wide, torch.empty(2, 32, 32, 32, 32), (1, 1))  # oneDNN per sample, but small maps
    assert not _grouped(wide, torch.empty(2, 32, 32, 64, 64), (1, 1))  # big maps: one call per sample
    first = ExpertConv3d(nn.Conv3d(1, 32, 3, padding=1), (2, 2), (2.0, 2.0))
    assert not _grouped(first, torch.empty(2, 1, 32, 32, 32), (1, 1))  # one input channel
    flat = ExpertConv2d(nn.Conv2d(32, 32, 3, padding=1), (2, 2), (2.0, 2.0))
    assert _grouped(flat, torch.empty(2, 32, 16, 16), (1, 1))  # 2D: the native rule alone
    assert not _grouped(flat, torch.empty(2, 32, 32, 32), (1, 1))
    ids = [2, 0]
    with route(layer, ids, touch_absent_experts=True):
        y = layer(x)
    layer64 = ExpertConv3d(nn.Conv3d(4, 5, 3, padding=1).double(), (2, 2, 2), (2.0, 2.0, 2.0))
    layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(y.double(), _reference(layer64, x.detach().double(), ids), rtol=0, atol=1e-5)
    target = torch.randn_like(y)
    ((y - target) ** 2).sum().backward()
    assert torch.count_nonzero(layer.lora_A[1].grad) == 0 and torch.count_nonzero(layer.lora_B[1].grad) == 0
    for b, t in enumerate(ids):  # each present expert's gradient is its own sample's gradient
        w = layer.weight.detach() + layer.get_delta_weight(t)
        yb = F.conv3d(x[b : b + 1].detach(), w, layer.bias.detach(), padding=1)
        (ga,) = torch.autograd.grad(((yb - target[b : b + 1]) ** 2).sum(), layer.lora_A[t])
        torch.testing.assert_close(layer.lora_A[t].grad, ga, rtol=1e-4, atol=1e-5)


def test_route_regroups_once_at_the_network_input():
    torch.manual_seed(0)
    first = ExpertConv2d(nn.Conv2d(2, 3, 3, padding=1).double(), (1, 1, 1), (1.0,) * 3, name="first")
    second = ExpertConv2d(nn.Conv2d(3, 2, 3, padding=1).double(), (1, 1, 1), (1.0,) * 3, name="second")
    for layer in (first, second):
        with torch.no_grad():
            for b in layer.lora_B:
                b.normal_()
    net = nn.Sequential(first, nn.ReLU(), second)
    ids = [2, 0, 2, 1, 0]
    x = torch.randn(len(ids), 2, 5, 5, dtype=torch.float64)
    seen = []
    second.register_forward_pre_hook(lambda m, a: seen.append((m.routing_plan.perm, m.routing_plan.region_ids)))
    with route(net, ids):
        y = net(x)
        direct = second(torch.relu(first(x)))  # layers called on their own gather inside, same result
    assert seen[0] == (None, (0, 0, 1, 2, 2))  # the layers saw a batch already sorted by region
    assert seen[1][0] is not None
    ref = _reference(second, torch.relu(_reference(first, x, ids)), ids)
    assert (y - ref).abs().max() <= 1e-10 and (direct - ref).abs().max() <= 1e-10
    assert first.routing_plan is None and second.routing_plan is None

    class TwoOutputs(nn.Module):  # list outputs (deep supervision) come back in the caller's order too
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
            out = self.body(z)
            return [out, out[:, :1] * 2]

    two = TwoOutputs(net)
    with route(two, ids):
        a, b = two(x)
    assert (a - ref).abs().max() <= 1e-10 and (b - 2 * ref[:, :1]).abs().max() <= 1e-10


def test_absent_experts_touch_is_exact_zero_even_with_nonfinite_weights():
    torch.manual_seed(0)
    layer = ExpertConv2d(nn.Conv2d(2, 2, 3), (1, 1, 1), (1.0,) * 3, name="t")
    with torch.no_grad():
        layer.lora_A[2].fill_(float("inf"))  # a broken absent expert must not poison the step
    layer.train()
    x = torch.randn(2, 2, 5, 5)
    with route(layer, [0, 1], touch_absent_experts=True):
        y = layer(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert layer.lora_A[2].grad is not None and torch.count_nonzero(layer.lora_A[2].grad) == 0
    assert torch.count_nonzero(layer.lora_B[2].grad) == 0
    assert torch.isfinite(layer.weight.grad).all()


def test_activation_side_rule_picks_the_cheaper_side():
    """Deep, tiny feature maps with many channels apply the experts to activations; big feature maps build weights."""
    deep = ExpertConv3d(nn.Conv3d(256, 256, 3, padding=1), (8, 8), (2.0, 2.0))
    assert _activation_side(deep, torch.empty(2, 256, 4, 4, 4), (0, 1))  # 2*64*3 < 2*256
    assert not _activation_side(deep, torch.empty(2, 256, 16, 16, 16), (0, 1))
    strided = ExpertConv3d(nn.Conv3d(128, 256, 3, stride=2, padding=1), (8, 8), (2.0, 2.0))
    assert _activation_side(strided, torch.empty(2, 128, 8, 8, 8), (0, 1))  # output is 4^3
    shallow = ExpertConv2d(nn.Conv2d(32, 32, 3, padding=1), (4, 4), (4.0, 4.0))
    assert not _activation_side(shallow, torch.empty(64, 32, 32, 32), (0, 1))
    transposed = ExpertConvTranspose3d(nn.ConvTranspose3d(256, 128, 2, stride=2), (8, 8), (2.0, 2.0))
    assert not _activation_side(transposed, torch.empty(2, 256, 2, 2, 2), (0, 1))


@pytest.mark.parametrize("scalings", [(2.0, 2.0, 2.0), (4.0, 1.0, 0.5)], ids=["same-scale", "per-region-scale"])
@pytest.mark.parametrize(
    "cin, kernel, padding",
    [(5, (1, 3, 3), (0, 1, 1)), (7, 3, 1), (9, 3, 1), (2, (3, 1, 2), (1, 0, 1))],
    ids=["k0=1", "cin-not-multiple-of-k0", "cin-multiple-of-k0", "cin-below-k0"],
)
def test_activation_side_one_sample_per_region_fp64(scalings, cin, kernel, padding):
    """The one-grouped-conv branch of the activation side (one sample per region, equal ranks) is exact.

    The kernels and channel counts cover k0 = 1 and Cin not a multiple of k0, a multiple of it, and below it:
    A_t's k0 chunks of the flattened (Cin, k0, ...) window then straddle input channels in every way, and the
    stacked taps must still put chunk j at index j.
    """
    torch.manual_seed(0)
    layer = ExpertConv3d(nn.Conv3d(cin, 7, kernel, padding=padding).double(), (2, 2, 2), scalings)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.3)
    x = torch.randn(3, cin, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = [2, 0, 1]
    layer.train()
    with route(layer, ids):
        y = layer._run_activation_side(x, (2, 0, 1), (1, 1, 1))
    assert (y - _reference(layer, x.detach(), ids)).abs().max().item() <= 1e-10
    y.square().sum().backward()
    for b, t in enumerate(ids):
        w = layer.weight.detach() + layer.get_delta_weight(t)
        yb = F.conv3d(x[b : b + 1].detach(), w, layer.bias.detach(), padding=padding)
        (ga, gb) = torch.autograd.grad(yb.square().sum(), (layer.lora_A[t], layer.lora_B[t]))
        torch.testing.assert_close(layer.lora_A[t].grad, ga, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.lora_B[t].grad, gb, rtol=0, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("conv", [nn.Conv2d, nn.Conv3d])
def test_padding_modes_fp64(conv, padding_mode, expert_path):
    """Non-zero padding modes pad before every convolution of both sides, like the plain layer does."""
    torch.manual_seed(0)
    base = conv(5, 4, 3, padding=1, padding_mode=padding_mode).double()
    layer = EXPERT_CLASS[conv](base, (2, 3, 2), (2.0, 1.0, 2.0))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.3)
    ids = [1, 0, 1, 2]
    x = torch.randn(len(ids), 5, *([6] * (conv is nn.Conv3d)), 7, 5, dtype=torch.float64)
    with route(layer, ids):
        y = layer(x)
    for b, t in enumerate(ids):
        expected = base._conv_forward(x[b : b + 1], layer.weight + layer.get_delta_weight(t), layer.bias)
        assert (y[b : b + 1] - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize(
    "conv, kernel, padding, dilation",
    [
        (nn.Conv3d, (4, 3, 2), "same", (2, 1, 1)),  # even kernels: asymmetric 'same' padding
        (nn.Conv3d, (2, 3, 3), "valid", 1),
        (nn.Conv2d, (4, 3), "same", (1, 2)),
        (nn.Conv2d, (3, 2), "valid", (2, 1)),
    ],
    ids=["3d-same-even", "3d-valid", "2d-same-even", "2d-valid-dilated"],
)
@pytest.mark.parametrize("ids", [[1, 0, 2, 0], [1, 0, 2]], ids=["regions-of-two", "one-sample-per-region"])
def test_string_padding_and_dilation_fp64(conv, kernel, padding, dilation, ids, expert_path):
    """padding='same'/'valid' with dilation: the taps of the first spatial dim are padded like the plain conv."""
    torch.manual_seed(0)
    base = conv(6, 5, kernel, padding=padding, dilation=dilation).double()
    layer = EXPERT_CLASS[conv](base, (2, 3, 2), (2.0, 1.0, 2.0))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.3)
    x = torch.randn(len(ids), 6, *([7] * (conv is nn.Conv3d)), 8, 9, dtype=torch.float64)
    with route(layer, ids):
        y = layer(x)
    for b, t in enumerate(ids):
        expected = base._conv_forward(x[b : b + 1], layer.weight + layer.get_delta_weight(t), layer.bias)
        assert y.shape == (len(ids), *expected.shape[1:])
        assert (y[b : b + 1] - expected).abs().max().item() <= 1e-10
