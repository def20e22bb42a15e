"""Fusion into plain per-task models, saved so that they load with torch alone.

Format: one ``<task>.pt2`` per task, a ``torch.export`` ExportedProgram (graph + weights, no Python classes
of ours are referenced), with the task's metadata as an extra file ``meta.json``; the same metadata is
written beside it as ``<task>.json``. Loading needs only torch::

    import torch
    model = torch.export.load("organa_ts.pt2").module()
    logits = model(images_uint8_as_float)      # (B, C, H, W), values 0..255

(torch.jit.script would also work but is deprecated in this torch; torch.export is its replacement.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_path, write_json
from .models import MultiTaskClassifier, PlainTaskClassifier, fuse_task

META_NAME = "meta.json"


def fusion_max_abs_diff(model: MultiTaskClassifier, plain: PlainTaskClassifier, task: int, x: torch.Tensor) -> float:
    """max |routed(x, task) - fused(x)| in eval mode: fusion must not change what the model computes."""
    model.eval()
    plain.eval()
    with torch.no_grad():
        return float((model.task_logits(x, task) - plain(x)).abs().max())


def export_plain_model(plain: PlainTaskClassifier, path: str | Path, meta: dict[str, Any]) -> Path:
    """torch.export the plain model (dynamic batch size) and save it atomically with its metadata."""
    plain = plain.eval().cpu()
    channels = int(meta["in_channels"])
    size = int(meta["image_size"])
    example = torch.rand(2, channels, size, size) * 255
    program = torch.export.export(
        plain, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}
    )
    path = Path(path)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(program, tmp, extra_files={META_NAME: json.dumps(meta)})
    write_json(path.with_suffix(".json"), meta)
    return path


def export_fused_models(
    model: MultiTaskClassifier, out_dir: str | Path, tasks: list[str] | None = None, tolerance: float = 1e-4
) -> list[dict[str, Any]]:
    """Fuse and export every (or the named) task; checks routed == fused on random images before writing."""
    out_dir = Path(out_dir)
    names = tasks or model.task_names
    unknown = [n for n in names if n not in model.task_names]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; this model has {', '.join(model.task_names)}")
    cfg = model.config
    results = []
    probe = torch.rand(8, cfg["arch"]["in_channels"], cfg["image_size"], cfg["image_size"]) * 255
    model = copy.deepcopy(model).cpu().eval()  # export on CPU; the caller's model keeps its device and mode
    for name in names:
        t = model.task_names.index(name)
        plain = fuse_task(model, t).eval()
        diff = fusion_max_abs_diff(model, plain, t, probe)
        if diff > tolerance:
            raise RuntimeError(f"fused model for '{name}' differs from the routed model by {diff:.3g} (> {tolerance})")
        meta = {
            "task": name,
            "class_names": cfg["tasks"][t]["class_names"],
            "in_channels": cfg["arch"]["in_channels"],
            "image_size": cfg["image_size"],
            "input": "float tensor (B, C, H, W) with pixel values 0..255 (uint8 range); grey images use C=1",
            "output": "logits (B, num_classes); softmax for probabilities",
            "parameters": sum(p.numel() for p in plain.parameters()),
            "fused_from_experts": model.has_experts,
            "max_abs_diff_vs_routed": diff,
            "load_with": "torch.export.load(path).module()",
        }
        path = export_plain_model(plain, out_dir / f"{name}.pt2", meta)
        results.append({"task": name, "path": str(path), **meta})
    return results


def load_exported(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(module, metadata) of an exported per-task model; uses only torch."""
    extra = {META_NAME: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[META_NAME])
