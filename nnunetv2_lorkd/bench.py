"""Speed of LoRKD expert convolutions next to a plain conv, the official EKS scheme and a per-sample loop.

Run ``lorkd-bench`` (or ``python -m nnunetv2_lorkd.bench``). All variants of one configuration are timed in
the same process and interleaved (the order rotates every repeat), so slow drift (clocks, caches) hits every
variant alike; each time is forward + backward (or a whole SGD step), and the median over repeats is reported
after warm-up calls. Other processes competing for the CPU still distort the ratios, so the run reports the
CPU they took.

The "official-style" variant is a reimplementation, from the description in lorkd-method.md §2.2, of the
scheme in the LoRKD reference code: build every expert's delta on every call, aggregate one weight per
sample, run a single grouped convolution with ``groups = batch``. It is fixed to accept ``bias=None``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertLayer, add_experts, expert_layers, route

# the targets of the "core" issue; they are defined on the full (non-quick) sizes below
TARGET_CONV_RATIO = 1.10  # expert conv / plain conv, CPU and GPU
TARGET_OFFICIAL_SPEEDUP = 1.5  # official-style / ours, 2D, batch 64, T = 8
TARGET_NET_RATIO = {"cpu": 1.10, "cuda": 1.05}  # routed U-Net training step / plain U-Net step

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


# ------------------------------------------------------------------------------------------------ timing
@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one variant over the timed repeats."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    samples: int
    values_ms: tuple[float, ...] = ()  # the per-repeat times, in repeat order (for ratio intervals)


def _summarise(samples_ms: list[float]) -> Timing:
    med = statistics.median(samples_ms)
    if len(samples_ms) >= 2:
        q = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return Timing(med, q[0], q[2], len(samples_ms), tuple(samples_ms))
    return Timing(med, med, med, len(samples_ms), tuple(samples_ms))


def ratio_interval(
    numerator: Timing, denominator: Timing, level: float = 0.9, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap interval of median(numerator) / median(denominator) over the timed repeats.

    One run's ratio moves by a few percent from repeat noise alone, which decides a verdict near a limit;
    the interval says how far. Repeats are resampled in pairs (the same repeat index for both variants),
    because ``time_interleaved`` times every variant once per repeat and slow spells hit both alike.
    ``None`` when there are fewer than 5 paired repeats to resample.
    """
    num, den = numerator.values_ms, denominator.values_ms
    n = len(num)
    if n < 5 or len(den) != n:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(num[i] for i in picks) / statistics.median(den[i] for i in picks))
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[math.ceil((1.0 - tail) * (resamples - 1))]


def time_interleaved(
    variants: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    warmup: int,
    min_sample_s: float = 0.02,
) -> dict[str, Timing]:
    """Median time per call of each variant; variants alternate so that drift affects all of them alike.

    After `warmup` calls of each variant (cuDNN autotuning, allocator caches), each variant gets an inner
    call count so that one sample lasts at least `min_sample_s` (GPU calls are far shorter than timer and
    launch noise). Every repeat then runs each variant once, in an order rotated by one per repeat.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(variants)
    inner: dict[str, int] = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            variants[name]()
        sync()
        start = time.perf_counter()
        variants[name]()
        sync()
        once = time.perf_counter() - start
        inner[name] = max(1, min(100, math.ceil(min_sample_s / max(once, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = variants[name], inner[name]
            sync()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3 / n)
    return {n: _summarise(samples[n]) for n in names}


# ---------------------------------------------------------------------------------------- the benchmarks
@dataclass(frozen=True)
class Row:
    """One line of a result table."""

    variant: str
    timing: Timing


@dataclass
class Section:
    """A result table: its configuration line and its rows; ratios are taken against `reference`."""

    title: str
    config: str
    rows: list[Row]
    reference: str
    ours: str

    def ms(self, variant: str) -> float:
        return self.timing(variant).median_ms

    def timing(self, variant: str) -> Timing:
        return next(r.timing for r in self.rows if r.variant == variant)


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
    """The dynamic-network-architectures PlainConvUNet of `cfg` (nnU-Net's 3d_fullres layout)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        input_channels=cfg.in_channels,
        n_stages=cfg.stages,
        features_per_stage=cfg.features,
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=[1] + [2] * (cfg.stages - 1),
        n_conv_per_stage=2,
        num_classes=cfg.num_classes,
        n_conv_per_stage_decoder=2,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )


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
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_busy_fraction(window_s: float = 1.0) -> float | None:
    """The share of all cores busy during `window_s` (from /proc/stat): before we start, that is others."""

    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = read()
        time.sleep(window_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _cpu_ticks_by_pid() -> dict[int, int]:
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
    return ticks


class ForeignLoad:
    """CPU time that other processes take while the benchmark runs, as a share of all cores.

    On a shared machine their load distorts, not only slows, the timings: with OpenMP threads descheduled
    at random, many small ops suffer more than one large conv, so even interleaved ratios drift.
    """

    def __init__(self) -> None:
        self.before = cpu_busy_fraction()
        self._ticks = _cpu_ticks_by_pid() if Path("/proc/self/stat").exists() else None
        self._start = time.perf_counter()

    def during(self) -> float | None:
        if self._ticks is None:
            return None
        wall = time.perf_counter() - self._start
        now, me = _cpu_ticks_by_pid(), os.getpid()
        used = sum(t - self._ticks.get(pid, 0) for pid, t in now.items() if pid != me)
        return max(used, 0) / os.sysconf("SC_CLK_TCK") / max(wall * (os.cpu_count() or 1), 1e-9)

    @staticmethod
    def pct(value: float | None) -> str:
        return "unknown" if value is None else f"{value:.0%}"

    def describe(self, during: float | None) -> str:
        return (
            f"CPU taken by other processes: {self.pct(self.before)} of all cores just before the run, "
            f"{self.pct(during)} during it"
        )

    def warning(self, during: float | None = None) -> str | None:
        worst = max((v for v in (self.before, during) if v is not None), default=None)
        if worst is None or worst <= 0.2:
            return None
        return (
            f"WARNING: other processes took up to {worst:.0%} of the CPU around this run; they compete for "
            "the cores, so these numbers are not representative"
        )


def machine_description(device: torch.device) -> str:
    """One line naming everything that the numbers depend on."""
    parts = [
        f"CPU {cpu_model()}",
        f"{os.cpu_count()} logical cores",
        f"{torch.get_num_threads()} torch threads",
        f"torch {torch.__version__}",
        f"Python {platform.python_version()}",
    ]
    if device.type == "cuda":
        parts += [
            f"GPU {torch.cuda.get_device_name(device)}",
            f"CUDA {torch.version.cuda}",
            f"cuDNN {torch.backends.cudnn.version()} (benchmark={torch.backends.cudnn.benchmark})",
        ]
    return ", ".join(parts)


@dataclass(frozen=True)
class TargetResult:
    """One target: the measured ratio, the limit, and whether it holds (None: not applicable)."""

    description: str
    value: float
    limit: float
    at_most: bool  # True: value <= limit is a pass; False: value >= limit is a pass
    passed: bool | None
    interval: tuple[float, float] | None = None  # 90% bootstrap interval of the ratio (see ratio_interval)

    def verdict(self) -> str:
        if self.passed is None:
            return "n/a (not the size the target is defined on)"
        return "PASS" if self.passed else "MISS"

    def interval_text(self) -> str:
        """'1.065-1.098', with a note when the interval holds the limit (the run alone cannot settle it)."""
        if self.interval is None:
            return "-"
        low, high = self.interval
        text = f"{low:.3f}-{high:.3f}"
        return text + " (holds the limit)" if low <= self.limit <= high else text

    def line(self) -> str:
        op = "<=" if self.at_most else ">="
        interval = "" if self.interval is None else f", 90% CI {self.interval_text()}"
        return f"{self.description}: {self.value:.3f}x{interval} (target {op} {self.limit:.2f}x)  {self.verdict()}"


def evaluate_targets(
    sections: list[Section], device: torch.device, quick: bool, net_size_is_default: bool = True
) -> list[TargetResult]:
    """Compare the measured ratios with the targets of the core issue (no verdict off the defined sizes)."""

    def result(
        description: str, s: Section, over: str, under: str, limit: float, at_most: bool, applies: bool = True
    ) -> TargetResult:
        value = s.ms(over) / s.ms(under)
        passed = None if quick or not applies else (value <= limit if at_most else value >= limit)
        interval = ratio_interval(s.timing(over), s.timing(under))
        return TargetResult(description, value, limit, at_most, passed, interval)

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


def format_section(s: Section) -> list[str]:
    """A fixed-width console table of one section."""
    ref, ours = s.ms(s.reference), s.ms(s.ours)
    width = max(len(r.variant) for r in s.rows)
    lines = [
        f"{s.title}",
        f"  config: {s.config}",
        f"  {'variant':<{width}}  {'median ms':>10}  {'p25-p75 ms':>17}  {'vs plain':>8}  {'vs ours':>7}",
    ]
    for r in s.rows:
        t = r.timing
        spread = f"{t.p25_ms:.2f}-{t.p75_ms:.2f}"
        lines.append(
            f"  {r.variant:<{width}}  {t.median_ms:>10.2f}  {spread:>17}  "
            f"{t.median_ms / ref:>7.2f}x  {t.median_ms / ours:>6.2f}x"
        )
    return lines


def markdown_section(
    sections: list[Section],
    targets: list[TargetResult],
    device: torch.device,
    machine: str,
    settings: str,
    command: str,
    load: str = "",
) -> str:
    """The results of one run as a markdown subsection (machine, settings, tables, targets)."""
    label = "GPU" if device.type == "cuda" else "CPU"
    today = datetime.date.today().isoformat()
    lines = [
        f"### {label} ({today})",
        "",
        f"Machine: {machine}",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: {settings}",
        "",
    ]
    if load:
        lines += [f"Machine load: {load}", ""]
    for s in sections:
        ref, ours = s.ms(s.reference), s.ms(s.ours)
        lines += [
            f"**{s.title}** — {s.config}",
            "",
            "| variant | median ms | p25–p75 ms | vs plain | vs ours |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in s.rows:
            t = r.timing
            lines.append(
                f"| {r.variant} | {t.median_ms:.2f} | {t.p25_ms:.2f}–{t.p75_ms:.2f} | "
                f"{t.median_ms / ref:.2f}x | {t.median_ms / ours:.2f}x |"
            )
        lines.append("")
    lines += ["| target | measured | 90% CI | limit | result |", "|---|---:|---:|---:|---|"]
    for t in targets:
        op = "≤" if t.at_most else "≥"
        interval = t.interval_text().replace("-", "–", 1)
        lines.append(f"| {t.description} | {t.value:.3f}x | {interval} | {op} {t.limit:.2f}x | {t.verdict()} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str, device: torch.device) -> None:
    """Append the section to `path`; a GPU run replaces the "GPU: not yet measured" placeholder line."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmarks\n\n## Expert convolutions (issue: core)\n\n" + section)
        return
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if device.type == "cuda":
        for i, line in enumerate(lines):
            if line.strip() == GPU_PLACEHOLDER:
                lines[i] = section
                path.write_text("".join(lines))
                return
    path.write_text(text + ("" if text.endswith("\n") else "\n") + "\n" + section)


# -------------------------------------------------------------------------------------------------- main
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorkd-bench",
        description="Time LoRKD expert convolutions against a plain conv, the official-style grouped-conv "
        "scheme and a per-sample loop, plus one routed U-Net training step against the plain network.",
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device, help=f"default: {default_device}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1-2 repeats: a smoke test, not a measurement")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lorkd-bench: --device cuda was asked for but torch sees no CUDA device", file=sys.stderr)
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
    print(f"CPU taken by other processes just before the run: {foreign.pct(foreign.before)} of all cores")
    if foreign.warning():
        print(foreign.warning())
    print(f"settings: {settings}")
    if args.quick:
        print("QUICK MODE: tiny sizes, 1-2 repeats; a smoke test of the code paths, NOT a measurement")
    print()

    sections: list[Section] = []
    for cfg in conv_configs:
        sections.append(bench_conv(cfg, device, repeats, warmup, min_sample_s))
        print("\n".join(format_section(sections[-1])), end="\n\n", flush=True)
    if not args.skip_network:
        sections.append(bench_network(net_config, device, repeats, warmup, min_sample_s))
        print("\n".join(format_section(sections[-1])), end="\n\n", flush=True)

    targets = evaluate_targets(sections, device, args.quick, net_size_is_default)
    print("summary (ratios of medians, 90% CI by a paired bootstrap over the repeats; targets of the core issue):")
    for t in targets:
        print(f"  {t.line()}")
    if args.quick:
        print("(quick mode: sizes differ from those the targets are defined on; no verdict is given)")
    elif not net_size_is_default and not args.skip_network:
        print(f"(--net-patch {args.net_patch}: the U-Net step target is defined on the default patch; no verdict)")

    during = foreign.during()
    warning = foreign.warning(during)
    load_note = foreign.describe(during) + (f". {warning}" if warning else "")
    print(load_note)
    if args.markdown is not None:
        command = "lorkd-bench " + " ".join(sys.argv[1:] if argv is None else argv)
        write_markdown(
            args.markdown,
            markdown_section(
                sections,
                targets,
                device,
                machine,
                settings,
                command,
                load_note,
            ),
            device,
        )
        print(f"markdown section written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
