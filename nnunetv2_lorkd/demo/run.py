"""``lorkd-demo``: the whole LoRKD story on real scans, driven through the real commands.

Stages (each skipped when its outputs exist, so an interrupted run resumes; ``--redo STAGE`` deletes a stage's
outputs and those of every later stage first):

1. ``data``        ``lorkd-data``: one nnU-Net raw dataset per region + the merged LoRKD dataset
2. ``plan``        ``nnUNetv2_extract_fingerprint`` / ``nnUNetv2_plan_experiment`` / ``nnUNetv2_preprocess``
                   (the CPU presets write a smaller network into their own plans, e.g. ``nnUNetPlansDemoCPU``)
3. ``mtl``         ``nnUNetv2_train MERGED -tr nnUNetTrainerMTL_<suffix>`` (baseline: no experts, no distillation)
4. ``specialists`` ``nnUNetv2_train REGION -tr nnUNetTrainer_<suffix>`` for every region
5. ``teacher``     ``nnUNetv2_train MERGED -tr nnUNetTrainerSATStyle_<suffix>`` (the SAT-style foundation model)
6. ``kd``          ``lorkd-kd set`` (+ ``lorkd-kd cache`` in cached mode): the teacher becomes the distillation source
7. ``lorkd``       ``nnUNetv2_train MERGED -tr nnUNetTrainerLoRKD_<suffix>`` (students with KD)
8. ``fuse``        ``lorkd-fuse --region all``: one vanilla nnU-Net model per region
9. ``predict``     ``nnUNetv2_predict`` on every region's test parts: fused experts (``-tr nnUNetTrainer -p
                   <plans>_<region>``), specialists, and teacher and MTL (with probabilities)
10. ``evaluate``   Dice and NSD per class and region (:mod:`.metrics`)
11. ``report``     markdown + one PNG bar chart per region (:mod:`.report`)

All nnU-Net folders live in the work folder (``--work``, default ``./lorkd_work``): ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` are shared by the presets (plans and trainer names differ);
predictions, logs, metrics and the report go to ``<work>/<preset>/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_lorkd.data.build import DEFAULT_BASE_ID, MANIFEST, merged_dataset_name, region_dataset_name
from nnunetv2_lorkd.files import write_json

from .presets import BASE_TRAINERS, SEED_VARIABLE, Preset, get_preset

BIN = Path(sys.executable).parent
# our own commands, run as `python -m MODULE` (the same entry points as the console scripts, which an editable
# checkout only has after a reinstall)
TOOLS = {
    "lorkd-data": "nnunetv2_lorkd.data.build",
    "lorkd-kd": "nnunetv2_lorkd.kd.cli",
    "lorkd-fuse": "nnunetv2_lorkd.fuse",
}
STAGES = (
    "data",
    "plan",
    "specialists",
    "teacher",
    "mtl",
    "kd",
    "lorkd",
    "fuse",
    "predict",
    "evaluate",
    "report",
)
FOLD = 0


class DemoError(RuntimeError):
    """A stage failed or cannot start; the message says which command, where its log is, and what to do."""


def tool(name: str) -> list[str]:
    return [sys.executable, "-m", TOOLS[name]]


def _fmt(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60:02d}:{seconds % 60:02d}"
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ progress
@dataclass
class Progress:
    """Stage, step, elapsed and estimated time left, printed as one line per event.

    The estimate weighs the stages by their expected share of the work (a training run counts 1). Training
    stages and the other stages are timed separately: once a stage of a kind has finished, the remaining
    stages of that kind are estimated from its measured seconds per unit of weight, before that from a prior.
    """

    weights: dict[str, float]
    prior_seconds_per_unit: float
    out: Callable[[str], None] = print
    start: float = field(default_factory=lambda: time.perf_counter())
    current: str = ""
    current_fraction: float = 0.0

    TRAINING = ("teacher", "mtl", "lorkd", "specialists")

    def __post_init__(self) -> None:
        self._finished: set[str] = set()
        self._stage_start = time.perf_counter()
        self._done = {True: [0.0, 0.0], False: [0.0, 0.0]}  # training? -> [weight, seconds]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _rate(self, stage: str) -> float:
        weight, seconds = self._done[stage in self.TRAINING]
        return seconds / weight if weight > 0.05 and seconds > 1 else self.prior_seconds_per_unit

    def left(self) -> float:
        total = 0.0
        for stage, weight in self.weights.items():
            if stage in self._finished:
                continue
            share = 1.0 - (self.current_fraction if stage == self.current else 0.0)
            total += weight * share * self._rate(stage)
        return total

    def line(self, text: str) -> None:
        self.out(f"[lorkd-demo {_fmt(self.elapsed())} elapsed, ~{_fmt(self.left())} left] {text}")

    def begin(self, stage: str, text: str) -> None:
        self.current, self.current_fraction = stage, 0.0
        self._stage_start = time.perf_counter()
        index = list(self.weights).index(stage) + 1
        self.line(f"stage {index}/{len(self.weights)} {stage}: {text}")

    def step(self, text: str, fraction: float | None = None) -> None:
        if fraction is not None:
            self.current_fraction = min(1.0, max(0.0, fraction))
        self.line(f"  {self.current}: {text}")

    def finish(self, stage: str, skipped: bool = False) -> None:
        seconds = time.perf_counter() - self._stage_start
        self._finished.add(stage)
        if not skipped:
            done = self._done[stage in self.TRAINING]
            done[0] += self.weights.get(stage, 0.0)
            done[1] += seconds
        self.current, self.current_fraction = "", 0.0
        self.line(f"  {stage}: {'already done, skipped' if skipped else f'done in {_fmt(seconds)}'}")


# ------------------------------------------------------------------------------------------------ the demo
@dataclass
class Demo:
    preset: Preset
    work: Path
    regions: tuple[str, ...]
    base_id: int = DEFAULT_BASE_ID
    cache_dir: str | None = None
    processes: int = 1
    kd_weight: float | None = None
    kd_temperature: float | None = None
    seed: int = 0
    out: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.work = self.work.resolve()
        self.raw = self.work / "nnUNet_raw"
        self.preprocessed = self.work / "nnUNet_preprocessed"
        # seed 0 keeps the single-run layout; every further seed trains its own models beside it (data, plans
        # and preprocessed data are shared: only what a seed changes is repeated)
        self.results = self.work / ("nnUNet_results" if self.seed == 0 else f"nnUNet_results_seed{self.seed}")
        self.run_dir = self.work / (self.preset.name if self.seed == 0 else f"{self.preset.name}_seed{self.seed}")
        self.logs = self.run_dir / "logs"
        self.predictions = self.run_dir / "predictions"
        self.report_dir = self.run_dir / "report"
        self.state = self.run_dir / "state"
        self.merged = merged_dataset_name(self.base_id)
        self.region_datasets = {
            r: region_dataset_name(self.base_id, i, r) for i, r in enumerate(self.regions)
        }  # lorkd-data numbers regions by their position in --regions
        n = len(self.regions)
        # relative stage costs, from the cpu-preset run of docs/demo.md on 2 cores (MTL training = 1, 174 s); the
        # estimate rescales them with the measured speed as the run goes
        weights = {
            "data": 0.03,
            "plan": 0.6,
            "specialists": 0.5 * n,
            "teacher": 1.2 * self.preset.teacher_epochs / self.preset.epochs,
            "mtl": 1.0,
            "kd": 0.3 if self.preset.kd_mode == "cached" else 0.05,
            "lorkd": 1.85,
            "fuse": 0.05,
            "predict": 0.15 * n + 0.3,
            "evaluate": 0.02,
            "report": 0.02,
        }
        prior = {"cpu": 174.0, "cpu-full": 522.0, "tiny": 40.0, "gpu": 1500.0}.get(self.preset.name, 100.0)
        self.progress = Progress(weights, prior, out=self.out)

    # ------------------------------------------------------------------------------------------ helpers
    def env(self, training: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            nnUNet_raw=str(self.raw),
            nnUNet_preprocessed=str(self.preprocessed),
            nnUNet_results=str(self.results),
            nnUNet_def_n_proc=str(self.processes),
        )
        env[SEED_VARIABLE] = str(self.seed)
        if training and self.preset.device == "cpu":  # (0 would break the planner: training commands only)
            env["nnUNet_n_proc_DA"] = "0"
        elif not training and env.get("nnUNet_n_proc_DA") == "0":
            # the user's CPU setting: nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA) and
            # fails at 0; only training reads the variable for real
            del env["nnUNet_n_proc_DA"]
        return env

    def trainer(self, base: str) -> str:
        return self.preset.trainer(base)

    def model_folder(self, dataset: str, base: str, plans: str | None = None) -> Path:
        return (
            self.results / dataset / f"{self.trainer(base)}__{plans or self.preset.plans}__{self.preset.configuration}"
        )

    def fused_folder(self, region: str) -> Path:
        name = f"nnUNetTrainer__{self.preset.plans}_{region}__{self.preset.configuration}"
        return self.results / self.merged / name

    def run(
        self, name: str, args: Sequence[str], watch: Callable[[str], None] | None = None, training: bool = False
    ) -> None:
        """Run one command, its output into logs/<name>.log; `watch` sees every output line."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        command = [str(a) for a in args]
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    command,
                    env=self.env(training),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                    cwd=self.run_dir,
                )
            except OSError as error:
                raise DemoError(f"cannot start {command[0]}: {error}") from None
            assert proc.stdout is not None
            try:
                for raw_line in proc.stdout:
                    log.write(raw_line)
                    log.flush()  # `tail -f` on the log follows the command live
                    if watch is not None:
                        for line in raw_line.replace("\r", "\n").splitlines():
                            watch(line)
                code = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: do not leave the command running on its own
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        if code != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise DemoError(f"`{' '.join(command)}` failed (exit {code}); full log: {log_path}\n" + "\n".join(tail))

    def trained(self, dataset: str, base: str) -> bool:
        folder = self.model_folder(dataset, base) / f"fold_{FOLD}"
        return (folder / "checkpoint_final.pth").is_file() and (
            not self.preset.final_validation or (folder / "validation" / "summary.json").is_file()
        )

    def _train(
        self,
        dataset: str,
        base: str,
        label: str,
        fraction: tuple[float, float] = (0.0, 1.0),
        pretrained: Path | None = None,
    ) -> None:
        """nnUNetv2_train with progress per epoch; resumes from checkpoint_latest; re-runs only the final
        validation when training finished but validation did not. ``pretrained``: a checkpoint the model starts
        from (nnU-Net's ``-pretrained_weights``; only for a fresh start, as nnU-Net allows)."""
        folder = self.model_folder(dataset, base) / f"fold_{FOLD}"
        if self.trained(dataset, base):
            self.progress.step(f"{label}: already trained", fraction[1])
            return
        args = [BIN / "nnUNetv2_train", dataset, self.preset.configuration, str(FOLD), "-tr", self.trainer(base),
                "-p", self.preset.plans, "-device", self.preset.device]  # fmt: skip
        if (folder / "checkpoint_final.pth").is_file():
            args.append("--val")
            self.progress.step(f"{label}: trained; running the final validation only")
        elif (folder / "checkpoint_latest.pth").is_file():
            args.append("--c")
            self.progress.step(f"{label}: resuming from checkpoint_latest.pth")
        elif pretrained is not None:
            if not pretrained.is_file():
                raise DemoError(f"{label} starts from {pretrained}, which does not exist; run the stage that makes it")
            args += ["-pretrained_weights", str(pretrained)]
            self.progress.step(f"{label}: starts from {pretrained}")
        epochs = self.preset.teacher_epochs if base == "nnUNetTrainerSATStyle" else self.preset.epochs
        lo, hi = fraction

        state = {"epoch": 0}

        def watch(line: str) -> None:
            started = re.search(r": Epoch (\d+)$", line)
            if started:
                state["epoch"] = int(started.group(1))
                return
            timed = re.search(r"Epoch time: ([\d.]+) s", line)
            if timed:
                done = state["epoch"] + 1
                self.progress.step(
                    f"{label}: epoch {done}/{epochs} ({float(timed.group(1)):.1f} s/epoch)",
                    lo + (hi - lo) * 0.9 * done / epochs,
                )
            elif re.search(r": predicting \S+$", line):
                self.progress.step(f"{label}: final validation, {line.rsplit(' ', 1)[1]}")

        self.progress.step(
            f"{label}: nnUNetv2_train {dataset} {self.preset.configuration} {FOLD} -tr {self.trainer(base)}"
        )
        self.run(f"train_{base}_{dataset}", args, watch, training=True)

    # ------------------------------------------------------------------------------------------- stages
    def check_trainers(self) -> None:
        """Every demo trainer class must exist before anything runs (no silently skipped model)."""
        from nnunetv2_lorkd_trainers import demo as demo_trainers

        missing = [self.trainer(b) for b in BASE_TRAINERS if not hasattr(demo_trainers, self.trainer(b))]
        if missing:
            raise DemoError(
                f"trainer(s) {missing} are not available: their base trainer modules (trainers/sat_style.py for "
                "nnUNetTrainerSATStyle, trainers/mtl.py for nnUNetTrainerMTL) are missing from this install"
            )
        if self.preset.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise DemoError("--preset gpu needs a CUDA GPU, and torch sees none; run --preset cpu instead")

    def stage_data(self) -> None:
        self.progress.begin("data", f"lorkd-data: regions {', '.join(self.regions)}")
        args = [*tool("lorkd-data"), "--raw", self.raw, "--regions", *self.regions, "--base-id", str(self.base_id)]
        if self.cache_dir:
            args += ["--cache-dir", self.cache_dir]
        self.run("data", args, lambda line: self.progress.step(line[13:]) if line.startswith("[lorkd-data]") else None)
        self.progress.finish("data")
        self.adopt_manifest()

    def adopt_manifest(self) -> None:
        """The regions lorkd-data actually built: an optional region whose data cannot be downloaded here (brain,
        via apt) is left out, loudly; any other difference is an error."""
        manifest = json.loads((self.raw / MANIFEST).read_text())
        skipped = manifest.get("skipped_regions", {})
        for region, why in skipped.items():
            self.out(f"[lorkd-demo] NOTE: the optional region {region} is left out of this run: {why}")
        expected = [r for r in self.regions if r not in skipped]
        if manifest["regions"] != expected or manifest.get("merged") != self.merged:
            raise DemoError(
                f"lorkd-data built regions {manifest['regions']} ({manifest.get('merged')}), not {expected} "
                f"({self.merged}); see {self.logs / 'data.log'}"
            )
        self.regions = tuple(manifest["regions"])
        self.region_datasets = dict(manifest["datasets"])

    def _dataset_ids(self) -> list[str]:
        return [self.merged[7:10], *(name[7:10] for name in self.region_datasets.values())]

    def _all_datasets(self) -> list[str]:
        return [self.merged, *self.region_datasets.values()]

    def _preprocessed_complete(self, dataset: str) -> bool:
        plans_file = self.preprocessed / dataset / f"{self.preset.plans}.json"
        if not plans_file.is_file():
            return False
        plans = json.loads(plans_file.read_text())
        identifier = plans["configurations"][self.preset.configuration]["data_identifier"]
        folder = self.preprocessed / dataset / identifier
        raw_json = json.loads((self.raw / dataset / "dataset.json").read_text())
        wanted = raw_json.get("numTraining", 0)
        return folder.is_dir() and len([p for p in folder.iterdir() if p.name.endswith(".pkl")]) >= wanted > 0

    def stage_plan(self) -> bool:
        datasets = self._all_datasets()
        planned = all((self.preprocessed / d / "nnUNetPlans.json").is_file() for d in datasets)
        if planned and self.preset.small_network is not None:
            for dataset in datasets:  # cheap, and keeps the plans in step with the preset
                write_small_plans(self.preprocessed / dataset, self.preset)
        if planned and all(self._preprocessed_complete(d) for d in datasets):
            self._check_splits()
            return False
        self.progress.begin("plan", f"fingerprint, plan and preprocess {len(datasets)} datasets")
        ids = self._dataset_ids()
        todo = [i for i, d in zip(ids, datasets, strict=True)
                if not (self.preprocessed / d / "dataset_fingerprint.json").is_file()]  # fmt: skip
        if todo:
            self.progress.step(f"nnUNetv2_extract_fingerprint -d {' '.join(todo)}", 0.1)
            self.run("plan", [BIN / "nnUNetv2_extract_fingerprint", "-d", *todo, "-np", str(self.processes)])
        todo = [i for i, d in zip(ids, datasets, strict=True)
                if not (self.preprocessed / d / "nnUNetPlans.json").is_file()]  # fmt: skip
        if todo:
            self.progress.step(f"nnUNetv2_plan_experiment -d {' '.join(todo)}", 0.3)
            self.run("plan", [BIN / "nnUNetv2_plan_experiment", "-d", *todo])
        small = self.preset.small_network
        if small is not None:
            for dataset in datasets:
                write_small_plans(self.preprocessed / dataset, self.preset)
            self.progress.step(f"wrote {self.preset.plans}.json (features <= {small.max_features}, batch <= "
                               f"{small.max_batch}, patch <= {small.max_patch})", 0.35)  # fmt: skip
        self.progress.step(f"nnUNetv2_preprocess -plans_name {self.preset.plans} -c {self.preset.configuration}", 0.4)
        self.run(
            "plan",
            [BIN / "nnUNetv2_preprocess", "-d", *ids, "-plans_name", self.preset.plans, "-c",
             self.preset.configuration, "-np", str(self.processes)],
        )  # fmt: skip
        missing = [d for d in datasets if not self._preprocessed_complete(d)]
        if missing:
            raise DemoError(f"preprocessing left {missing} incomplete; see {self.logs / 'plan.log'}")
        self._check_splits()
        self.progress.finish("plan")
        return True

    def _check_splits(self) -> None:
        """nnU-Net trains fold 0 of the preprocessed splits_final.json: it must be the split lorkd-data wrote."""
        for dataset in self._all_datasets():
            raw_splits = json.loads((self.raw / dataset / "splits_final.json").read_text())
            target = self.preprocessed / dataset / "splits_final.json"
            if not target.is_file() or json.loads(target.read_text()) != raw_splits:
                target.write_text(json.dumps(raw_splits, indent=2) + "\n")

    def teacher_checkpoint(self) -> Path:
        return self.model_folder(self.merged, "nnUNetTrainerSATStyle") / f"fold_{FOLD}" / "checkpoint_final.pth"

    def stage_train(self, stage: str, base: str, label: str) -> bool:
        if self.trained(self.merged, base):
            return False
        self.progress.begin(stage, f"{label} on {self.merged}")
        # LoRKD decomposes a trained foundation model: the students (and, for a like-for-like baseline, the MTL
        # model) start from the teacher's backbone; the experts start at zero
        from_teacher = self.preset.students_from_teacher and stage in ("lorkd", "mtl")
        self._train(self.merged, base, label, pretrained=self.teacher_checkpoint() if from_teacher else None)
        self.progress.finish(stage)
        return True

    def _kd_args(self) -> list[str]:
        return ["-d", self.merged, "-c", self.preset.configuration, "-p", self.preset.plans]

    def stage_mtl(self) -> bool:
        if self.trained(self.merged, "nnUNetTrainerMTL"):
            return False
        from nnunetv2_lorkd.kd.config import settings_for

        if settings_for(str(self.preprocessed / self.merged), self.preset.configuration, self.preset.plans):
            self.progress.step("the MTL baseline trains without distillation: lorkd-kd off")
            self.run("kd", [*tool("lorkd-kd"), "off", "-d", self.merged, "-c", self.preset.configuration])
        return self.stage_train("mtl", "nnUNetTrainerMTL", "MTL baseline (no experts, no distillation)")

    def stage_kd(self) -> bool:
        lorkd = self.model_folder(self.merged, "nnUNetTrainerLoRKD") / f"fold_{FOLD}" / "checkpoint_final.pth"
        marker = self.state / "kd.json"
        teacher = self.model_folder(self.merged, "nnUNetTrainerSATStyle")
        wanted = {"teacher": str(teacher), "mode": self.preset.kd_mode}
        from nnunetv2_lorkd.kd.config import settings_for

        # the KD settings live in the preprocessed folder, which every seed and preset of this work folder shares:
        # skip only when they still name this run's teacher
        current = settings_for(str(self.preprocessed / self.merged), self.preset.configuration, self.preset.plans)
        same_teacher = current is not None and Path(current.teacher.model_folder).resolve() == teacher.resolve()
        if lorkd.is_file() or (same_teacher and marker.is_file() and json.loads(marker.read_text()) == wanted):
            return False
        self.progress.begin("kd", f"the SAT-style teacher as distillation source ({self.preset.kd_mode})")
        args = [*tool("lorkd-kd"), "set", *self._kd_args(), "--teacher", teacher, "--teacher-fold", str(FOLD),
                "--mode", self.preset.kd_mode, "--device", self.preset.device]  # fmt: skip
        if self.kd_weight is not None:
            args += ["--weight", repr(self.kd_weight)]
        if self.kd_temperature is not None:
            args += ["--temperature", repr(self.kd_temperature)]
        self.progress.step("lorkd-kd set", 0.1)
        self.run("kd", args)
        if self.preset.kd_mode == "cached":
            self.progress.step("lorkd-kd cache (teacher soft labels of every training case)", 0.3)
            self.run("kd", [*tool("lorkd-kd"), "cache", *self._kd_args(), "--device", self.preset.device,
                            "-np", "1"])  # fmt: skip
        self.state.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(wanted) + "\n")
        self.progress.finish("kd")
        return True

    def stage_specialists(self) -> bool:
        if all(self.trained(d, "nnUNetTrainer") for d in self.region_datasets.values()):
            return False
        self.progress.begin("specialists", f"one plain nnU-Net per region ({len(self.regions)})")
        n = len(self.regions)
        for i, (region, dataset) in enumerate(self.region_datasets.items()):
            self._train(dataset, "nnUNetTrainer", f"specialist {region} ({i + 1}/{n})", (i / n, (i + 1) / n))
        self.progress.finish("specialists")
        return True

    def stage_fuse(self) -> bool:
        if all((self.fused_folder(r) / f"fold_{FOLD}" / "checkpoint_final.pth").is_file() for r in self.regions):
            return False
        self.progress.begin("fuse", "lorkd-fuse --region all --verify")
        self.run("fuse", [*tool("lorkd-fuse"), "-d", self.merged, "-c", self.preset.configuration, "-tr",
                          self.trainer("nnUNetTrainerLoRKD"), "-p", self.preset.plans, "--region", "all", "--verify",
                          "--overwrite"],
                 lambda line: self.progress.step(line) if line.startswith(("verify", "region")) else None)  # fmt: skip
        self.progress.finish("fuse")
        return True

    # predictions: method -> region -> folder
    def test_cases(self, region: str) -> list[str]:
        info = json.loads((self.raw / self.region_datasets[region] / "lorkd_data.json").read_text())
        return list(info["test_cases"])

    def prediction_folder(self, method: str, region: str | None = None) -> Path:
        return self.predictions / method / (region or "all")

    def _predicted(self, folder: Path, cases: Sequence[str], probabilities: bool) -> bool:
        return all((folder / f"{c}.nii.gz").is_file() and (not probabilities or (folder / f"{c}.npz").is_file())
                   for c in cases)  # fmt: skip

    def _predict(self, label: str, inputs: Path, output: Path, cases: Sequence[str], model: list[str],
                 probabilities: bool, fraction: float) -> None:  # fmt: skip
        if self._predicted(output, cases, probabilities):
            return
        args = [BIN / "nnUNetv2_predict", "-i", inputs, "-o", output, *model, "-f", str(FOLD), "-c",
                self.preset.configuration, "-device", self.preset.device, "-npp", "1", "-nps", "1",
                "--continue_prediction"]  # fmt: skip
        if not self.preset.tta:
            args.append("--disable_tta")
        if probabilities:
            args.append("--save_probabilities")
        self.progress.step(
            f"{label}: nnUNetv2_predict {' '.join(str(a) for a in model)} ({len(cases)} cases)", fraction
        )
        self.run(
            "predict",
            args,
            lambda line: self.progress.step(f"{label}: {line}") if line.startswith("done with") else None,
        )
        if not self._predicted(output, cases, probabilities):
            raise DemoError(f"nnUNetv2_predict wrote no prediction for some of {list(cases)} in {output}")

    def stage_predict(self) -> bool:
        all_cases = [c for r in self.regions for c in self.test_cases(r)]
        folders = [(self.prediction_folder(m), all_cases, True) for m in ("teacher", "mtl")]
        folders += [(self.prediction_folder(m, r), self.test_cases(r), False) for m in ("lorkd", "specialist")
                    for r in self.regions]  # fmt: skip
        if all(self._predicted(f, c, p) for f, c, p in folders):
            return False
        self.progress.begin("predict", f"every model on the test parts of {len(self.regions)} regions")
        all_inputs = self.predictions / "test_images"
        all_inputs.mkdir(parents=True, exist_ok=True)
        for dataset in self.region_datasets.values():  # one folder with every region's test images
            for image in sorted((self.raw / dataset / "imagesTs").glob("*.nii.gz")):
                link = all_inputs / image.name
                if not link.exists():
                    link.symlink_to(image)
        steps = 2 + 2 * len(self.regions)
        k = 0
        for method, base in (("teacher", "nnUNetTrainerSATStyle"), ("mtl", "nnUNetTrainerMTL")):
            model = ["-d", self.merged, "-tr", self.trainer(base), "-p", self.preset.plans]
            self._predict(method, all_inputs, self.prediction_folder(method), all_cases, model, True, k / steps)
            k += 1
        for region, dataset in self.region_datasets.items():
            inputs = self.raw / dataset / "imagesTs"
            cases = self.test_cases(region)
            self._predict(f"LoRKD fused expert {region}", inputs, self.prediction_folder("lorkd", region), cases,
                          ["-d", self.merged, "-tr", "nnUNetTrainer", "-p", f"{self.preset.plans}_{region}"],
                          False, k / steps)  # fmt: skip
            k += 1
            self._predict(f"specialist {region}", inputs, self.prediction_folder("specialist", region), cases,
                          ["-d", dataset, "-tr", self.trainer("nnUNetTrainer"), "-p", self.preset.plans],
                          False, k / steps)  # fmt: skip
            k += 1
        self.progress.finish("predict")
        return True

    def stage_evaluate(self) -> bool:
        from .evaluate import evaluate_all

        metrics_file = self.run_dir / "metrics.json"
        if metrics_file.is_file():
            return False
        self.progress.begin("evaluate", "Dice and NSD per class and region")
        metrics = evaluate_all(self, log=lambda text: self.progress.step(text))
        write_json(metrics_file, metrics)
        self.progress.finish("evaluate")
        return True

    def stage_report(self, wall_seconds: float) -> Path:
        from .report import write_report

        self.progress.begin("report", "markdown table and one bar chart per region")
        metrics = json.loads((self.run_dir / "metrics.json").read_text())
        run_info = self._run_info(wall_seconds)
        path = write_report(metrics, run_info, self.report_dir)
        self.progress.finish("report")
        return path

    def _run_info(self, wall_seconds: float) -> dict:
        import torch

        info_file = self.state / "timing.json"
        timing = json.loads(info_file.read_text()) if info_file.is_file() else {}
        timing.setdefault("runs", []).append(
            {"wall_seconds": round(wall_seconds, 1), "ended": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
        self.state.mkdir(parents=True, exist_ok=True)
        info_file.write_text(json.dumps(timing, indent=2) + "\n")
        manifest = json.loads((self.raw / MANIFEST).read_text())
        device = torch.cuda.get_device_name(0) if self.preset.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        return {
            "preset": self.preset.name,
            "description": self.preset.description,
            "smoke": self.preset.smoke,
            "configuration": self.preset.configuration,
            "plans": self.preset.plans,
            "epochs": self.preset.epochs,
            "teacher_epochs": self.preset.teacher_epochs,
            "iterations": self.preset.iterations,
            "trainers": {b: self.trainer(b) for b in BASE_TRAINERS},
            "kd_mode": self.preset.kd_mode,
            "machine": f"{platform.node()} / {platform.processor() or platform.machine()} / {device}",
            "runs": timing["runs"],
            "wall_seconds_all_runs": round(sum(r["wall_seconds"] for r in timing["runs"]), 1),
            "data": manifest,
            "work": str(self.work),
            "logs": str(self.logs),
        }

    # --------------------------------------------------------------------------------------------- driver
    def redo(self, stage: str) -> None:
        """Delete the outputs of `stage` and every later stage, so the next run computes them again."""
        later = STAGES[STAGES.index(stage) :]
        self.out(f"[lorkd-demo] --redo {stage}: removing the outputs of {', '.join(later)}")
        trained = {"teacher": ["nnUNetTrainerSATStyle"], "mtl": ["nnUNetTrainerMTL"], "lorkd": ["nnUNetTrainerLoRKD"]}
        for s in later:
            for base in trained.get(s, []):
                shutil.rmtree(self.model_folder(self.merged, base), ignore_errors=True)
            if s == "specialists":
                for dataset in self.region_datasets.values():
                    shutil.rmtree(self.model_folder(dataset, "nnUNetTrainer"), ignore_errors=True)
            if s == "kd":
                (self.state / "kd.json").unlink(missing_ok=True)
            if s == "fuse":
                for region in self.regions:
                    shutil.rmtree(self.fused_folder(region), ignore_errors=True)
            if s == "predict":
                shutil.rmtree(self.predictions, ignore_errors=True)
            if s == "evaluate":
                (self.run_dir / "metrics.json").unlink(missing_ok=True)
            if s == "plan":
                for dataset in self._all_datasets():
                    shutil.rmtree(self.preprocessed / dataset, ignore_errors=True)
            if s == "data":
                shutil.rmtree(self.raw, ignore_errors=True)

    def run_all(self) -> Path:
        start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.check_trainers()
        self.out(f"[lorkd-demo] preset {self.preset.name}: {self.preset.description}")
        self.out(f"[lorkd-demo] work folder {self.work}; logs in {self.logs}")
        self.stage_data()
        steps: list[tuple[str, Callable[[], bool]]] = [
            ("plan", self.stage_plan),
            ("specialists", self.stage_specialists),
            ("teacher", lambda: self.stage_train("teacher", "nnUNetTrainerSATStyle", "SAT-style teacher")),
            ("mtl", self.stage_mtl),
            ("kd", self.stage_kd),
            ("lorkd", lambda: self.stage_train("lorkd", "nnUNetTrainerLoRKD", "LoRKD students with KD")),
            ("fuse", self.stage_fuse),
            ("predict", self.stage_predict),
            ("evaluate", self.stage_evaluate),
        ]
        for stage, function in steps:
            if not function():
                self.progress.finish(stage, skipped=True)
        path = self.stage_report(time.perf_counter() - start)
        self.out(f"[lorkd-demo] report: {path}")
        return path


def write_small_plans(dataset_folder: Path, preset: Preset) -> Path:
    """``<preset.plans>.json`` from nnU-Net's ``nnUNetPlans.json``: only the preset's configuration, with the
    features per stage divided (by ``feature_divisor``) and capped, the batch size capped and the patch size
    capped (rounded down to a multiple of the network's total downsampling per axis): the CPU presets' small
    network."""
    small = preset.small_network
    assert small is not None
    plans = json.loads((dataset_folder / "nnUNetPlans.json").read_text())
    configuration = copy.deepcopy(plans["configurations"][preset.configuration])
    if "inherits_from" in configuration:
        raise DemoError(f"{preset.configuration} inherits from another configuration; use 2d or 3d_fullres")
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [
        max(8, min(f // small.feature_divisor, small.max_features)) for f in kwargs["features_per_stage"]
    ]
    configuration["batch_size"] = min(configuration["batch_size"], small.max_batch)
    downsampling = [1] * len(configuration["patch_size"])
    for stride in kwargs["strides"]:
        downsampling = [d * s for d, s in zip(downsampling, stride, strict=True)]
    configuration["patch_size"] = [
        min(p, max(d, small.max_patch // d * d)) for p, d in zip(configuration["patch_size"], downsampling, strict=True)
    ]
    configuration["data_identifier"] = f"{preset.plans}_{preset.configuration}"
    plans["plans_name"] = preset.plans
    plans["configurations"] = {preset.configuration: configuration}
    return write_json(dataset_folder / f"{preset.plans}.json", plans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorkd-demo",
        description="The LoRKD demo on real public scans: data -> SAT-style teacher -> LoRKD students with KD -> "
        "fused region experts -> test-set Dice/NSD against the teacher, an MTL baseline and per-region "
        "nnU-Net specialists, with a report. TotalSegmentator labels are that model's predictions.",
    )
    parser.add_argument("--preset", default="cpu", help="cpu (2d, <= 25 min on 2 cores), cpu-full (the same "
                        "with 3x the schedule, about 1 h), gpu (the benchmark) or tiny (CI)")  # fmt: skip
    parser.add_argument(
        "--work", default="lorkd_work", help="work folder for every nnU-Net path (default ./lorkd_work)"
    )
    parser.add_argument("--regions", nargs="+", default=None, help="regions (default: the preset's)")
    parser.add_argument("--base-id", type=int, default=DEFAULT_BASE_ID, help="merged dataset id; regions follow")
    parser.add_argument("--cache-dir", default=None, help="download cache (default $LORKD_CACHE or ~/.cache/...)")
    parser.add_argument("-np", type=int, default=None, help="processes for preprocessing (default: 1 on cpu)")
    parser.add_argument("--kd-weight", type=float, default=None, help="lambda of the KD loss (default: lorkd-kd's)")
    parser.add_argument("--kd-temperature", type=float, default=None, help="KD temperature (default: lorkd-kd's)")
    parser.add_argument("--redo", choices=STAGES, default=None, help="recompute this stage and all later ones")
    parser.add_argument("--seeds", type=int, default=1, help="train every model N times, with seeds 0..N-1, and "
                        "report mean and spread (seeds.md); seed 0 is the single run's layout")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        preset = get_preset(args.preset)
    except ValueError as error:
        parser.error(str(error))
    processes = args.np or (1 if preset.device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 2)))
    demos = [
        Demo(
            preset,
            Path(args.work),
            tuple(args.regions or preset.regions),
            base_id=args.base_id,
            cache_dir=args.cache_dir,
            processes=processes,
            kd_weight=args.kd_weight,
            kd_temperature=args.kd_temperature,
            seed=seed,
        )
        for seed in range(args.seeds)
    ]
    # a terminated demo stops the command it is running too (the `finally` in Demo.run), as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for demo in demos:
            if args.seeds > 1:
                print(f"[lorkd-demo] seed {demo.seed} of 0..{args.seeds - 1}: models in {demo.results}")
            if args.redo:
                demo.redo(args.redo)
            demo.run_all()
        if args.seeds > 1:
            from .seeds import write_seeds_report

            path = write_seeds_report(
                {d.seed: d.run_dir / "metrics.json" for d in demos},
                demos[0].report_dir,
                f"LoRKD demo, preset `{preset.name}`",
            )
            print(f"[lorkd-demo] mean and spread over {args.seeds} seeds: {path}")
    except DemoError as error:
        print(f"lorkd-demo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorkd-demo: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
