"""What every LoRKD benchmark shares: interleaved timing, ratio intervals, result tables, the machine and its load.

The benchmarks compare variants on a shared, noisy machine, so they must time, judge and report them the same
way; keeping one copy here means a fix to the timing or to the load accounting reaches every benchmark.
"""

from __future__ import annotations

import argparse
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
from torch import nn

# routed / plain training step; shared by the expert-conv benchmark (core issue) and the nnU-Net benchmark
TARGET_NET_RATIO = {"cpu": 1.10, "cuda": 1.05}
QUICK_HELP = "tiny sizes and 1-2 repeats: a smoke test, not a measurement"


# ------------------------------------------------------------------------------------------------ arguments
def positive_int(text: str) -> int:
    """argparse type: a count of repeats, threads or voxels, where 0 would silently measure nothing."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda``, defaulting to CUDA where torch sees it (the benchmarks' targets are per device)."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default, help=f"default: {default}")


def cuda_missing(prog: str, device: str) -> bool:
    """True (after saying so on stderr) when CUDA is asked for but absent: a CPU run would mislabel the numbers."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda was asked for but torch sees no CUDA device", file=sys.stderr)
        return True
    return False


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as the user typed it, for the markdown record (so a run can be repeated)."""
    return f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)


# --------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one variant over the timed repeats."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    samples: int
    values_ms: tuple[float, ...] = ()  # the per-repeat times, in repeat order (for ratio intervals)


def summarise(samples_ms: list[float]) -> Timing:
    """Median and quartiles of the repeats, keeping the raw values for the paired bootstrap."""
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
    return {n: summarise(samples[n]) for n in names}


# ---------------------------------------------------------------------------------------------- the tables
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


@dataclass(frozen=True)
class TargetResult:
    """One target: the measured ratio, the limit, and whether it holds (None: not applicable)."""

    description: str
    value: float
    limit: float
    at_most: bool  # True: value <= limit is a pass; False: value >= limit is a pass
    passed: bool | None
    interval: tuple[float, float] | None = None  # 90% bootstrap interval of the ratio (see ratio_interval)

    @classmethod
    def measure(
        cls, description: str, s: Section, over: str, under: str, limit: float, at_most: bool, judged: bool
    ) -> TargetResult:
        """The ratio of `over` to `under` in `s`, with a verdict only when `judged` (the defined sizes)."""
        value = s.ms(over) / s.ms(under)
        passed = (value <= limit if at_most else value >= limit) if judged else None
        return cls(description, value, limit, at_most, passed, ratio_interval(s.timing(over), s.timing(under)))

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


def print_section(s: Section) -> None:
    """Print a table as soon as it is measured: a long run shows its progress, and a crash keeps the tables."""
    print("\n".join(format_section(s)), end="\n\n", flush=True)


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


# ------------------------------------------------------------------------------------- the machine and load
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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


def _process_ticks(stat: str | Path) -> int:
    """utime + stime of one process, from its /proc/PID/stat (clock ticks, as /proc/stat counts)."""
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_busy_fraction(window_s: float = 1.0, exclude_self: bool = False) -> float | None:
    """The share of all cores busy during `window_s` (from /proc/stat), optionally without this process.

    Measured before the timing starts, that is other processes' load; `exclude_self` matters when this
    process has just done heavy setup whose OpenMP threads may still spin.
    """

    def read() -> tuple[int, int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        own = _process_ticks("/proc/self/stat") if exclude_self else 0
        return sum(fields[:8]), fields[3] + (fields[4] if len(fields) > 4 else 0), own  # idle + iowait

    try:
        total0, idle0, own0 = read()
        time.sleep(window_s)
        total1, idle1, own1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = max(total1 - total0, 1)
    return max(0.0, 1.0 - (idle1 - idle0) / total - (own1 - own0) / total)


def _cpu_ticks_by_pid() -> dict[int, int]:
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ticks[int(entry.name)] = _process_ticks(Path(entry.path, "stat"))
        except (OSError, ValueError, IndexError):
            continue
    return ticks


class ForeignLoad:
    """CPU time that other processes take while the benchmark runs, as a share of all cores.

    On a shared machine their load distorts, not only slows, the timings: with OpenMP threads descheduled
    at random, many small ops suffer more than one large conv, so even interleaved ratios drift.
    `exclude_self`: leave this process out of the share "just before" (see cpu_busy_fraction).
    """

    def __init__(self, exclude_self: bool = False) -> None:
        self.before = cpu_busy_fraction(exclude_self=exclude_self)
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

    def announce(self, when: str) -> None:
        """Print the load measured just before `when` (and the warning): the reader sees it before the numbers."""
        print(f"CPU taken by other processes just before {when}: {self.pct(self.before)} of all cores")
        if self.warning():
            print(self.warning())

    def note(self) -> str:
        """The load before and during the run, with the warning when it makes the numbers unrepresentative."""
        during = self.during()
        warning = self.warning(during)
        return self.describe(during) + (f". {warning}" if warning else "")


# ------------------------------------------------------------------------------------------------- networks
def plain_conv_unet(
    features: Sequence[int], in_channels: int, num_classes: int, deep_supervision: bool = True
) -> nn.Module:
    """The dynamic-network-architectures PlainConvUNet in nnU-Net's 3d_fullres layout, which the benchmarks time
    so that their numbers speak for the networks LoRKD is trained on."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        input_channels=in_channels,
        n_stages=len(features),
        features_per_stage=list(features),
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=[1] + [2] * (len(features) - 1),
        n_conv_per_stage=2,
        num_classes=num_classes,
        n_conv_per_stage_decoder=2,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
