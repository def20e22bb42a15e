"""Per-task benchmark: teacher vs LoRKD experts (fused, exported) vs single-task students vs MTL student.

All students are the same light network and learn from the same frozen teacher with the same KD settings,
so the comparison isolates what the experts add: LoRKD = shared backbone + one low-rank expert per task
(deployed fused); MTL = shared backbone alone; single-task = one independent network per task.
LoRKD's numbers are measured on the exported per-task models after fusion, i.e. what would be deployed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classification.data import TaskData, assemble_split, check_unique_names, common_geometry
from ..classification.export import export_fused_models, load_exported
from ..classification.models import FrozenTeacher, MultiTaskClassifier, make_config
from ..classification.train import (
    TrainSettings,
    evaluate_plain,
    evaluate_split,
    save_checkpoint,
    settings_dict,
    train_model,
)
from ..files import write_json, write_text
from .common import cpu_model


def _machine(device: torch.device) -> str:
    """The short machine line of benchmark.md (what the training time depends on: device, cores, threads)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per model: per-task ACC/AUC, means, deployed and stored parameter counts, training time."""
    tasks = results["tasks"]
    header = ["model", "params / task (deployed)", "params stored (all tasks)"]
    header += [f"{t} {m}" for t in tasks for m in ("ACC", "AUC")] + ["mean ACC", "mean AUC", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["rows"]:
        cells = [row["model"], f"{row['params_deployed']:,}", f"{row['params_stored']:,}"]
        for t in tasks:
            cells += [_fmt(row["metrics"][t]["acc"]), _fmt(row["metrics"][t]["auc"])]
        cells += [_fmt(row["mean_acc"]), _fmt(row["mean_auc"]), f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _deployed(model: MultiTaskClassifier) -> int:
    return max(model.deployed_parameter_count(t) for t in range(len(model.heads)))


def _row(model: str, metrics: dict[str, dict], deployed: int, stored: int, seconds: float, note: str = "") -> dict:
    return {
        "model": model,
        "metrics": metrics,
        "mean_acc": float(np.nanmean([m["acc"] for m in metrics.values()])),
        "mean_auc": float(np.nanmean([m["auc"] for m in metrics.values()])),
        "params_deployed": deployed,
        "params_stored": stored,
        "train_seconds": seconds,
        "note": note,
    }


def run_benchmark(
    tasks: Sequence[TaskData],
    out_dir: str | Path,
    *,
    device: torch.device,
    teacher_epochs: int = 15,
    student_epochs: int = 20,
    seed: int = 0,
    rank: int = 2,
    alpha: float = 8.0,
    kd_weight: float = 1.0,
    kd_temperature: float = 4.0,
    batch_size: int = 128,
    progress: bool = False,
    log: Callable[[str], None] = print,
    data_note: str = "",
) -> dict[str, Any]:
    """Train the four kinds of model on `tasks`, evaluate each on the test splits, write benchmark.md.

    `data_note` (e.g. where the labels come from) is written at the top of the report."""
    out_dir = Path(out_dir)
    check_unique_names(tasks)
    channels, size = common_geometry(tasks)
    names = [t.name for t in tasks]
    task_specs = [(t.name, t.class_names) for t in tasks]
    base = TrainSettings(
        epochs=student_epochs,
        batch_size=batch_size,
        kd_weight=kd_weight,
        kd_temperature=kd_temperature,
        seed=seed,
        progress=progress,
    )
    start_all = time.perf_counter()
    sizes = ", ".join(f"{t.name}: {len(t.splits['train'])} train" for t in tasks)
    log(f"benchmark: {len(tasks)} tasks ({sizes}) on {device}")

    def fit(
        model: MultiTaskClassifier,
        name: str,
        data: Sequence[TaskData],
        settings: TrainSettings,
        teacher: FrozenTeacher | None,
    ) -> float:
        """Train on `data`'s train split (validating on its val split), save, return the seconds taken."""
        t0 = time.perf_counter()
        split = {s: assemble_split(data, s, channels, size) for s in ("train", "val")}
        history = train_model(
            model, split["train"], settings, device, teacher=teacher, val=split["val"], log=log, name=name
        )
        seconds = time.perf_counter() - t0
        kind = "teacher" if teacher is None else "student"
        save_checkpoint(out_dir / f"{name.replace(':', '_')}.pt", model, kind, history)
        return seconds

    def test_metrics(model: MultiTaskClassifier, data: Sequence[TaskData]) -> dict[str, dict]:
        return evaluate_split(model, assemble_split(data, "test", channels, size), device)

    rows = []
    teacher_model = MultiTaskClassifier(make_config(task_specs, channels, size, "teacher"))
    seconds = fit(
        teacher_model, "teacher", tasks, TrainSettings(**{**settings_dict(base), "epochs": teacher_epochs}), None
    )
    rows.append(
        _row(
            "teacher (larger ResNet, MTL, per-task heads)",
            test_metrics(teacher_model, tasks),
            _deployed(teacher_model),
            teacher_model.stored_parameter_count(),
            seconds,
        )
    )
    teacher = FrozenTeacher(teacher_model)

    # LoRKD: experts + KD; scored from the exported fused files, i.e. what is deployed
    lorkd = MultiTaskClassifier(make_config(task_specs, channels, size, "student", {"rank": rank, "alpha": alpha}))
    seconds = fit(lorkd, "lorkd", tasks, base, teacher)
    routed = test_metrics(lorkd, tasks)
    exported = export_fused_models(lorkd, out_dir / "fused")
    fused = {}
    for item in exported:
        module, meta = load_exported(item["path"])
        fused[meta["task"]] = evaluate_plain(module, tasks[names.index(meta["task"])], channels, size, device)
    note = (
        f"fused vs routed: max logit diff {max(e['max_abs_diff_vs_routed'] for e in exported):.2e}, "
        f"max ACC diff {max(abs(fused[n]['acc'] - routed[n]['acc']) for n in names):.3f}"
    )
    rows.append(
        _row(
            f"LoRKD student (experts r={rank}, fused)",
            fused,
            _deployed(lorkd),
            lorkd.stored_parameter_count(),
            seconds,
            note,
        )
    )

    # MTL: the same light network, shared backbone and per-task heads, no experts
    mtl = MultiTaskClassifier(make_config(task_specs, channels, size, "student"))
    seconds = fit(mtl, "mtl", tasks, base, teacher)
    rows.append(
        _row(
            "MTL student (no experts)", test_metrics(mtl, tasks), _deployed(mtl), mtl.stored_parameter_count(), seconds
        )
    )

    # single-task students: one light network per task, each distilled from the teacher's head of its task
    single_metrics, single_params, seconds = {}, [], 0.0
    for task in tasks:
        model = MultiTaskClassifier(make_config([(task.name, task.class_names)], channels, size, "student"))
        seconds += fit(model, f"single:{task.name}", [task], base, teacher)
        single_metrics.update(test_metrics(model, [task]))
        single_params.append(model.stored_parameter_count())
    rows.append(
        _row("single-task students (one net per task)", single_metrics, max(single_params), sum(single_params), seconds)
    )

    results = {
        "tasks": names,
        "test_sizes": {t.name: len(t.splits["test"]) for t in tasks},
        "machine": _machine(device),
        "device": str(device),
        "settings": {**settings_dict(base), "teacher_epochs": teacher_epochs, "rank": rank, "alpha": alpha},
        "rows": rows,
        "total_seconds": time.perf_counter() - start_all,
        "data_note": data_note,
    }
    table = markdown_table(results)
    notes = "\n".join(f"- {r['model']}: {r['note']}" for r in rows if r["note"])
    write_json(out_dir / "benchmark.json", results)
    write_text(
        out_dir / "benchmark.md",
        (f"{data_note}\n\n" if data_note else "")
        + f"Machine: {results['machine']}; total {results['total_seconds']:.0f} s; seed {seed}; "
        f"test images per task: {results['test_sizes']}\n\n{table}\n\n{notes}\n",
    )
    log(table)
    return results
