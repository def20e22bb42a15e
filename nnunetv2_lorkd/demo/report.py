"""The demo report: a markdown file with the goal, the verdict, the tables and the caveats, plus one PNG bar
chart per region. Everything is computed from the metrics; nothing is rounded in anyone's favour.

The goal (from the project's issue): on every region, the LoRKD fused experts reach at least the teacher's
and the MTL baseline's mean Dice, and are within 1 Dice point (0.01) of the per-region specialists.
"""

from __future__ import annotations

import os
from pathlib import Path

GOAL = (
    "On every region, the LoRKD fused experts reach at least the mean Dice of the SAT-style teacher and of the MTL "
    "baseline, and are within 1 Dice point (0.01) of the per-region nnU-Net specialists."
)
SPECIALIST_MARGIN = 0.01
_ROUNDING = 1e-9  # 0.80 - 0.01 is 0.79000000000000004 in floating point; a Dice of exactly 0.79 is within 1 point
SCANS_NOTE = (
    "Each region has one scan (the test parts are slabs of the same scan as the training parts, separated by "
    "gaps), so this is a smoke benchmark of the pipeline on real anatomy, not evidence that results generalise "
    "to other patients or scanners."
)
ORDER = ("teacher", "lorkd", "mtl", "specialist")
COLORS = {"teacher": "#8c8c8c", "lorkd": "#d62728", "mtl": "#1f77b4", "specialist": "#2ca02c"}


def verdict(metrics: dict) -> dict:
    """Per region and overall: does the run meet the goal? (None where a mean Dice is undefined.)"""
    regions = {}
    for region, data in metrics["regions"].items():
        means = {m: data["methods"][m]["mean_dice"] for m in ORDER}
        if any(v is None for v in means.values()):
            regions[region] = {"met": None, "checks": {}, "means": means}
            continue
        checks = {
            "lorkd >= teacher": means["lorkd"] >= means["teacher"],
            "lorkd >= mtl": means["lorkd"] >= means["mtl"],
            "lorkd >= specialist - 0.01": means["lorkd"] >= means["specialist"] - SPECIALIST_MARGIN - _ROUNDING,
        }
        regions[region] = {"met": all(checks.values()), "checks": checks, "means": means}
    states = [r["met"] for r in regions.values()]
    overall = None if any(s is None for s in states) else all(states)
    return {"regions": regions, "met": overall}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def bar_chart(region: str, data: dict, names: dict[str, str], path: Path, smoke: bool) -> Path:
    """Grouped bars: Dice per class and the mean, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = [*data["classes"], "MEAN"]
    x = np.arange(len(classes))
    width = 0.8 / len(ORDER)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(classes) + 2), 4.2))
    for i, method in enumerate(ORDER):
        per_class = data["methods"][method]["dice"]
        values = [per_class[c] for c in data["classes"]] + [data["methods"][method]["mean_dice"]]
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(ORDER) - 1) / 2) * width, heights, width, label=names[method], color=COLORS[method])
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=40, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (test parts)")
    ax.axvline(len(classes) - 1.5, color="k", lw=0.5)
    title = f"{region}: Dice per class on the test parts"
    ax.set_title(title + (" (SMOKE RUN)" if smoke else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def render_markdown(metrics: dict, run: dict, charts: dict[str, str]) -> str:
    names = metrics["methods"]
    result = verdict(metrics)
    data_info = run["data"]
    lines: list[str] = []
    smoke = run["smoke"]
    lines.append(f"# LoRKD demo report — preset `{run['preset']}`{' (SMOKE RUN)' if smoke else ''}")
    lines.append("")
    if smoke:
        lines += [
            f"> **Smoke run.** {run['description']}. Read the numbers as a check that every stage works, not as a "
            "measurement of LoRKD.",
            "",
        ]
    lines += ["## Goal and verdict", "", f"Goal: {GOAL}", ""]
    status = {True: "**met**", False: "**not met**", None: "**cannot be judged** (a mean Dice is undefined)"}
    lines.append(f"This run: the goal is {status[result['met']]}.")
    lines.append("")
    header = ["region", "teacher", "LoRKD fused", "MTL", "specialist", "LoRKD ≥ teacher", "LoRKD ≥ MTL"]
    header += ["LoRKD ≥ specialist − 1", "met"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for region, r in result["regions"].items():
        checks = r["checks"]

        def mark(key: str, checks: dict = checks) -> str:
            return "–" if key not in checks else ("yes" if checks[key] else "no")

        lines.append(
            f"| {region} | " + " | ".join(_pct(r["means"][m]) for m in ORDER)
            + f" | {mark('lorkd >= teacher')} | {mark('lorkd >= mtl')} | {mark('lorkd >= specialist - 0.01')} | "
            + {True: "yes", False: "no", None: "–"}[r["met"]] + " |"
        )  # fmt: skip
    kd_source = (
        "its soft labels computed online on every training patch"
        if run["kd_mode"] == "online"
        else "its soft labels precomputed once per case and augmented with the patch"
    )
    lines += ["", "Mean Dice over the region's classes, in % (test parts only). Methods:", ""]
    lines += [
        "- **SAT-style teacher**: one text-prompted universal model (`nnUNetTrainerSATStyle`) trained on all regions; "
        "scored on each region's classes (argmax over background + those classes).",
        "- **LoRKD fused experts**: `nnUNetTrainerLoRKD` students (shared backbone + low-rank region experts), trained "
        f"with distillation from the teacher ({kd_source}), fused by `lorkd-fuse` into one plain "
        "nnU-Net per region and run by plain `nnUNetv2_predict -tr nnUNetTrainer`.",
        "- **MTL baseline**: the same network without experts (`nnUNetTrainerMTL`), all regions, the same "
        "partial-label loss, no distillation; scored on each region's classes like the teacher.",
        "- **nnU-Net specialists**: a plain `nnUNetTrainer` per region, trained on that region's dataset only.",
        "",
    ]
    lines += ["## Caveats", ""]
    for note in data_info.get("labels_notes", []):
        lines.append(f"- {note}")
    lines.append(f"- {SCANS_NOTE}")
    if data_info.get("skipped_regions"):
        for region, why in data_info["skipped_regions"].items():
            lines.append(f"- Region {region} was skipped: {why}")
    lines.append("")
    lines += ["## Dice and NSD per class", ""]
    lines.append(
        f"Dice and NSD (normalised surface Dice at {metrics['tolerance_mm']:g} mm) in %, computed over all test "
        "parts of the region together. `–`: the class has neither reference nor predicted voxels."
    )
    lines.append("")
    for region, data in metrics["regions"].items():
        lines += [f"### {region}", "", f"![{region}]({charts[region]})", ""]
        lines.append("| class | test voxels | " + " | ".join(f"{names[m]} Dice / NSD" for m in ORDER) + " |")
        lines.append("|---|---|" + "---|" * len(ORDER))
        for c in data["classes"]:
            cells = [f"{_pct(data['methods'][m]['dice'][c])} / {_pct(data['methods'][m]['nsd'][c])}" for m in ORDER]
            lines.append(f"| {c} | {data['test_voxels'][c]} | " + " | ".join(cells) + " |")
        cells = [f"**{_pct(data['methods'][m]['mean_dice'])} / {_pct(data['methods'][m]['mean_nsd'])}**" for m in ORDER]
        lines.append("| **mean** | | " + " | ".join(cells) + " |")
        lines.append("")
    params = metrics["parameters"]
    lines += ["## Parameters", "", "| model | parameters | what is deployed per region |", "|---|---|---|"]
    lines.append(f"| SAT-style teacher | {_millions(params['teacher']['total'])} | the whole model |")
    lorkd = params["lorkd"]
    fused = params["lorkd_fused"]
    lines.append(
        f"| LoRKD (stored: backbone + {len(fused)} experts) | {_millions(lorkd['total'])} "
        f"(experts {_millions(lorkd['experts'])}) | one fused model: "
        + ", ".join(f"{r} {_millions(n)}" for r, n in fused.items()) + " |"
    )  # fmt: skip
    lines.append(f"| MTL baseline | {_millions(params['mtl']['total'])} | the whole model |")
    spec = params["specialist"]
    lines.append(
        f"| nnU-Net specialists ({len(spec)} models) | {_millions(sum(spec.values()))} in total | "
        + ", ".join(f"{r} {_millions(n)}" for r, n in spec.items()) + " |"
    )  # fmt: skip
    lines += ["", "## Data and split", ""]
    lines.append(f"- Split: {data_info['split']['method']}.")
    lines.append(
        "- No test voxel is ever trained on: `lorkd-data` checks that every test part is separated from every "
        "training part of the same scan (all regions) by a gap."
    )
    parts = data_info["split"]["parts"]
    for region in metrics["regions"]:
        own = [p for p in parts if p["region"] == region]
        train = ", ".join(f"{p['z_mm'][0]:.0f}..{p['z_mm'][1]:.0f}" for p in own if p["split"] == "train")
        test = ", ".join(f"{p['z_mm'][0]:.0f}..{p['z_mm'][1]:.0f}" for p in own if p["split"] == "test")
        lines.append(
            f"- {region} ({metrics['regions'][region]['dataset']}): training z (mm) {train}; test z (mm) {test}."
        )
    lines += ["", "## Run", ""]
    lines.append(f"- Preset `{run['preset']}`: {run['description']}.")
    lines.append(
        f"- Configuration `{run['configuration']}`, plans `{run['plans']}`, {run['epochs']} epochs x "
        f"{run['iterations']} iterations per model (the teacher: {run['teacher_epochs']} epochs); trainers: "
        + ", ".join(f"`{t}`" for t in run["trainers"].values())
    )
    lines.append(f"- Machine: {run['machine']}.")
    last = run["runs"][-1]["wall_seconds"]
    lines.append(
        f"- Wall time of this invocation: {last / 60:.1f} min"
        + (
            f" (all invocations of this preset in this work folder: {run['wall_seconds_all_runs'] / 60:.1f} min)"
            if len(run["runs"]) > 1
            else ""
        )
        + "."
    )
    lines.append(f"- Work folder: `{run['work']}`; logs: `{run['logs']}`.")
    lines.append("")
    return "\n".join(lines)


def write_report(metrics: dict, run: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = {}
    for region, data in metrics["regions"].items():
        path = bar_chart(region, data, metrics["methods"], out_dir / f"{region}.png", run["smoke"])
        charts[region] = path.name
    text = render_markdown(metrics, run, charts)
    target = out_dir / "report.md"
    tmp = target.with_name(".report.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target
