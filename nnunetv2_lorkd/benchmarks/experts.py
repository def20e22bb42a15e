"""Speed of LoRKD expert convolutions next to a plain conv, the official EKS scheme and a per-sample loop.

Run ``lorkd-bench`` (or ``python -m nnunetv2_lorkd.benchmarks.experts``). All variants of one configuration
are timed in the same process and interleaved (the order rotates every repeat), so slow drift (clocks, caches)
hits every variant alike; each time is forward + backward (or a whole SGD step), and the median over repeats
is reported after warm-up calls. Other processes competing for the CPU still distort the ratios, so the run reports the
CPU they took.

The "official-style" variant is a reimplementation of the efficient-knowledge-separation scheme in the
public LoRKD reference code (read from that code, not copied): build every expert's delta on every call,
aggregate one weight per sample, run a single grouped convolution with ``groups = batch``. It is fixed to
accept ``bias=None``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import ExpertLayer, add_experts, expert_layers, route
from ..files import write_text
from .common import (
    QUICK_HELP,
    TARGET_NET_RATIO,
    ForeignLoad,
    Row,
    Section,
    TargetResult,
    add_device_argument,
    command_line,
    cuda_missing,
    machine_description,
    markdown_section,
    plain_conv_unet,
    positive_int,
    print_section,
    time_interleaved,
)

# the targets of the "core" issue (and common.TARGET_NET_RATIO); they are defined on the full (non-quick) sizes below
TARGET_CONV_RATIO = 1.10  # expert conv / plain conv, CPU and GPU
TARGET_OFFICIAL_SPEEDUP = 1.5  # official-style / ours, 2D, batch 64, T = 8

GPU_PLACEHOLDER = "GPU: not yet measured"


# ------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class ConvConfig:
    """One expert-conv benchmark shape."""

    name: str
    dim: int
    batch: int
    in_channels: int
    out_channels: int
    size: int  # spatial edge length (square / cube)
    kernel: int
    experts: int
    rank: int
    bias: bool = True

    def describe(self) -> str:
        spatial = "x".join([str(self.size)] * self.dim)
        return (
            f"{self.name}: batch {self.batch}, {self.in_channels}->{self.out_channels} ch, {spatial}, "
            f"kernel {self.kernel}, T={self.experts} experts, rank {self.rank}, bias={self.bias}"
        )


@dataclass(frozen=True)
class NetConfig:
    """A 3D PlainConvUNet shaped like nnU-Net's 3d_fullres networks."""

    features: tuple[int, ...]
    patch: int
    batch: int = 2
    experts: int = 8
    in_channels: int = 1
    num_classes: int = 4

    @property
    def stages(self) -> int:
        return len(self.features)

    def describe(self) -> str:
        return (
            f"3D PlainConvUNet: {self.stages} stages, features {list(self.features)}, kernel 3, "
            f"strides [1{', 2' * (self.stages - 1)}], 2 convs per stage (encoder and decoder), conv bias, "
            f"InstanceNorm3d(affine), LeakyReLU, deep supervision, {self.in_channels} input channel(s), "
            f"{self.num_classes} classes, batch {self.batch}, patch {self.patch}^3, "
            f"add_experts(num_experts={self.experts}) with default ranks, "
            "SGD(momentum 0.99, nesterov), MSE loss"
        )


CONV_CONFIGS = (
    ConvConfig("2D", dim=2, batch=64, in_channels=64, out_channels=64, size=32, kernel=3, experts=8, rank=4),
    ConvConfig("3D", dim=3, batch=2, in_channels=32, out_channels=32, size=32, kernel=3, experts=8, rank=8),
)
QUICK_CONV_CONFIGS = (
    ConvConfig("2D", dim=2, batch=8, in_channels=4, out_channels=4, size=8, kernel=3, experts=4, rank=2),
    ConvConfig("3D", dim=3, batch=2, in_channels=4, out_channels=4, size=6, kernel=3, experts=4, rank=2),
)
NET_CONFIGS = {
    "cuda": NetConfig(features=(32, 64, 128, 256, 320), patch=64),
    # the same network on a 32^3 patch (1/8 of the voxels), so that a step takes about a second on 2 cores
    "cpu": NetConfig(features=(32, 64, 128, 256, 320), patch=32),
}
QUICK_NET_CONFIG = NetConfig(features=(4, 8, 16), patch=8, experts=4)


# ------------------------------------------------------------------------------- the compared conv schemes
def _conv_fn(dim: int) -> Callable[..., torch.Tensor]:
    return F.conv2d if dim == 2 else F.conv3d


def _check_zero_padding(layer: ExpertLayer) -> None:
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        raise ValueError("the reference schemes implement padding_mode='zeros' only")


def official_style_conv(
    layer: ExpertLayer, x: torch.Tensor, onehot: torch.Tensor, aggregate: str = "broadcast"
) -> torch.Tensor:
    """The official EKS forward (one grouped conv over per-sample weights), on `layer`'s own parameters.

    Every call builds all T deltas ``s_t * (B_t @ A_t)`` (also for absent regions), aggregates
    ``W_b = W0 + sum_t onehot[b, t] * delta_t`` for each sample b and runs one convolution with
    ``groups = B``. ``aggregate="broadcast"`` materialises the (B, T, ...) product and sums over T as the
    reference code does; ``"matmul"`` does the same sum as one (B, T) @ (T, numel) product, a stronger
    baseline. Unlike the reference code, a conv without bias works.
    """
    _check_zero_padding(layer)
    weight = layer.weight
    batch, experts = x.shape[0], layer.num_experts
    if onehot.shape != (batch, experts):
        raise ValueError(f"onehot must have shape ({batch}, {experts}), got {tuple(onehot.shape)}")
    deltas = torch.stack(
        [(layer.lora_B[t] @ layer.lora_A[t]).mul(layer.scaling[t]).view(weight.shape) for t in range(experts)]
    )  # (T, Cout, Cin, k...)
    m = onehot.to(weight.dtype)
    if aggregate == "broadcast":
        agg = weight + (deltas.unsqueeze(0) * m.view(batch, experts, *([1] * weight.dim()))).sum(dim=1)
    elif aggregate == "matmul":
        agg = weight + (m @ deltas.reshape(experts, -1)).view(batch, *weight.shape)
    else:
        raise ValueError(f"aggregate must be 'broadcast' or 'matmul', got {aggregate!r}")
    cout, cin = weight.shape[0], weight.shape[1]
    bias = None if layer.bias is None else layer.bias.repeat(batch)
    y = _conv_fn(weight.dim() - 2)(
        x.reshape(1, batch * cin, *x.shape[2:]),
        agg.reshape(batch * cout, cin, *weight.shape[2:]),
        bias,
        layer.stride,
        layer.padding,
        layer.dilation,
        batch,
    )
    return y.view(batch, cout, *y.shape[2:])


def per_sample_conv(layer: ExpertLayer, x: torch.Tensor, region_ids: Sequence[int]) -> torch.Tensor:
    """The naive scheme: one convolution per sample with its own ``W0 + s_t * dW_t``."""
    _check_zero_padding(layer)
    conv = _conv_fn(layer.weight.dim() - 2)
    outs = [
        conv(x[b : b + 1], layer.expert_weight(t), layer.bias, layer.stride, layer.padding, layer.dilation)
        for b, t in enumerate(region_ids)
    ]
    return torch.cat(outs)


def mixed_region_ids(batch: int, experts: int, seed: int = 0) -> list[int]:
    """Region ids in shuffled order with as many regions present as the batch allows (all when B >= T)."""
    rng = random.Random(seed)
    present = rng.sample(range(experts), min(batch, experts))
    ids = [present[i % len(present)] for i in range(batch)]  # balanced: every present region equally often
    rng.shuffle(ids)
    return ids


# ---------------------------------------------------------------------------------------- the benchmarks
PLAIN, OURS_IN_NET, OURS, OFFICIAL, OFFICIAL_MM, LOOP = (
    "plain conv",
    "ours, inside a network (batch grouped once by route)",
    "ours, layer alone (route regroups at this layer)",
    "official-style (grouped conv)",
    "official-style, matmul aggregation",
    "per-sample loop",
)
PLAIN_NET, OURS_NET = "plain U-Net", "routed expert U-Net (ours)"


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def bench_conv(
    cfg: ConvConfig, device: torch.device, repeats: int, warmup: int, min_sample_s: float = 0.02, seed: int = 0
) -> Section:
    """Forward + backward of one conv layer under every scheme, on the same input and parameters."""
    torch.manual_seed(seed)
    conv_cls = nn.Conv2d if cfg.dim == 2 else nn.Conv3d
    pad = cfg.kernel // 2
    base = conv_cls(cfg.in_channels, cfg.out_channels, cfg.kernel, padding=pad, bias=cfg.bias)
    plain = copy.deepcopy(base).to(device)
    holder = add_experts(nn.Sequential(base), num_experts=cfg.experts, rank=cfg.rank, report=lambda _: None)
    holder.to(device).train()
    (layer,) = expert_layers(holder)
    with torch.no_grad():  # non-zero experts, like a trained network (fresh ones have B = 0)
        for b in layer.lora_B:
            b.normal_(0.0, 0.01)
    ids = mixed_region_ids(cfg.batch, cfg.experts, seed)
    ids_dev = torch.tensor(ids, device=device)  # the official code gets its labels as a device tensor
    shape = (cfg.batch, cfg.in_channels, *([cfg.size] * cfg.dim))
    x = torch.randn(shape, device=device, requires_grad=True)  # inside a network the input needs a gradient
    with torch.no_grad():
        grad_out = torch.randn_like(plain(x))
    plain_params = [x, *plain.parameters()]
    expert_params = [x, *layer.parameters()]

    def run_plain() -> None:
        _clear_grads(plain_params)
        plain(x).backward(grad_out)

    def run_ours() -> None:
        _clear_grads(expert_params)
        with route(holder, ids):
            y = holder(x)
        y.backward(grad_out)

    grouped_ids = sorted(ids)  # what every layer of a routed network sees: route sorted the batch at the input

    def run_ours_in_net() -> None:
        _clear_grads(expert_params)
        with route(holder, grouped_ids):
            y = holder(x)
        y.backward(grad_out)

    def official(aggregate: str) -> Callable[[], None]:
        def run() -> None:
            _clear_grads(expert_params)
            onehot = F.one_hot(ids_dev, cfg.experts)
            official_style_conv(layer, x, onehot, aggregate).backward(grad_out)

        return run

    def run_loop() -> None:
        _clear_grads(expert_params)
        per_sample_conv(layer, x, ids).backward(grad_out)

    variants = {
        PLAIN: run_plain,
        OURS_IN_NET: run_ours_in_net,
        OURS: run_ours,
        OFFICIAL: official("broadcast"),
        OFFICIAL_MM: official("matmul"),
        LOOP: run_loop,
    }
    timings = time_interleaved(variants, device, repeats, warmup, min_sample_s)
    present = sorted(set(ids))
    config = (
        f"{cfg.describe()}; regions {present} present ({len(present)} of {cfg.experts}), "
        f"shuffled order {ids if len(ids) <= 16 else [*ids[:16], '...']}"
    )
    return Section(
        f"{cfg.name} conv, forward + backward", config, [Row(n, t) for n, t in timings.items()], PLAIN, OURS_IN_NET
    )


def build_unet(cfg: NetConfig) -> nn.Module:
    """The PlainConvUNet of `cfg` (nnU-Net's 3d_fullres layout)."""
    return plain_conv_unet(cfg.features, cfg.in_channels, cfg.num_classes)


def bench_network(
    cfg: NetConfig, device: torch.device, repeats: int, warmup: int, min_sample_s: float = 0.02, seed: int = 0
) -> Section:
    """One training step (forward, MSE loss over the deep-supervision outputs, backward, SGD step)."""
    torch.manual_seed(seed)
    plain = build_unet(cfg)
    routed = add_experts(copy.deepcopy(plain), num_experts=cfg.experts, report=lambda _: None)
    plain.to(device).train()
    routed.to(device).train()
    ids = mixed_region_ids(cfg.batch, cfg.experts, seed)
    x = torch.randn(cfg.batch, cfg.in_channels, *([cfg.patch] * 3), device=device)
    with torch.no_grad(), route(routed, ids):
        targets = [torch.randn_like(o) for o in routed(x)]

    def step_fn(net: nn.Module, routed_ids: list[int] | None) -> Callable[[], None]:
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if routed_ids is None:
                outs = net(x)
            else:
                with route(net, routed_ids):
                    outs = net(x)
            loss = sum(F.mse_loss(o, t) for o, t in zip(outs, targets, strict=True))
            loss.backward()
            opt.step()

        return step

    timings = time_interleaved(
        {PLAIN_NET: step_fn(plain, None), OURS_NET: step_fn(routed, ids)}, device, repeats, warmup, min_sample_s
    )
    n_expert_convs = len(expert_layers(routed))
    config = f"{cfg.describe()}; {n_expert_convs} expert convs; regions of the {cfg.batch} samples: {ids}"
    return Section("whole-network training step", config, [Row(n, t) for n, t in timings.items()], PLAIN_NET, OURS_NET)


# ------------------------------------------------------------------------------------------------ report
def evaluate_targets(
    sections: list[Section], device: torch.device, quick: bool, net_size_is_default: bool = True
) -> list[TargetResult]:
    """Compare the measured ratios with the targets of the core issue (no verdict off the defined sizes)."""

    def result(
        description: str, s: Section, over: str, under: str, limit: float, at_most: bool, applies: bool = True
    ) -> TargetResult:
        return TargetResult.measure(description, s, over, under, limit, at_most, judged=applies and not quick)

    out = []
    for s in sections:
        if s.reference == PLAIN:
            name = s.title.split(" ")[0]
            description = f"{name} expert conv / plain conv ({device.type})"
            out.append(result(description, s, s.ours, s.reference, TARGET_CONV_RATIO, True))
            if name == "2D":
                description = "2D official-style / ours (speed-up, B=64, T=8)"
                out.append(result(description, s, OFFICIAL, s.ours, TARGET_OFFICIAL_SPEEDUP, False))
        else:
            limit = TARGET_NET_RATIO[device.type]
            description = f"routed U-Net step / plain U-Net step ({device.type})"
            out.append(result(description, s, s.ours, s.reference, limit, True, net_size_is_default))
    return out


def write_markdown(path: Path, section: str, device: torch.device) -> None:
    """Append the section to `path`; a GPU run replaces the "GPU: not yet measured" placeholder line.

    Written to a temporary file and renamed, so that a failed write never truncates the results file."""
    if not path.exists():
        write_text(path, "# Benchmarks\n\n## Expert convolutions (issue: core)\n\n" + section)
        return
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    placeholder = next((i for i, line in enumerate(lines) if line.strip() == GPU_PLACEHOLDER), None)
    if device.type == "cuda" and placeholder is not None:
        lines[placeholder] = section
        write_text(path, "".join(lines))
    else:
        write_text(path, text + ("" if text.endswith("\n") else "\n") + "\n" + section)


# -------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorkd-bench",
        description="Time LoRKD expert convolutions against a plain conv, the official-style grouped-conv "
        "scheme and a per-sample loop, plus one routed U-Net training step against the plain network.",
    )
    add_device_argument(p)
    p.add_argument("--quick", action="store_true", help=QUICK_HELP)
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="timed repeats per variant (default: 15 CPU, 50 GPU)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default: 3 CPU, 10 GPU)")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's own setting)"
    )
    p.add_argument("--markdown", type=Path, default=None, help="append the results as a markdown section to PATH")
    p.add_argument("--skip-network", action="store_true", help="time the single convolutions only")
    p.add_argument(
        "--net-patch",
        type=positive_int,
        default=None,
        help="cube edge of the U-Net step's patch (default: 32 CPU, 64 GPU; the target verdict is given only there)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the tables and the target summary; returns the exit code."""
    args = _parser().parse_args(argv)
    if cuda_missing("lorkd-bench", args.device):
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what nnU-Net training does
    repeats = args.repeats or (2 if args.quick else 50 if device.type == "cuda" else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10 if device.type == "cuda" else 3)
    conv_configs = QUICK_CONV_CONFIGS if args.quick else CONV_CONFIGS
    min_sample_s = 0.0 if args.quick else 0.02  # quick: one call per sample, it is no measurement
    net_config = QUICK_NET_CONFIG if args.quick else NET_CONFIGS[device.type]
    net_size_is_default = args.net_patch is None or args.net_patch == net_config.patch
    if args.net_patch is not None:
        net_config = dataclasses.replace(net_config, patch=args.net_patch)

    machine = machine_description(device)
    settings = (
        f"device {device.type}, float32, median of {repeats} repeats after {warmup} warm-up calls each, "
        "variants interleaved (order rotated each repeat); times are forward + backward per call "
        "(input requires grad), or one whole training step"
    )
    if args.quick:
        settings = "QUICK MODE (tiny sizes, not a measurement); " + settings
    print("LoRKD expert-convolution benchmark")
    print(f"machine: {machine}")
    foreign = ForeignLoad()  # a GPU run is host-bound at these sizes, so the host's load matters there too
    foreign.announce("the run")
    print(f"settings: {settings}")
    if args.quick:
        print("QUICK MODE: tiny sizes, 1-2 repeats; a smoke test of the code paths, NOT a measurement")
    print()

    sections: list[Section] = []
    for cfg in conv_configs:
        sections.append(bench_conv(cfg, device, repeats, warmup, min_sample_s))
        print_section(sections[-1])
    if not args.skip_network:
        sections.append(bench_network(net_config, device, repeats, warmup, min_sample_s))
        print_section(sections[-1])

    targets = evaluate_targets(sections, device, args.quick, net_size_is_default)
    print("summary (ratios of medians, 90% CI by a paired bootstrap over the repeats; targets of the core issue):")
    for t in targets:
        print(f"  {t.line()}")
    if args.quick:
        print("(quick mode: sizes differ from those the targets are defined on; no verdict is given)")
    elif not net_size_is_default and not args.skip_network:
        print(f"(--net-patch {args.net_patch}: the U-Net step target is defined on the default patch; no verdict)")

    load_note = foreign.note()
    print(load_note)
    if args.markdown is not None:
        command = command_line("lorkd-bench", argv)
        run_md = markdown_section(sections, targets, device, machine, settings, command, load_note)
        write_markdown(args.markdown, run_md, device)
        print(f"markdown section written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
