"""Repeats of the demo with different seeds (``lorkd-demo --seeds N``): mean and spread of every score, and the
goal's verdict on the means, so that a difference smaller than the seed-to-seed spread is not read as a result.

Each seed trains every model again (teacher, students, MTL, specialists) on the same data, plans and split; the
only difference between repeats is the seed of the training runs (weights, sampled patches, augmentation).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from nnunetv2_lorkd.files import write_text

from .report import ORDER, verdict, verdict_lines

PAIRS = (("lorkd", "teacher"), ("lorkd", "mtl"), ("lorkd", "specialist"))


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return None if len(known) != len(values) or not known else statistics.fmean(known)


def _sd(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return None if len(known) != len(values) or len(known) < 2 else statistics.stdev(known)


def aggregate(metrics_by_seed: dict[int, dict]) -> dict:
    """Per-seed metrics (``metrics.json`` of each run) -> ``mean`` (same layout, so :func:`verdict` applies),
    ``sd`` (region -> method -> standard deviation of the mean Dice over seeds), ``per_seed`` (region -> method ->
    mean Dice per seed) and ``differences`` (region -> "a - b" -> per-seed differences of the mean Dice)."""
    if not metrics_by_seed:
        raise ValueError("no seed has metrics to aggregate")
    seeds = sorted(metrics_by_seed)
    runs = [metrics_by_seed[s] for s in seeds]
    first = runs[0]
    for seed, run in zip(seeds, runs, strict=True):
        if list(run["regions"]) != list(first["regions"]):
            raise ValueError(
                f"seed {seed} has regions {list(run['regions'])}, seed {seeds[0]} has {list(first['regions'])}"
            )
    mean_regions: dict[str, dict] = {}
    sd: dict[str, dict] = {}
    per_seed: dict[str, dict] = {}
    differences: dict[str, dict] = {}
    for region, data in first["regions"].items():
        methods = {}
        for method in ORDER:
            entries = [run["regions"][region]["methods"][method] for run in runs]
            methods[method] = {
                "dice": {c: _mean([e["dice"][c] for e in entries]) for c in data["classes"]},
                "nsd": {c: _mean([e["nsd"][c] for e in entries]) for c in data["classes"]},
                "mean_dice": _mean([e["mean_dice"] for e in entries]),
                "mean_nsd": _mean([e["mean_nsd"] for e in entries]),
            }
            per_seed.setdefault(region, {})[method] = [e["mean_dice"] for e in entries]
            sd.setdefault(region, {})[method] = _sd([e["mean_dice"] for e in entries])
        mean_regions[region] = {**data, "methods": methods}
        for a, b in PAIRS:
            pairs = zip(per_seed[region][a], per_seed[region][b], strict=True)
            differences.setdefault(region, {})[f"{a} - {b}"] = [
                None if x is None or y is None else x - y for x, y in pairs
            ]
    mean = {**first, "regions": mean_regions}
    return {"seeds": seeds, "mean": mean, "sd": sd, "per_seed": per_seed, "differences": differences}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _consistency(values: list[float | None]) -> str:
    """Whether every seed agrees on the sign of a difference, which is what one may read from few seeds."""
    if any(v is None for v in values):
        return "undefined"
    if all(v > 0 for v in values):  # type: ignore[operator]
        return "same sign in every seed (+)"
    if all(v < 0 for v in values):  # type: ignore[operator]
        return "same sign in every seed (−)"
    return "sign differs between seeds: not a result"


def render_seeds_markdown(summary: dict, title: str) -> str:
    seeds = summary["seeds"]
    result = verdict(summary["mean"])
    lines = [f"# {title}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", ""]
    lines += [
        "Every model (teacher, LoRKD students, MTL baseline, specialists) was trained once per seed on the same data, "
        "plans and split. Scores are mean Dice over each region's classes on the test parts, in %; `±` is the "
        "standard deviation over the seeds. The goal's verdict below is on the means over seeds.",
        "",
    ]
    lines += verdict_lines(result, summary["sd"])
    lines += ["## Every seed", "", "| region | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
              "|---|---|" + "---|" * (len(seeds) + 1)]  # fmt: skip
    for region, methods in summary["per_seed"].items():
        for method in ORDER:
            values = methods[method]
            mean, sd = _mean(values), summary["sd"][region][method]
            spread = "–" if mean is None else _pct(mean) + ("" if sd is None else f" ± {100 * sd:.1f}")
            lines.append(f"| {region} | {method} | " + " | ".join(_pct(v) for v in values) + f" | {spread} |")
    lines += ["", "## Differences between methods, per seed (Dice points)", ""]
    lines += ["| region | difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | reading |",
              "|---|---|" + "---|" * (len(seeds) + 2)]  # fmt: skip
    for region, diffs in summary["differences"].items():
        for name, values in diffs.items():
            mean = _mean(values)
            lines.append(
                f"| {region} | {name} | " + " | ".join(_pct(v) for v in values) + f" | {_pct(mean)} | "
                f"{_consistency(values)} |"
            )
    lines.append("")
    return "\n".join(lines)


def write_seeds_report(metrics_files: dict[int, Path], out_dir: Path, title: str) -> Path:
    """Read each seed's metrics.json, write ``seeds.md`` and ``seeds.json`` into ``out_dir`` (atomically)."""
    metrics = {seed: json.loads(Path(path).read_text()) for seed, path in metrics_files.items()}
    summary = aggregate(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in (
        ("seeds.json", json.dumps({k: v for k, v in summary.items() if k != "mean"}, indent=2) + "\n"),
        ("seeds.md", render_seeds_markdown(summary, title)),
    ):
        written[name] = write_text(out_dir / name, text)
    return written["seeds.md"]

