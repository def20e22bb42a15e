"""Speed of the nnU-Net integration: nnUNetTrainerLoRKD's training iteration next to nnUNetTrainer's, and
sliding-window prediction with a fused region model next to a vanilla nnUNetTrainer model of the same plans.

Run ``lorkd-bench-nnunet`` (or ``python -m nnunetv2_lorkd.benchmarks.nnunet``). Both trainers are built in
this process from the same plans (a tiny synthetic multi-region dataset made with lorkd-merge and nnU-Net's
planning and preprocessing, or an existing preprocessed LoRKD dataset given with -d/-c) and both start from
the same backbone weights:

1. **train_step on identical batches.** Batches drawn once from the LoRKD trainer's region-balanced loader
   (they carry the case keys that route them) are fed to ``train_step`` of both trainers in the same order;
   the two trainers alternate, the order rotating every repeat (``common.time_interleaved``), median reported.
2. **the full iteration**, ``train_step(next(loader))`` as nnU-Net's loop runs it, each trainer with its own
   loader, data augmentation in this process (``nnUNet_n_proc_DA=0``) so both pay for their own loading.
3. **prediction.** The LoRKD trainer's weights are saved as an nnU-Net model folder and fused with
   lorkd-fuse (``--verify``); the vanilla model folder holds the plain trainer's network with the same seg
   heads kept (same plans, same architecture). ``nnUNetPredictor.predict_logits_from_preprocessed_data``
   (sliding window, Gaussian weighting) runs on the same preprocessed case for both, interleaved.

Targets (issue "nnU-Net integration"): LoRKD / plain train_step <= 1.10x on CPU and <= 1.05x on GPU; fused /
vanilla prediction 1.00x +-3%.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..experts import expert_parameter_report
from ..files import read_json, save_torch, write_json, write_text
from . import common
from .common import Row, Section, TargetResult, positive_int, print_section, time_interleaved

TARGET_PREDICTION_TOLERANCE = 0.03  # fused / vanilla prediction time within 1.00 +- 3%
PLAIN_TRAINER = "nnUNetTrainer"
SECTION_HEADING = "## nnU-Net integration: training iteration and fused prediction (issue: nnU-Net integration)"
GPU_PLACEHOLDER = "GPU (nnU-Net integration): not yet measured"
# nnU-Net's environment variables (its own spelling)
RAW_VAR, PREPROCESSED_VAR, RESULTS_VAR = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"
COMPILE_VAR, DA_PROCESSES_VAR = "nnUNet_compile", "nnUNet_n_proc_DA"

# synthetic data: region -> {structure: intensity added on the noisy background}
SYNTHETIC_REGIONS: tuple[tuple[str, dict[str, float]], ...] = (
    ("abdomen", {"liver": 1.8, "spleen": -1.3}),
    ("pelvis", {"urinary_bladder": 1.1, "femur": 2.7}),
    ("thorax", {"lung": -2.3, "heart": 0.7}),
)
SYNTHETIC_SOURCE_IDS = (991, 992, 993)
SYNTHETIC_ID, SYNTHETIC_NAME = 990, "LoRKDBench"
# image shapes (z, y, x; 1 mm isotropic): nnU-Net plans a patch of the whole image for these sizes
SYNTHETIC_SHAPES = {"cpu": (32, 64, 64), "cuda": (128, 128, 128), "quick": (8, 16, 16)}


class BenchError(RuntimeError):
    """A setup problem (missing data, wrong dataset), with what to do about it."""


# -------------------------------------------------------------------------------------------- environment
@contextlib.contextmanager
def nnunet_environment(**values: str | None) -> Iterator[None]:
    """nnU-Net reads its folders and worker counts from the environment at call time: set, then restore."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _quietly(fn: Callable, *args, **kwargs):
    """Run `fn` with nnU-Net's console chatter (citation banner, planner tables) captured; shown on failure."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            return fn(*args, **kwargs)
    except Exception:
        sys.stdout.write(buffer.getvalue()[-4000:])
        raise


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ synthetic data
def _ellipsoid(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    centre = [rng.uniform(0.3 * s, 0.7 * s) for s in shape]
    radius = [rng.uniform(0.12 * s, 0.2 * s) for s in shape]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius, strict=True)) <= 1.0


def _synthetic_case(
    shape: Sequence[int], structures: dict[str, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(0.0, 0.5, shape).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    for value, intensity in enumerate(structures.values(), start=1):
        mask = _ellipsoid(shape, rng)
        seg[mask] = value
        image[mask] += intensity
    return image, seg


def _write_image(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((-20.0, 12.5, 40.0))
    sitk.WriteImage(image, str(path))


def write_synthetic_raw(raw: Path, shape: Sequence[int], cases_per_region: int, seed: int) -> Path:
    """One nnU-Net raw dataset per region (blobs of region-specific intensity on noise) and one unseen test
    image of the first region, 1.5x larger in-plane so that prediction slides over several tiles."""
    rng = np.random.default_rng(seed)
    for dataset_id, (region, structures) in zip(SYNTHETIC_SOURCE_IDS, SYNTHETIC_REGIONS, strict=True):
        folder = raw / f"Dataset{dataset_id}_{region.capitalize()}"
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        for i in range(cases_per_region):
            image, seg = _synthetic_case(shape, structures, rng)
            _write_image(image, folder / "imagesTr" / f"{region[:3]}_{i:03d}_0000.nii.gz")
            _write_image(seg, folder / "labelsTr" / f"{region[:3]}_{i:03d}.nii.gz")
        dataset_json = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{name: v for v, name in enumerate(structures, start=1)}},
            "numTraining": cases_per_region,
            "file_ending": ".nii.gz",
        }
        write_json(folder / "dataset.json", dataset_json)
    test_shape = (shape[0], *(round(1.5 * s) for s in shape[1:]))
    image, _ = _synthetic_case(test_shape, SYNTHETIC_REGIONS[0][1], rng)
    test_image = raw.parent / "test" / "bench_000_0000.nii.gz"
    test_image.parent.mkdir()
    _write_image(image, test_image)
    return test_image


def prepare_synthetic(root: Path, shape: Sequence[int], cases_per_region: int, configuration: str, seed: int) -> Path:
    """lorkd-merge of the synthetic regions, then nnU-Net's fingerprint, planning and preprocessing (one
    process each); returns the unseen test image."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    from .. import dataset_merge

    test_image = write_synthetic_raw(root / "raw", shape, cases_per_region, seed)
    args = [a for i, (r, _) in zip(SYNTHETIC_SOURCE_IDS, SYNTHETIC_REGIONS, strict=True) for a in ("-i", str(i), r)]
    code = _quietly(dataset_merge.main, [*args, "-d", str(SYNTHETIC_ID), "-n", SYNTHETIC_NAME, "-np", "1"])
    if code != 0:
        raise BenchError(f"lorkd-merge of the synthetic datasets failed (exit code {code})")
    _quietly(extract_fingerprints, [SYNTHETIC_ID], num_processes=1, verbose=False, show_progress_bar=False)
    _quietly(plan_experiments, [SYNTHETIC_ID])
    _quietly(preprocess, [SYNTHETIC_ID], "nnUNetPlans", [configuration], [1], False, show_progress_bar=False)
    return test_image


# ---------------------------------------------------------------------------------------------- trainers
@dataclass
class Setup:
    """The two (or three) trainers on the same plans, and what the report says about them."""

    trainers: dict[str, object]  # row name -> initialized trainer; the first is the reference
    lorkd_name: str
    # with --compile: (plain, LoRKD) row names of the torch.compile pair; lorkd_name and the first row are eager
    compiled_pair: tuple[str, str] | None
    dataset_name: str
    plans_identifier: str
    configuration: str
    description: str


def build_trainers(
    preprocessed_base: Path,
    plans_identifier: str,
    configuration: str,
    fold: int,
    lorkd_trainer: str,
    device: torch.device,
    seed: int,
    compiled_pairs: bool = False,
) -> Setup:
    """nnUNetTrainer and the LoRKD trainer, initialized from the same plans file; the LoRKD network gets the
    plain network's weights (its experts keep their fresh initialization). Without ``compiled_pairs`` each trainer
    compiles as it decides (on CUDA both do by default; an eager nnUNetTrainer is added as well). With it: both
    eager, and both again with their network wrapped in torch.compile as nnU-Net's initialize does (on CPU too,
    where nnU-Net never compiles)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    plan_first = "plan and preprocess the dataset first (nnUNetv2_plan_and_preprocess)"
    plans = read_json(preprocessed_base / f"{plans_identifier}.json", BenchError, missing_hint=plan_first)
    dataset_json = read_json(preprocessed_base / "dataset.json", BenchError, missing_hint=plan_first)
    if configuration not in plans.get("configurations", {}):
        raise BenchError(
            f"configuration {configuration!r} is not in {preprocessed_base}/{plans_identifier}.json "
            f"(it has {sorted(plans.get('configurations', {}))})"
        )
    if "lorkd" not in dataset_json:
        raise BenchError(f"{preprocessed_base}/dataset.json has no 'lorkd' region section; build it with lorkd-merge")
    lorkd_class = _quietly(recursive_find_trainer_class_by_name, lorkd_trainer)

    def make(cls: type, compile_env: str | None) -> object:
        _seed(seed)
        with nnunet_environment(**{COMPILE_VAR: compile_env}):
            p = copy.deepcopy(plans)
            p["continue_training"] = False
            trainer = _quietly(cls, plans=p, configuration=configuration, fold=fold,
                               dataset_json=copy.deepcopy(dataset_json), device=device)  # fmt: skip
            _quietly(trainer.initialize)
        return trainer

    trainers: dict[str, object] = {}
    compiled_pair = None
    if compiled_pairs:
        plain = make(nnUNetTrainer, "f")
        lorkd = make(lorkd_class, "f")
        lorkd_name = f"{lorkd_class.__name__} (eager)"
        trainers.update({f"{PLAIN_TRAINER} (eager)": plain, lorkd_name: lorkd})
        compiled_pair = (f"{PLAIN_TRAINER} (torch.compile)", f"{lorkd_class.__name__} (torch.compile)")
        for name, cls in zip(compiled_pair, (nnUNetTrainer, lorkd_class), strict=True):
            trainer = make(cls, "f")
            trainer.network = torch.compile(trainer.network)
            trainers[name] = trainer
    else:
        plain = make(nnUNetTrainer, os.environ.get(COMPILE_VAR))
        compiled = plain._do_i_compile()
        trainers[f"{PLAIN_TRAINER}{' (torch.compile)' if compiled else ''}"] = plain
        if compiled:
            trainers[f"{PLAIN_TRAINER} (eager)"] = make(nnUNetTrainer, "f")
        lorkd = make(lorkd_class, os.environ.get(COMPILE_VAR))
        lorkd_name = lorkd_class.__name__ + (" (torch.compile)" if lorkd._do_i_compile() else "")
        trainers[lorkd_name] = lorkd

    plain_weights = _unwrapped(plain).state_dict()
    missing, unexpected = _unwrapped(lorkd).load_state_dict(plain_weights, strict=False)
    if unexpected or any(".lora_" not in k for k in missing):
        backbone_missing = [k for k in missing if ".lora_" not in k]
        raise BenchError(
            f"{lorkd_class.__name__}'s network does not extend nnUNetTrainer's network of the same plans "
            f"(unexpected keys {unexpected[:3]}, missing non-expert keys {backbone_missing[:3]})"
        )
    for other in trainers.values():
        if other is not plain and other is not lorkd:
            _unwrapped(other).load_state_dict(plain_weights, strict=not isinstance(other, lorkd_class))

    cm = plain.configuration_manager
    net = _unwrapped(lorkd)
    report = expert_parameter_report(net)
    n_backbone, n_expert = report.backbone, sum(report.per_expert)
    description = (
        f"plans {plans_identifier} / {configuration}: {cm.network_arch_class_name.rsplit('.', 1)[-1]}, "
        f"patch {list(cm.patch_size)}, batch {cm.batch_size}, "
        f"features {cm.network_arch_init_kwargs.get('features_per_stage')}, "
        f"{plain.label_manager.num_segmentation_heads} outputs; {lorkd_class.__name__}: "
        f"{len(lorkd.region_map.names)} regions {list(lorkd.region_map.names)}, {_describe_experts(lorkd)}, "
        f"{n_expert:,} expert parameters next to {n_backbone:,} backbone parameters"
    )
    return Setup(
        trainers,
        lorkd_name,
        compiled_pair,
        plain.plans_manager.dataset_name,
        plans_identifier,
        configuration,
        description,
    )


def _describe_experts(trainer) -> str:
    config = getattr(trainer, "expert_config", None)
    if config is None:
        return "no expert config"
    ranks = f", ranks per region {list(config.ranks)}" if config.ranks else ""
    return f"rank {config.rank}, alpha {config.alpha:g}, decoder rank x{config.decoder_rank_factor}{ranks}"


def _unwrapped(trainer) -> torch.nn.Module:
    net = trainer.network
    return getattr(net, "_orig_mod", net)


def draw_batches(trainer, count: int, seed: int) -> tuple[list[dict], object]:
    """`count` training batches from the trainer's own loader (region-balanced for LoRKD) and the loader."""
    _seed(seed)
    loader, _ = _quietly(trainer.get_dataloaders)
    return [next(loader) for _ in range(count)], loader


def _cycle_steps(trainer, batches: list[dict]) -> Callable[[], None]:
    cycle = itertools.cycle(batches)
    return lambda: trainer.train_step(next(cycle))


def _loader_steps(trainer, loader) -> Callable[[], None]:
    return lambda: trainer.train_step(next(loader))


def profile_steps(steps: dict[str, Callable[[], None]], device: torch.device, rows: int) -> str:
    """torch.profiler per-op tables for one call of each step (after one untimed call)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name, step in steps.items():
        step()
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        out.append(f"--- profile of one train_step: {name} (sorted by {sort_by}) ---")
        out.append(prof.key_averages().table(sort_by=sort_by, row_limit=rows))
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- prediction
def _write_model_jsons(folder: Path, plans: dict, dataset_json: dict, fold: int) -> Path:
    """plans.json and dataset.json of an nnU-Net model folder; returns the fold folder for the checkpoint."""
    (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", dataset_json)
    return folder / f"fold_{fold}"


def build_model_folders(setup: Setup, fold: int, region: str, results: Path) -> tuple[Path, Path, str]:
    """The LoRKD trainer's model folder fused for `region` (lorkd-fuse, --verify) and a vanilla nnUNetTrainer
    folder with the plain trainer's weights, seg heads cut to the same channels, same plans; returns both and
    the fuse log."""
    from ..fuse import SEG_HEAD_KEY, fuse_model_folder

    lorkd = setup.trainers[setup.lorkd_name]
    plain = next(iter(setup.trainers.values()))
    region_index = lorkd.region_map.region_index(region)
    region_name = lorkd.region_map.names[region_index]
    model = results / setup.dataset_name / f"{setup.lorkd_name}__{setup.plans_identifier}__{setup.configuration}"
    fold_folder = _write_model_jsons(model, lorkd.plans_manager.plans, lorkd.dataset_json, fold)
    _quietly(lorkd.save_checkpoint, str(fold_folder / "checkpoint_final.pth"))
    log: list[str] = []
    (fused,) = fuse_model_folder(str(model), [region_name], [fold], verify=True, log=log.append)
    fused = Path(fused)
    verified = [line for line in log if line.startswith("verify")]
    if not verified:
        raise BenchError(f"lorkd-fuse --verify reported no comparison: {log}")

    channels = torch.tensor(lorkd.region_map.channels(region_index))
    weights = {
        k: (v.index_select(0, channels).clone() if SEG_HEAD_KEY.search(k) else v.clone())
        for k, v in _unwrapped(plain).state_dict().items()
    }
    vanilla_plans_id = f"{setup.plans_identifier}_{region_name}_vanilla"
    plans = read_json(fused / "plans.json", BenchError)
    plans["plans_name"] = vanilla_plans_id
    dataset_json = {k: v for k, v in read_json(fused / "dataset.json", BenchError).items() if k != "lorkd_fused"}
    vanilla = results / setup.dataset_name / f"{PLAIN_TRAINER}__{vanilla_plans_id}__{setup.configuration}"
    checkpoint = {
        "network_weights": weights,
        "trainer_name": PLAIN_TRAINER,
        "init_args": {"configuration": setup.configuration},
        "inference_allowed_mirroring_axes": plain.inference_allowed_mirroring_axes,
    }
    save_torch(_write_model_jsons(vanilla, plans, dataset_json, fold) / "checkpoint_final.pth", checkpoint)
    return fused, vanilla, "lorkd-fuse --verify: " + "; ".join(verified)


def prediction_input(setup: Setup, region: str, test_image: Path | None, preprocessed_base: Path) -> tuple:
    """The preprocessed case both models predict: the synthetic test image run through the plans'
    preprocessor (as nnUNetv2_predict does), or the first preprocessed training case of the region."""
    lorkd = setup.trainers[setup.lorkd_name]
    pm, cm = lorkd.plans_manager, lorkd.configuration_manager
    if test_image is not None:
        preprocessor = cm.preprocessor_class(verbose=False)
        data, _, _ = _quietly(preprocessor.run_case, [str(test_image)], None, pm, cm, lorkd.dataset_json)
        name = f"synthetic unseen {region} image, preprocessed {list(data.shape[1:])}"
    else:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = preprocessed_base / cm.data_identifier
        cases = lorkd.region_map.cases_of(lorkd.region_map.region_index(region))
        if not cases:
            raise BenchError(f"region {region} has no cases in {preprocessed_base}/dataset.json")
        dataset = infer_dataset_class(str(folder))(str(folder), [cases[0]])
        data = np.asarray(dataset.load_case(cases[0])[0][:], dtype=np.float32)
        name = f"preprocessed case {cases[0]} ({region}) {list(data.shape[1:])}"
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), name


def build_predictors(folders: dict[str, Path], fold: int, device: torch.device, tta: bool) -> dict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictors = {}
    for name, folder in folders.items():
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=True,
            device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
        )  # fmt: skip
        _quietly(predictor.initialize_from_trained_model_folder, str(folder), (fold,), "checkpoint_final.pth")
        predictors[name] = predictor
    return predictors


# ------------------------------------------------------------------------------------------------ report
def evaluate_targets(sections: dict[str, Section], device: torch.device, quick: bool) -> list[TargetResult]:
    """The targets of the nnU-Net integration issue (no verdict in quick mode: tiny sizes)."""

    def result(description: str, s: Section, limit: float, at_most: bool) -> TargetResult:
        return TargetResult.measure(description, s, s.ours, s.reference, limit, at_most, judged=not quick)

    out = []
    if "step" in sections:
        s = sections["step"]
        ours, reference = s.ours.removesuffix(" train_step"), s.reference.removesuffix(" train_step")
        limit = common.TARGET_NET_RATIO[device.type]
        out.append(result(f"{ours} / {reference} train_step ({device.type})", s, limit, True))
    if "step_compiled" in sections:
        s = sections["step_compiled"]
        ours, reference = s.ours.removesuffix(" train_step"), s.reference.removesuffix(" train_step")
        out.append(result(f"{ours} / {reference} train_step ({device.type})", s, common.TARGET_NET_RATIO[device.type],
                          True))  # fmt: skip
    if "predict" in sections:
        s = sections["predict"]
        name = f"fused / vanilla prediction ({device.type})"
        out.append(result(f"{name}, upper", s, 1 + TARGET_PREDICTION_TOLERANCE, True))
        out.append(result(f"{name}, lower", s, 1 - TARGET_PREDICTION_TOLERANCE, False))
    return out


SECTION_INTRO = """\
`lorkd-bench-nnunet` (`nnunetv2_lorkd/benchmarks/nnunet.py`) builds `nnUNetTrainer` and `nnUNetTrainerLoRKD` in
one process from the same plans file: a small synthetic 3-region dataset (3D, 1 mm isotropic, blobs on noise),
merged with `lorkd-merge` and planned and preprocessed by nnU-Net, or an existing preprocessed LoRKD dataset
(`-d`/`-c`). Both networks start from the same backbone weights. It times, interleaved (the order rotates
every repeat; warm-up calls first; median over the repeats; CUDA synchronised):

1. **train_step on identical batches**: the same pre-loaded batches (drawn from the LoRKD trainer's
   region-balanced loader; their case keys route them) go through each trainer's `train_step` in the same
   order. On CUDA both trainers compile by default (nnU-Net's default), so a run there also shows an eager
   `nnUNetTrainer`. The target ratio is against nnU-Net's default. With `--compile` it times eager against
   eager, then both networks under `torch.compile` (on CPU too, where nnU-Net never compiles), each pair
   with the same target;
2. **full iteration**: `train_step(next(loader))`, each trainer with its own loader and data augmentation
   in the same process (`nnUNet_n_proc_DA=0`). This ratio has no target;
3. **prediction**: the LoRKD weights are saved as a model folder and fused with `lorkd-fuse --verify` for one
   region. The vanilla model folder holds the plain trainer's network, with its seg heads cut to the same
   channels (same plans, same architecture), saved as an `nnUNetTrainer` checkpoint. Both go through
   `nnUNetPredictor.initialize_from_trained_model_folder` and `predict_logits_from_preprocessed_data`
   (sliding window, step 0.5, Gaussian weighting) on the same preprocessed case: the synthetic unseen image
   is 1.5x the patch in-plane.

Targets: LoRKD / plain train_step ≤ 1.10x on CPU and ≤ 1.05x on GPU; fused / vanilla prediction 1.00x ± 3%.

```bash
lorkd-bench-nnunet --device cpu --markdown docs/benchmarks.md     # synthetic data, CPU sizes
lorkd-bench-nnunet --device cuda --markdown docs/benchmarks.md    # synthetic data, 128^3 images
lorkd-bench-nnunet -d 600 -c 3d_fullres --device cuda             # an existing preprocessed LoRKD dataset
lorkd-bench-nnunet --quick --device cpu                           # tiny sizes: a smoke test, not a measurement
```

Options: `--repeats`, `--warmup`, `--batches` (distinct pre-loaded batches), `--shape Z Y X` (synthetic
image size), `--region` (the fused region), `--tta` / `--no-tta` (mirroring; default on for CUDA as in
nnU-Net, off on CPU), `--threads`, `--profile N` (torch.profiler table, N rows, of one train_step per
trainer).
"""


def write_markdown(path: Path, run_section: str, device: torch.device) -> None:
    """Add the run to this benchmark's own `##` section (created at the end of the file if missing); a CUDA
    run replaces the section's GPU placeholder line. Written to a temporary file, then renamed."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == SECTION_HEADING]
    if not starts:
        tail = "" if device.type == "cuda" else f"\n{GPU_PLACEHOLDER}\n"
        new = text.rstrip("\n") + f"\n\n{SECTION_HEADING}\n\n{SECTION_INTRO}\n{run_section}{tail}"
    else:
        start = starts[0]
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[start:end]
        placeholder = [i for i, line in enumerate(section) if line.strip() == GPU_PLACEHOLDER]
        if device.type == "cuda" and placeholder:
            section[placeholder[0]] = run_section
        else:
            while section and not section[-1].strip():
                section.pop()
            section += ["\n", run_section]
        if end < len(lines):
            section.append("\n")
        new = "".join(lines[:start] + section + lines[end:])
    write_text(path, new)


# -------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorkd-bench-nnunet",
        description="Time nnUNetTrainerLoRKD's training iteration against nnUNetTrainer's on the same plans and "
        "batches, and fused-region prediction against a vanilla nnUNetTrainer model of the same plans.",
    )
    common.add_device_argument(p)
    p.add_argument("-d", "--dataset", default=None, help="an existing preprocessed LoRKD dataset (default: synthetic)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="default: 3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--fold", type=int, default=0, help="fold whose training cases feed the loaders (default 0)")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerLoRKD", help="LoRKD trainer (default nnUNetTrainerLoRKD)")
    p.add_argument("--region", default=None, help="region of the fused model (default: the first region)")
    p.add_argument("--quick", action="store_true", help=common.QUICK_HELP)
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (default: 10 CPU, 30 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 2 CPU, 5 GPU)")
    p.add_argument("--batches", type=positive_int, default=6, help="distinct pre-loaded batches (default 6)")
    shapes = f"default {SYNTHETIC_SHAPES['cpu']} CPU, {SYNTHETIC_SHAPES['cuda']} GPU"
    p.add_argument("--shape", type=positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help=f"synthetic image size ({shapes})")  # fmt: skip
    p.add_argument("--cases-per-region", type=positive_int, default=4, help="synthetic cases per region (default 4)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring at prediction (default: on for cuda, as nnU-Net; off for cpu)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print torch.profiler tables (N rows)")
    p.add_argument("--skip-prediction", action="store_true", help="time the training iteration only")
    p.add_argument("--compile", action="store_true", help="time train_step eager vs eager AND torch.compile vs "
                   "torch.compile (both networks compiled as nnU-Net does, on CPU too)")  # fmt: skip
    p.add_argument("--markdown", type=Path, default=None, help="add the results to this benchmark's section of PATH")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the synthetic data and model folders in this new or empty folder (default: a "
                   "temporary one, deleted at the end)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables and the target summary; returns the exit code."""
    args = _parser().parse_args(argv)
    prog = "lorkd-bench-nnunet"
    if common.cuda_missing(prog, args.device):
        return 2
    if args.dataset is not None and not os.environ.get(PREPROCESSED_VAR):
        print(f"{prog}: -d needs nnUNet_preprocessed (the folder holding the preprocessed dataset)", file=sys.stderr)
        return 2
    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        print(f"{prog}: --work-dir {args.work_dir} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    # what nnUNetv2_train does: all cores for a CPU run, one thread next to a GPU
    threads = args.threads or (1 if device.type == "cuda" else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    fold = args.fold
    repeats = args.repeats or (2 if args.quick else 30 if device.type == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if device.type == "cuda" else 2)
    tta = args.tta if args.tta is not None else device.type == "cuda"
    shape = tuple(args.shape or SYNTHETIC_SHAPES["quick" if args.quick else device.type])

    machine = common.machine_description(device)
    print("LoRKD nnU-Net integration benchmark")
    print(f"machine: {machine}")
    if args.quick:
        print("QUICK MODE: tiny sizes, 1-2 repeats; a smoke test of the code paths, NOT a measurement")

    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorkd-bench-nnunet-")))
        else:
            root = args.work_dir
            root.mkdir(parents=True, exist_ok=True)
        # -d: the user's results folder is never written to
        env: dict[str, str | None] = {RESULTS_VAR: str(root / "results")}
        if args.dataset is None:
            env.update({RAW_VAR: str(root / "raw"), PREPROCESSED_VAR: str(root / "preprocessed")})
            # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which raises at 0, the value
            # CPU users export; plan with nnU-Net's default, time with 0 (below), restore the user's after
            env[DA_PROCESSES_VAR] = None
        with nnunet_environment(**env):
            try:
                test_image, dataset_name, data_note = _prepare_data(args, shape, root)
                torch.set_num_threads(threads)  # the same after nnU-Net's planning and preprocessing
                with nnunet_environment(**{DA_PROCESSES_VAR: "0"}):  # not before: it breaks nnU-Net's planner
                    return _measure(args, device, fold, repeats, warmup, tta, machine, test_image, dataset_name,
                                    data_note, argv)  # fmt: skip
            except BenchError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                return 2


def _prepare_data(args: argparse.Namespace, shape: tuple[int, ...], root: Path) -> tuple[Path | None, str, str]:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if args.dataset is None:
        print(f"data: synthetic, 3 regions x {args.cases_per_region} cases of {list(shape)} voxels; merging, "
              "planning and preprocessing ...", flush=True)  # fmt: skip
        start = time.perf_counter()
        test_image = prepare_synthetic(root, shape, args.cases_per_region, args.configuration, args.seed)
        print(f"data ready ({time.perf_counter() - start:.0f} s)", flush=True)
        dataset_id: int | str = SYNTHETIC_ID
        data_note = f"synthetic 3 regions x {args.cases_per_region} cases of {list(shape)} voxels (1 mm)"
    else:
        test_image, dataset_id = None, args.dataset
        data_note = f"dataset {args.dataset}"
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_id)
    except RuntimeError as error:
        raise BenchError(str(error)) from None
    return test_image, dataset_name, data_note


def _measure(args, device, fold, repeats, warmup, tta, machine, test_image, dataset_name, data_note, argv) -> int:
    preprocessed_base = Path(os.environ[PREPROCESSED_VAR]) / dataset_name
    start = time.perf_counter()
    setup = build_trainers(
        preprocessed_base, args.plans, args.configuration, fold, args.trainer, device, args.seed, args.compile
    )
    lorkd = setup.trainers[setup.lorkd_name]
    region = args.region or lorkd.region_map.names[0]
    try:
        lorkd.region_map.region_index(region)
    except ValueError as error:
        raise BenchError(str(error)) from None

    batches, lorkd_loader = draw_batches(lorkd, args.batches, args.seed)
    loaders = {setup.lorkd_name: lorkd_loader}
    for name, trainer in setup.trainers.items():
        if trainer is not lorkd:
            loaders[name] = draw_batches(trainer, 1, args.seed)[1]
    mixes = [[lorkd.region_map.names[r] for r in lorkd.region_map.region_ids(b["keys"])] for b in batches]
    print(f"trainers {list(setup.trainers)} built, batches loaded ({time.perf_counter() - start:.0f} s)")

    settings = (
        f"device {device.type}, {data_note}; {setup.description}; median of {repeats} repeats after {warmup} warm-up "
        f"calls each, variants interleaved (order rotated each repeat); {len(batches)} pre-loaded batches, regions "
        f"{mixes}; prediction: tile step 0.5, Gaussian, mirroring {'on' if tta else 'off'}"
    )
    if args.quick:
        settings = "QUICK MODE (tiny sizes, not a measurement); " + settings
    print(f"settings: {settings}")
    # "just before" leaves this process out: the trainers' setup just ended, and its OpenMP threads may still
    # spin; they are not another process's load
    foreign = common.ForeignLoad(exclude_self=True)
    foreign.announce("the timing")
    print(flush=True)

    names = list(setup.trainers)
    reference = names[0]
    sections: dict[str, Section] = {}
    stepped = {n: t for n, t in setup.trainers.items() if setup.compiled_pair is None or n not in setup.compiled_pair}
    steps = {f"{n} train_step": _cycle_steps(t, batches) for n, t in stepped.items()}
    timings = time_interleaved(steps, device, repeats, warmup, min_sample_s=0.0)
    sections["step"] = Section(
        "train_step on identical batches",
        f"{len(batches)} batches cycled in the same order for every trainer, "
        f"{sum(len(set(m)) > 1 for m in mixes)} of them mix regions",
        [Row(n, t) for n, t in timings.items()],
        f"{reference} train_step",
        f"{setup.lorkd_name} train_step",
    )
    print_section(sections["step"])
    if setup.compiled_pair is not None:
        # the first calls compile (warm-up); the region mixes of the later batches must not recompile
        compiled_steps = {f"{n} train_step": _cycle_steps(setup.trainers[n], batches) for n in setup.compiled_pair}
        timings = time_interleaved(compiled_steps, device, repeats, max(warmup, 2), min_sample_s=0.0)
        sections["step_compiled"] = Section(
            "train_step on identical batches, both networks compiled (torch.compile, default backend)",
            "the same batches as above; compilation happens in the warm-up calls",
            [Row(n, t) for n, t in timings.items()],
            *(f"{n} train_step" for n in setup.compiled_pair),
        )
        print_section(sections["step_compiled"])

    iterations = {f"{n}: train_step(next(loader))": _loader_steps(t, loaders[n]) for n, t in stepped.items()}
    timings = time_interleaved(iterations, device, repeats, warmup, min_sample_s=0.0)
    sections["iteration"] = Section(
        "full training iteration (data loading in-process, nnUNet_n_proc_DA=0)",
        "each trainer with its own loader (LoRKD: region-balanced sampling); no target",
        [Row(n, t) for n, t in timings.items()],
        f"{reference}: train_step(next(loader))",
        f"{setup.lorkd_name}: train_step(next(loader))",
    )
    print_section(sections["iteration"])

    if args.profile > 0:
        print(profile_steps({n: _cycle_steps(t, batches) for n, t in setup.trainers.items()}, device, args.profile))
        print(flush=True)

    if not args.skip_prediction:
        fused, vanilla, fuse_log = build_model_folders(setup, fold, region, Path(os.environ[RESULTS_VAR]))
        print(fuse_log)
        x, case = prediction_input(setup, region, test_image, preprocessed_base)
        vanilla_row, fused_row = f"vanilla {PLAIN_TRAINER} model", f"fused {region} model (lorkd-fuse)"
        predictors = build_predictors({vanilla_row: vanilla, fused_row: fused}, fold, device, tta)
        shapes = {n: tuple(p.predict_logits_from_preprocessed_data(x).shape) for n, p in predictors.items()}
        if len(set(shapes.values())) != 1:
            raise BenchError(f"the two models predict different shapes: {shapes}")
        variants = {n: (lambda p=p: p.predict_logits_from_preprocessed_data(x)) for n, p in predictors.items()}
        timings = time_interleaved(variants, device, repeats, warmup, min_sample_s=0.0)
        sections["predict"] = Section(
            "sliding-window prediction of one case (nnUNetPredictor.predict_logits_from_preprocessed_data)",
            f"{case}, logits {list(shapes[fused_row])}; model folders loaded by "
            "initialize_from_trained_model_folder; " + fuse_log,
            [Row(n, t) for n, t in timings.items()],
            vanilla_row,
            fused_row,
        )
        print_section(sections["predict"])

    targets = evaluate_targets(sections, device, args.quick)
    print("summary (ratios of medians; targets of the nnU-Net integration issue):")
    for t in targets:
        print(f"  {t.line()}")
    if "step" in sections and len(names) == 3:
        s = sections["step"]
        print(f"  (info) {s.ours} / {names[1]} train_step: {s.ms(s.ours) / s.ms(names[1] + ' train_step'):.3f}x")
    if args.quick:
        print("(quick mode: tiny sizes; no verdict is given)")
    load_note = foreign.note()
    print(load_note)
    if args.markdown is not None:
        command = common.command_line("lorkd-bench-nnunet", argv)
        tables = list(sections.values())
        run_md = common.markdown_section(tables, targets, device, machine, settings, command, load_note)
        write_markdown(args.markdown, run_md, device)
        print(f"results added to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
