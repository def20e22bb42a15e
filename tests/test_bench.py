"""Smoke test of lorkd-bench; its reference schemes must compute what ours computes (a fair race)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_lorkd.benchmarks import common
from nnunetv2_lorkd.benchmarks import experts as bench
from nnunetv2_lorkd.experts import ExpertConv2d, ExpertConv3d, route


def _plain_per_sample(layer, x, ids):
    """The definition: one plain conv per sample with W0 + s_t * reshape(B_t @ A_t)."""
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    outs = []
    for b, t in enumerate(ids):
        w = layer.weight + (layer.lora_B[t] @ layer.lora_A[t]).reshape(layer.weight.shape) * layer.scaling[t]
        outs.append(conv(x[b : b + 1], w, layer.bias, layer.stride, layer.padding, layer.dilation))
    return torch.cat(outs)


def _expert_conv(dim, bias, stride, seed=0):
    torch.manual_seed(seed)
    base = (nn.Conv2d if dim == 2 else nn.Conv3d)(3, 5, 3, stride=stride, padding=1, bias=bias).double()
    cls = ExpertConv2d if dim == 2 else ExpertConv3d
    layer = cls(base, (2, 1, 3, 2), (4.0, 2.0, 1.5, 3.0), name="bench-test")
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("dim", "stride"), [(2, 1), (2, 2), (3, 1)], ids=["2d", "2d-stride2", "3d"])
def test_reference_schemes_match_per_sample_convs_fp64(dim, stride, bias):
    layer = _expert_conv(dim, bias, stride)
    ids = [3, 0, 2, 0, 3, 1]  # every region, not grouped
    x = torch.randn(len(ids), 3, *([6] * dim), dtype=torch.float64, requires_grad=True)
    expected = _plain_per_sample(layer, x, ids)
    onehot = F.one_hot(torch.tensor(ids), layer.num_experts)
    results = {
        "official-broadcast": bench.official_style_conv(layer, x, onehot, "broadcast"),
        "official-matmul": bench.official_style_conv(layer, x, onehot, "matmul"),
        "per-sample": bench.per_sample_conv(layer, x, ids),
    }
    with route(layer, ids):
        results["ours"] = layer(x)
    for name, y in results.items():
        assert y.shape == expected.shape, name
        assert (y - expected).abs().max().item() <= 1e-10, name

    # same gradients too: every variant does the same work for the backward pass
    grad_out = torch.randn_like(expected)
    params = [x, *layer.parameters()]
    reference = torch.autograd.grad(expected, params, grad_out)
    for name, y in results.items():
        grads = torch.autograd.grad(y, params, grad_out, allow_unused=True)
        for p, g, r in zip(params, grads, reference, strict=True):
            if r is None:
                continue
            g = torch.zeros_like(p) if g is None else g
            assert (g - r).abs().max().item() <= 1e-10, name


def test_official_style_rejects_a_wrong_onehot():
    layer = _expert_conv(2, True, 1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="onehot"):
        bench.official_style_conv(layer, x, torch.zeros(2, 3))


@pytest.mark.parametrize(("batch", "experts"), [(64, 8), (8, 4), (2, 8), (5, 3)])
def test_mixed_region_ids_present_and_balanced(batch, experts):
    ids = bench.mixed_region_ids(batch, experts, seed=1)
    assert len(ids) == batch
    assert len(set(ids)) == min(batch, experts)
    counts = [ids.count(r) for r in set(ids)]
    assert max(counts) - min(counts) <= 1


_RATIO = re.compile(r"^\s+(.+?):\s+([0-9.]+|nan|inf)x \(target (<=|>=) ([0-9.]+)x\)\s+(.*)$")


def test_quick_run_prints_tables_and_summary(capsys, tmp_path):
    md = tmp_path / "bench.md"
    assert bench.main(["--quick", "--device", "cpu", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "machine: CPU" in out and "torch" in out
    assert "NOT a measurement" in out
    for title in (
        "2D conv, forward + backward",
        "3D conv, forward + backward",
        "whole-network training step",
    ):
        assert title in out
    for variant in (
        bench.PLAIN,
        bench.OURS_IN_NET,
        bench.OURS,
        bench.OFFICIAL,
        bench.OFFICIAL_MM,
        bench.LOOP,
        bench.PLAIN_NET,
    ):
        assert variant in out

    summary = out.split("summary (")[1].splitlines()[1:]
    matches = [m for m in map(_RATIO.match, summary) if m]
    assert len(matches) == 4  # 2D and 3D conv ratio, official speed-up, network step ratio
    for m in matches:
        ratio = float(m.group(2))
        assert math.isfinite(ratio) and ratio > 0
        assert m.group(5).startswith("n/a")  # quick sizes give no verdict

    text = md.read_text()
    assert "## Expert convolutions (issue: core)" in text and "### CPU" in text and "Machine: CPU" in text


def test_markdown_append_and_gpu_placeholder(tmp_path):
    md = tmp_path / "b.md"
    md.write_text(f"# B\n\n#### GPU\n\n{bench.GPU_PLACEHOLDER}\n\n#### end\n")
    bench.write_markdown(md, "### CPU (x)\n", torch.device("cpu"))
    assert md.read_text().endswith("### CPU (x)\n") and bench.GPU_PLACEHOLDER in md.read_text()
    bench.write_markdown(md, "### GPU (y)\n", torch.device("cuda"))
    text = md.read_text()
    assert bench.GPU_PLACEHOLDER not in text
    assert text.index("### GPU (y)") < text.index("#### end") < text.index("### CPU (x)")


def test_no_network_verdict_off_the_defined_patch():
    """`--net-patch` other than the default still times the step but gives the U-Net target no verdict."""
    section = common.Section(
        "whole-network training step",
        "cfg",
        [
            common.Row(bench.PLAIN_NET, common.Timing(100.0, 90.0, 110.0, 5)),
            common.Row(bench.OURS_NET, common.Timing(105.0, 95.0, 115.0, 5)),
        ],
        bench.PLAIN_NET,
        bench.OURS_NET,
    )
    cpu = torch.device("cpu")
    (at_default,) = bench.evaluate_targets([section], cpu, quick=False)
    (elsewhere,) = bench.evaluate_targets([section], cpu, quick=False, net_size_is_default=False)
    assert at_default.passed is True and at_default.verdict() == "PASS"
    assert elsewhere.passed is None and elsewhere.verdict().startswith("n/a")
    assert elsewhere.value == at_default.value == 1.05


def test_ratio_interval_pairs_the_repeats():
    """The interval resamples repeats in pairs: a slow spell that hits both variants alike does not widen it."""
    spells = [1.0, 1.3, 0.8, 1.1, 0.9, 1.25, 0.85, 1.05, 1.2, 0.95]
    plain = common.summarise([100.0 * f for f in spells])
    ours = common.summarise([105.0 * f for f in spells])
    low, high = common.ratio_interval(ours, plain)
    assert low == pytest.approx(1.05) and high == pytest.approx(1.05)
    jitter = [1.0, 1.02, 0.97, 1.04, 0.99, 1.01, 0.96, 1.03, 1.0, 0.98]
    noisy = common.summarise([105.0 * f * j for f, j in zip(spells, jitter, strict=True)])
    low, high = common.ratio_interval(noisy, plain)
    assert low < noisy.median_ms / plain.median_ms < high and high - low < 0.1
    assert common.ratio_interval(common.summarise([1.0] * 4), common.summarise([1.0] * 4)) is None  # too few


def test_targets_carry_their_interval():
    """Each target line and the markdown table show the 90% interval, and say when it holds the limit."""
    spells = [1.0, 1.3, 0.8, 1.1, 0.9, 1.25, 0.85, 1.05, 1.2, 0.95]
    jitter = [1.0, 1.06, 0.93, 1.08, 0.97, 1.03, 0.92, 1.05, 1.0, 0.94]
    section = common.Section(
        "whole-network training step",
        "cfg",
        [
            common.Row(bench.PLAIN_NET, common.summarise([100.0 * f for f in spells])),
            common.Row(bench.OURS_NET, common.summarise([109.0 * f * j for f, j in zip(spells, jitter, strict=True)])),
        ],
        bench.PLAIN_NET,
        bench.OURS_NET,
    )
    (target,) = bench.evaluate_targets([section], torch.device("cpu"), quick=False)
    low, high = target.interval
    assert low <= target.value <= high and low < target.limit < high
    assert target.interval_text().endswith("(holds the limit)") and "90% CI" in target.line()
    md = common.markdown_section([section], [target], torch.device("cpu"), "m", "s", "c")
    assert "| target | measured | 90% CI | limit | result |" in md and "(holds the limit)" in md
    fixed = dataclasses.replace(target, interval=(1.02, 1.06))
    assert fixed.interval_text() == "1.020-1.060"


def test_cpu_load_of_others_is_a_share_of_the_cores():
    """lorkd-bench-nnunet measures the load just before its timing without its own process (exclude_self)."""
    for exclude_self in (False, True):
        share = common.cpu_busy_fraction(window_s=0.05, exclude_self=exclude_self)
        assert share is None or 0.0 <= share <= 1.0
