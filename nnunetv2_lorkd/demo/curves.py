"""Learning curves of the demo's models, read from the logs nnU-Net stores in every checkpoint.

Every epoch nnU-Net computes a pseudo-Dice on a few validation batches. The demo's validation case is a
training case (the test parts are never looked at during training), so these curves measure how far each model
has fitted its training data after n iterations: the way to see whether a schedule is long enough without
tuning on the test parts. Per model and region the curve is the per-epoch mean pseudo-Dice over the region's
classes (the specialists: over their own classes; the multi-region models log it per region).

The end of a curve is called "still rising" when the mean of its last fifth of epochs is more than
``RISING_MARGIN`` above the mean of the fifth before, "not learning yet" when that mean is below
``LEARNING_FLOOR`` (a model that predicts background everywhere is flat too, but not done), otherwise "flat".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nnunetv2_lorkd.nnunet.runtime import REGION_DICE_KEY

RISING_MARGIN = 0.02
LEARNING_FLOOR = 0.05


def _finite_mean(values: list[float]) -> float | None:
    known = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(known)) if known else None


def region_curves(checkpoint: Path, regions: list[str], per_region: bool) -> dict[str, list[float | None]]:
    """Per region, the pseudo-Dice of every epoch. ``per_region``: the checkpoint logs one value per region
    (multi-region trainers); else it is a specialist of ``regions[0]`` and the curve is the mean over classes."""
    from nnunetv2_lorkd.fuse import load_checkpoint

    logging = load_checkpoint(str(checkpoint)).get("logging", {})
    if per_region:
        rows = logging.get(REGION_DICE_KEY)
        if rows is None:
            raise KeyError(f"{checkpoint} logs no {REGION_DICE_KEY}; was it trained by a LoRKD-plugin trainer?")
        return {r: [_finite_mean([row[i]]) for row in rows] for i, r in enumerate(regions)}
    rows = logging.get("dice_per_class_or_region", [])
    return {regions[0]: [_finite_mean(list(row)) for row in rows]}


def curve_end(curve: list[float | None]) -> dict:
    """Where a curve stands at the end: the last fifth's mean, the change from the fifth before, the verdict."""
    values = [v for v in curve if v is not None]
    if len(values) < 5:
        return {"final": _finite_mean(values[-1:]), "change": None, "state": "too short to judge"}
    k = max(1, len(values) // 5)
    last, before = float(np.mean(values[-k:])), float(np.mean(values[-2 * k : -k]))
    change = last - before
    if change > RISING_MARGIN:
        state = "still rising"
    elif last < LEARNING_FLOOR:
        state = "not learning yet"
    else:
        state = "flat"
    return {"final": last, "change": change, "state": state}


def plot_curves(curves: dict[str, dict[str, list[float | None]]], iterations_per_epoch: dict[str, int],
                names: dict[str, str], colors: dict[str, str], path: Path, title: str) -> Path:  # fmt: skip
    """One panel per region, one line per method: pseudo-Dice against training iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_lorkd.files import save_figure

    regions = sorted({r for per_method in curves.values() for r in per_method})
    fig, axes = plt.subplots(1, len(regions), figsize=(3.6 * len(regions), 3.2), squeeze=False)
    for ax, region in zip(axes[0], regions, strict=True):
        for method, per_region in curves.items():
            curve = per_region.get(region)
            if not curve:
                continue
            x = [(i + 1) * iterations_per_epoch[method] for i in range(len(curve))]
            y = [np.nan if v is None else v for v in curve]
            ax.plot(x, y, label=names.get(method, method), color=colors.get(method), lw=1.2)
        ax.set_title(region, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("training iterations", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("pseudo-Dice (training fit)", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=100)
