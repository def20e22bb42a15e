"""A small KD-weight ablation on a preprocessed LoRKD dataset: train nnUNetTrainerLoRKD once per weight lambda
(0 = no KD) and seed, with the same short schedule, and compare the final per-region validation Dice.

``python -m nnunetv2_lorkd.benchmarks.kd_ablation -d DATASET -c CONFIGURATION [--weights 0 0.5 1 2]
    [--temperature 1] [--seeds 0 1] [--epochs 5] [--iterations 20]``

The teacher and the mode come from the configuration's entry in lorkd_kd.json (``lorkd-kd set`` first, and
``lorkd-kd cache`` for mode cached); only the weight (and optionally the temperature) changes between runs.
Runs in-process on the CPU or GPU (``--device``); lorkd_kd.json is rewritten for every run and restored at the
end. Results go to a JSON file and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..files import read_json, write_json
from ..kd.cli import load_student
from ..kd.config import KDConfigError, KDSettings, config_path, remove_settings, settings_for, write_settings


def _trainer_class(name: str, epochs: int, iterations: int, val_iterations: int) -> type:
    """nnUNetTrainerLoRKD with the short schedule; a distinct class name per run gives each its own output folder."""
    from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")) -> None:
        nnUNetTrainerLoRKD.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = val_iterations

    return type(name, (nnUNetTrainerLoRKD,), {"__init__": __init__, "__module__": __name__})


def run_one(dataset: str, configuration: str, plans_name: str, base: KDSettings, weight: float, seed: int,
            args: argparse.Namespace) -> dict:  # fmt: skip
    """Train and validate one (weight, seed) run; lorkd_kd.json holds this run's weight while it trains."""
    student = load_student(dataset, configuration, plans_name)
    if weight == 0:
        remove_settings(student.folder, configuration)
    else:
        temperature = args.temperature if args.temperature is not None else base.temperature
        settings = KDSettings(plans_name, base.teacher, base.mode, weight, temperature, base.teacher_exclusive)
        write_settings(student.folder, configuration, settings)
    tag = f"{args.tag}w{weight:g}".replace(".", "p") + f"_s{seed}"
    cls = _trainer_class(f"nnUNetTrainerLoRKD_kdablation_{tag}", args.epochs, args.iterations, args.val_iterations)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    plans = copy.deepcopy(student.plans)
    plans["continue_training"] = False
    trainer = cls(plans, configuration, args.fold, copy.deepcopy(student.dataset_json), torch.device(args.device))
    start = time.perf_counter()
    trainer.run_training()
    trainer.inference_allowed_mirroring_axes = None if args.no_mirroring else trainer.inference_allowed_mirroring_axes
    trainer.perform_actual_validation()
    seconds = time.perf_counter() - start
    regions = read_json(os.path.join(trainer.output_folder, "validation", "summary_lorkd_regions.json"), RuntimeError)
    log = trainer.logger.local_logger.my_fantastic_logging
    return {
        "weight": weight,
        "seed": seed,
        "seconds": seconds,
        "dice_per_region": {name: r["mean_dice"] for name, r in regions.items()},
        "mean_dice": float(np.mean([r["mean_dice"] for r in regions.values()])),
        "final_train_seg_loss": float(log["lorkd_seg_loss"][-1]),
        "final_kd_loss": float(log["lorkd_kd_loss"][-1]),
        "output_folder": trainer.output_folder,
    }


def table(results: Sequence[dict]) -> str:
    """Per-region Dice per weight, averaged over seeds, with the seed spread that decides what differs."""
    weights = sorted({r["weight"] for r in results})
    regions = sorted({n for r in results for n in r["dice_per_region"]})
    lines = [
        "| lambda | " + " | ".join(regions) + " | mean Dice (± sd over seeds) | runs |",
        "|---:|" + "---:|" * len(regions) + "---:|---:|",
    ]
    for w in weights:
        rows = [r for r in results if r["weight"] == w]
        per_region = [np.mean([r["dice_per_region"].get(n, np.nan) for r in rows]) for n in regions]
        means = [r["mean_dice"] for r in rows]
        sd = np.std(means, ddof=1) if len(means) > 1 else 0.0
        lines.append(f"| {w:g} | " + " | ".join(f"{v:.4f}" for v in per_region)
                     + f" | {np.mean(means):.4f} ± {sd:.4f} | {len(rows)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (seed, weight), print the table; lorkd_kd.json is restored even when a run fails."""
    prog = "python -m nnunetv2_lorkd.benchmarks.kd_ablation"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--temperature", type=float, default=None, help="default: the one in lorkd_kd.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--no-mirroring", action="store_true", help="final validation without test-time mirroring")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="kd_ablation.json")
    parser.add_argument("--tag", default="", help="prefix of the runs' trainer (output folder) names")
    args = parser.parse_args(argv)

    student = load_student(args.d, args.c, args.p)
    base = settings_for(student.folder, args.c, args.p)
    if base is None:
        raise KDConfigError(
            f"no KD settings for {args.c}: run `lorkd-kd set -d {args.d} -c {args.c} --teacher ...` first"
        )
    path = config_path(student.folder)
    original = read_json(path, KDConfigError)
    results = []
    try:
        for seed in args.seeds:
            for weight in args.weights:
                result = run_one(args.d, args.c, args.p, base, weight, seed, args)
                results.append(result)
                print(f"lambda {weight:g} seed {seed}: mean Dice {result['mean_dice']:.4f} "
                      f"{result['dice_per_region']} ({result['seconds']:.0f} s)", flush=True)  # fmt: skip
                write_json(args.out, results)
    finally:
        write_json(path, original)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
