"""What distillation costs per training step: no KD vs online teacher vs cached soft labels, side by side.

``python -m nnunetv2_lorkd.benchmarks.distillation [--device cuda|cpu] [--teacher MODEL_FOLDER] [--quick]``

Everything runs in one process on a synthetic nnU-Net-preprocessed dataset (blosc2 cases in a temp folder):

* **data**: one batch from nnU-Net's training pipeline (nnUNetDataLoader crop + nnU-Net's training transforms
  with deep supervision): the region-balanced loader, and the KD loader that also crops and augments the
  cached soft labels (its extra cost is what caching adds to data loading);
* **step**: what the trainer does per batch on the device: (online) the teacher's forward on the augmented
  patch, then forward, partial-label loss (+ KD), backward, gradient clipping and the SGD step of the routed
  LoRKD student (nnU-Net's train_step; autocast and GradScaler on CUDA);
* **total** = data + step: one data-augmentation process (``nnUNet_n_proc_DA=0``). With nnU-Net's background
  workers, data loading overlaps the step and the step column is what a GPU run sees.

The teacher is, by default, an nnU-Net-model teacher (one softmax) with the student's U-Net and random weights
(the cost does not depend on the weights); ``--teacher`` times a real trained teacher folder instead. Variants
alternate (interleaved, median over the repeats).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..experts import add_experts, route
from ..kd.cache import CacheSpec, CaseJob, SoftLabelCache, build_cache, source_file
from ..kd.data import SOFT_LABEL_KEY, CachedSoftLabels, KDDataLoader
from ..kd.layout import RegionClassLayout
from ..kd.loss import DistillationLoss, SegmentationDistillationLoss
from ..kd.teacher_inference import batch_probabilities, freeze_teacher
from ..losses import DeepSupervisionPartialLoss, PartialLabelDiceCELoss
from ..nnunet.runtime import region_balanced_probabilities
from ..regions import RegionMap
from ..teachers import Teacher
from .common import ForeignLoad, machine_description, plain_conv_unet, time_interleaved

TARGET = 1.15  # cached KD step time <= 1.15x no-KD


@dataclass(frozen=True)
class BenchConfig:
    """One size of the benchmark: the student's U-Net, its patch and the synthetic cases it is cut from."""

    features: tuple[int, ...]
    patch: int
    case_shape: tuple[int, int, int]
    batch: int = 2
    cases_per_region: int = 3

    def describe(self) -> str:
        return (
            f"3D PlainConvUNet {len(self.features)} stages, features {list(self.features)}, kernel 3, strides "
            f"[1{', 2' * (len(self.features) - 1)}], 2 convs per stage, deep supervision; batch {self.batch}, "
            f"patch {self.patch}^3; {3 * self.cases_per_region} synthetic cases of {list(self.case_shape)} in 3 "
            "regions (2, 3 and 1 classes), mixed-region batches; student with region experts (default ranks)"
        )


CONFIGS = {
    "cuda": BenchConfig(features=(32, 64, 128, 256, 320), patch=64, case_shape=(96, 128, 128)),
    "cpu": BenchConfig(features=(32, 64, 128, 256, 320), patch=32, case_shape=(48, 64, 64)),
    "quick": BenchConfig(features=(4, 8, 16), patch=16, case_shape=(20, 24, 24), cases_per_region=2),
}
DEFAULT_CLASSES = (("liver", "spleen"), ("urinary_bladder", "femur_left", "femur_right"), ("lung",))


def synthetic_teacher(cfg: BenchConfig, class_names: Sequence[str], device: torch.device) -> Teacher:
    """An nnU-Net-model teacher (softmax over background + classes) with the student's U-Net."""
    from ..teachers import NNUNetModelTeacher, PreprocessingSpec

    spec = PreprocessingSpec(
        "benchmark", (1.0, 1.0, 1.0), (0, 1, 2), 1, ("ZScoreNormalization",), (False,), (None,), ""
    )
    network = plain_conv_unet(cfg.features, 1, len(class_names) + 1, deep_supervision=False)
    stride = 2 ** (len(cfg.features) - 1)
    return NNUNetModelTeacher(network, class_names, spec, (stride,) * 3, "benchmark teacher").to(device)


def write_cases(folder: str, cfg: BenchConfig, region_map: RegionMap, channels: int, seed: int = 0) -> list[str]:
    """Synthetic preprocessed cases (image, labels, class locations) in nnU-Net's blosc2 format."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    rng = np.random.default_rng(seed)
    shape = cfg.case_shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    cases = []
    for case, region in sorted(region_map.case_regions.items()):
        seg = np.zeros(shape, dtype=np.int8)
        image = rng.normal(0, 1, (channels, *shape)).astype(np.float32)
        for value in region_map.label_values(region):
            center = rng.uniform([s * 0.25 for s in shape], [s * 0.75 for s in shape])
            radius = rng.uniform([s * 0.08 for s in shape], [s * 0.2 for s in shape])
            mask = (((grid - center) / radius) ** 2).sum(-1) <= 1
            seg[mask] = value
            image[:, mask] += 1.0
        locations = {v: np.argwhere(seg[None] == v) for v in region_map.all_labels.values() if v}
        properties = {"class_locations": {k: (v if len(v) else []) for k, v in locations.items()}}
        blocks, chunks = comp_blosc2_params((channels, *shape), (cfg.patch,) * 3)
        nnUNetDatasetBlosc2.save_case(image, seg[None], properties, os.path.join(folder, case), chunks=chunks,
                                      blocks=blocks)  # fmt: skip
        cases.append(case)
    return cases


def make_loader(folder: str, cases: list[str], cfg: BenchConfig, region_map: RegionMap, labels: dict,
                soft: CachedSoftLabels | None) -> KDDataLoader:  # fmt: skip
    """nnU-Net's training loader with nnU-Net's own training transforms (3D, rotation, deep supervision)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    patch = (cfg.patch,) * 3
    rotation = (-30.0 / 360 * 2.0 * np.pi, 30.0 / 360 * 2.0 * np.pi)
    initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    scales = [[1.0 / 2**i] * 3 for i in range(len(cfg.features) - 1)]
    transforms = nnUNetTrainer.get_training_transforms(
        patch, rotation, scales, (0, 1, 2), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=sorted(v for v in labels.values() if v), regions=None, ignore_label=None,
    )  # fmt: skip
    dataset = nnUNetDatasetBlosc2(folder, list(cases))
    dataset.lorkd_sampling_probabilities = region_balanced_probabilities(dataset.identifiers, region_map)
    if soft is not None:
        dataset.lorkd_soft_labels = soft
    return KDDataLoader(dataset, cfg.batch, initial, patch, LabelManager(labels, regions_class_order=None),
                        oversample_foreground_percent=0.33, transforms=transforms)  # fmt: skip


def train_step_fn(student: nn.Module, loss: nn.Module, device: torch.device, teacher_probs: Callable | None,
                  layout: RegionClassLayout, class_mask: torch.Tensor) -> Callable[[dict], float]:  # fmt: skip
    """nnU-Net's train_step for the routed student, with the KD target from ``teacher_probs(batch, data)``."""
    optimizer = torch.optim.SGD(student.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    def step(batch: dict) -> float:
        regions = batch["regions"]
        data = batch["data"].to(device, non_blocking=True)
        target = [t.to(device, non_blocking=True) for t in batch["target"]]
        loss.set_class_mask(class_mask[regions].to(device))
        if teacher_probs is not None:
            loss.set_teacher(teacher_probs(batch, data), regions)
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda") if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with autocast, route(student, regions):
            value = loss(student(data), target)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 12)
            optimizer.step()
        if teacher_probs is not None:
            loss.set_teacher(None)
        return float(value.detach())

    return step


def run(device: torch.device, cfg: BenchConfig, repeats: int, warmup: int, teacher_folder: str | None,
        teacher_fold: str, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Time the three steps and the two loaders, interleaved in one process so that drift hits them alike."""
    torch.manual_seed(0)
    if teacher_folder:
        from ..teachers import load_teacher

        teacher = load_teacher(teacher_folder, teacher_fold, device=device)
        names = list(teacher.class_names)
        groups = [tuple(names[i::3]) for i in range(3) if names[i::3]]
        channels = teacher.preprocessing.num_channels  # type: ignore[attr-defined]
        teacher_note = f"trained teacher {teacher!r}"
    else:
        groups = list(DEFAULT_CLASSES)
        names = [n for g in groups for n in g]
        teacher = synthetic_teacher(cfg, names, device)
        channels = 1
        teacher_note = "nnU-Net-model teacher (softmax) with the student's U-Net, random weights"
    freeze_teacher(teacher)
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    regions = [{"name": f"region{r}", "labels": list(g)} for r, g in enumerate(groups)]
    case_regions = {f"r{r}_{i:03d}": f"region{r}" for r in range(len(groups)) for i in range(cfg.cases_per_region)}
    region_map = RegionMap.from_dataset_json(
        {"labels": labels, "lorkd": {"regions": regions, "case_regions": case_regions}}
    )
    layout = RegionClassLayout.from_region_map(region_map)
    class_mask = torch.tensor(region_map.class_mask(len(labels)), dtype=torch.bool)

    with tempfile.TemporaryDirectory(prefix="lorkd_kd_bench_") as tmp:
        data_folder = os.path.join(tmp, "data")
        os.makedirs(data_folder)
        cases = write_cases(data_folder, cfg, region_map, channels)
        spec = CacheSpec(data_folder, os.path.join(tmp, "cache"), (cfg.patch,) * 3, "uint8", 0.5, 2)
        jobs = [CaseJob(c, region_map.region_of_case(c), layout.class_names[region_map.region_of_case(c)],
                        source_file(data_folder, c)) for c in cases]  # fmt: skip
        start = time.perf_counter()
        build_cache(spec, {"benchmark": True}, bool(teacher.exclusive), jobs, layout.region_names, lambda d: teacher,
                    device, log=lambda m: None)  # fmt: skip
        cache_s = (time.perf_counter() - start) / len(cases)
        soft = CachedSoftLabels(SoftLabelCache(spec.folder), layout.max_classes,
                                {c: layout.num_classes(region_map.region_of_case(c)) for c in cases})  # fmt: skip
        plain_loader = make_loader(data_folder, cases, cfg, region_map, labels, None)
        kd_loader = make_loader(data_folder, cases, cfg, region_map, labels, soft)

        def load(loader: KDDataLoader) -> dict:
            batch = loader.generate_train_batch()
            batch["regions"] = region_map.region_ids(batch["keys"])
            return batch

        pools = {"plain": [load(plain_loader) for _ in range(4)], "cached": [load(kd_loader) for _ in range(4)]}
        student = add_experts(plain_conv_unet(cfg.features, channels, len(labels)), len(groups),
                              report=lambda _: None).to(device).train()  # fmt: skip
        weights = [1 / 2**i for i in range(len(cfg.features) - 1)]
        weights[-1] = 0
        weights = [w / sum(weights) for w in weights]

        def make_loss(kd: bool) -> nn.Module:
            seg = DeepSupervisionPartialLoss(PartialLabelDiceCELoss(batch_dice=False), weights)
            if not kd:
                return seg
            return SegmentationDistillationLoss(
                seg, DistillationLoss(layout, bool(teacher.exclusive), 1.0, weights), 1.0
            )

        steps = {
            "no KD": train_step_fn(student, make_loss(False), device, None, layout, class_mask),
            "online KD": train_step_fn(
                student,
                make_loss(True),
                device,
                lambda b, d: batch_probabilities(teacher, d, b["regions"], layout),
                layout,
                class_mask,
            ),
            "cached KD": train_step_fn(
                student,
                make_loss(True),
                device,
                lambda b, d: b[SOFT_LABEL_KEY].to(d.device, non_blocking=True),
                layout,
                class_mask,
            ),
        }
        counters = {name: 0 for name in steps}

        def variant(name: str, pool: list[dict]) -> Callable[[], None]:
            def call() -> None:
                counters[name] += 1
                steps[name](pool[counters[name] % len(pool)])

            return call

        foreign = ForeignLoad()
        timings = time_interleaved(
            {
                "step: no KD": variant("no KD", pools["plain"]),
                "step: online KD": variant("online KD", pools["plain"]),
                "step: cached KD": variant("cached KD", pools["cached"]),
                "data: without soft labels": lambda: plain_loader.generate_train_batch(),
                "data: with cached soft labels": lambda: kd_loader.generate_train_batch(),
            },
            device,
            repeats,
            warmup,
            min_sample_s=0.0,
        )
        load_note = foreign.note()
    return {
        "timings": timings,
        "cache_s_per_case": cache_s,
        "teacher": teacher_note,
        "machine": machine_description(device),
        "load": load_note,
        "config": cfg.describe(),
        "repeats": repeats,
    }


def report(result: dict) -> str:
    """The markdown table of docs/benchmarks.md: step and single-process total, both relative to no KD."""
    t = result["timings"]
    data = {"no KD": t["data: without soft labels"], "online KD": t["data: without soft labels"],
            "cached KD": t["data: with cached soft labels"]}  # fmt: skip
    base_step = t["step: no KD"].median_ms
    base_total = base_step + data["no KD"].median_ms
    lines = [
        f"Machine: {result['machine']}",
        f"Machine load: {result['load']}",
        f"Setting: {result['config']}; teacher: {result['teacher']}; median of {result['repeats']} interleaved repeats",
        f"Cache build (sliding window over a whole case, uint8, blosc2): {result['cache_s_per_case']:.2f} s per case",
        "",
        "| variant | step ms (p25-p75) | vs no KD | data ms (1 process) | total ms | vs no KD |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("no KD", "online KD", "cached KD"):
        s = t[f"step: {name}"]
        total = s.median_ms + data[name].median_ms
        lines.append(
            f"| {name} | {s.median_ms:.1f} ({s.p25_ms:.1f}-{s.p75_ms:.1f}) | {s.median_ms / base_step:.2f}x | "
            f"{data[name].median_ms:.1f} | {total:.1f} | {total / base_total:.2f}x |"
        )
    cached = t["step: cached KD"].median_ms / base_step
    cached_total = (t["step: cached KD"].median_ms + data["cached KD"].median_ms) / base_total
    verdict = "met" if cached <= TARGET else "NOT met"
    lines += ["", f"Target cached step <= {TARGET:.2f}x no-KD step: {cached:.2f}x, {verdict} "
              f"(single-process total: {cached_total:.2f}x)"]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; returns the exit code."""
    prog = "python -m nnunetv2_lorkd.benchmarks.distillation"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15 CPU, 40 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--teacher", default=None, help="time this trained teacher model folder instead")
    parser.add_argument("--teacher-fold", default="0")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS["quick" if args.quick else device.type]
    repeats = args.repeats or (2 if args.quick else 40 if device.type == "cuda" else 15)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = run(device, cfg, repeats, 1 if args.quick else args.warmup, args.teacher, args.teacher_fold)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
