"""``lorkd-kd``: turn distillation on or off for a dataset's LoRKD/MTL trainers and precompute soft labels.

    lorkd-kd set   -d DATASET -c CONFIGURATION --teacher MODEL_FOLDER [--teacher-fold F]
                   [--teacher-checkpoint checkpoint_final.pth] [--mode online|cached] [--weight LAMBDA]
                   [--temperature TAU] [--class-alias STUDENT=TEACHER ...] [-p PLANS] [--device DEV]
                   [--allow-teacher-fold-overlap]
    lorkd-kd cache -d DATASET -c CONFIGURATION [-np N] [-p PLANS] [--device DEV] [--dtype uint8|float16]
                   [--step-size 0.5] [--batch-size 2] [--overwrite]
    lorkd-kd show  -d DATASET
    lorkd-kd off   -d DATASET [-c CONFIGURATION]

``set`` loads the teacher, checks that it knows every class of the dataset's regions and preprocesses like
the student, runs it once on a real preprocessed patch of every region, and only then writes
``$nnUNet_preprocessed/DatasetXXX_NAME/lorkd_kd.json``. It also previews the teacher fold check for every fold
of the student's splits (the check itself runs at training start, when the student's fold is known).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nnunetv2_lorkd.kd.cache import (
    DTYPES,
    CacheSpec,
    CaseJob,
    KDCacheError,
    build_cache,
    cache_folder,
    dataset_class_of,
    read_manifest,
    source_file,
    teacher_identity,
    verify_cache,
)
from nnunetv2_lorkd.kd.config import (
    DEFAULT_CHECKPOINT,
    DEFAULT_TEMPERATURE,
    DEFAULT_WEIGHT,
    MODES,
    KDConfigError,
    KDSettings,
    TeacherRef,
    config_path,
    parse_fold,
    read_config,
    remove_settings,
    settings_for,
    write_settings,
)
from nnunetv2_lorkd.kd.layout import RegionClassLayout
from nnunetv2_lorkd.kd.teacher_folds import ALLOW_FLAG, preview_student_folds
from nnunetv2_lorkd.kd.teacher_inference import (
    batch_probabilities,
    check_probabilities,
    check_teacher_classes,
    load_configured_teacher,
    student_preprocessing,
)
from nnunetv2_lorkd.regions import RegionMap, RegionMapError
from nnunetv2_lorkd.teachers import Teacher, TeacherError


@dataclass(frozen=True)
class StudentData:
    """A preprocessed dataset and one of its configurations, as the student trainer sees them."""

    name: str
    folder: str  # $nnUNet_preprocessed/DatasetXXX_NAME
    plans_name: str
    plans: dict
    configuration: str
    dataset_json: dict
    region_map: RegionMap

    @property
    def configuration_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans).get_configuration(self.configuration)

    @property
    def data_folder(self) -> str:
        return os.path.join(self.folder, self.configuration_manager.data_identifier)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    def cases(self) -> list[str]:
        if not os.path.isdir(self.data_folder):
            raise KDConfigError(
                f"{self.data_folder} does not exist: preprocess configuration '{self.configuration}' first "
                f"(nnUNetv2_preprocess -d {self.name} -c {self.configuration})"
            )
        return sorted(dataset_class_of(self.data_folder).get_identifiers(self.data_folder))

    def student_spec(self) -> object:
        return student_preprocessing(self.plans, self.configuration, self.dataset_json, f"student {self.name}")


def dataset_folder(dataset: str) -> tuple[str, str]:
    """(name, $nnUNet_preprocessed/name) for a dataset id or name."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise KDConfigError("nnUNet_preprocessed is not set; export it as for nnUNetv2_train")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise KDConfigError(str(e).splitlines()[0]) from None
    folder = os.path.join(os.fspath(nnUNet_preprocessed), name)
    if not os.path.isdir(folder):
        raise KDConfigError(f"{folder} does not exist: plan and preprocess {name} first")
    return name, folder


def load_student(dataset: str, configuration: str, plans_name: str) -> StudentData:
    name, folder = dataset_folder(dataset)
    plans_file = os.path.join(folder, plans_name + ".json")
    if not os.path.isfile(plans_file):
        raise KDConfigError(f"{plans_file} does not exist (plans identifier '{plans_name}'; change it with -p)")
    with open(plans_file) as f:
        plans = json.load(f)
    if configuration not in plans.get("configurations", {}):
        raise KDConfigError(
            f"configuration '{configuration}' is not in {plans_file}; available: {', '.join(plans['configurations'])}"
        )
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    try:
        region_map = RegionMap.from_dataset_json(dataset_json, os.path.join(folder, "dataset.json"))
    except RegionMapError as e:
        raise KDConfigError(str(e)) from None
    return StudentData(name, folder, plans_name, plans, configuration, dataset_json, region_map)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_aliases(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    aliases = {}
    for value in values:
        student, sep, teacher = value.partition("=")
        if not sep or not student.strip() or not teacher.strip():
            raise KDConfigError(f"--class-alias expects STUDENT_NAME=TEACHER_NAME, got {value!r}")
        aliases[student.strip()] = teacher.strip()
    return tuple(sorted(aliases.items()))


def probe_teacher(teacher: Teacher, student: StudentData, device: torch.device) -> list[str]:
    """Run the teacher on a real preprocessed patch (from the middle of the first case) of every region;
    returns one line per region. Raises TeacherError for a wrong shape or values outside [0, 1]."""
    layout = RegionClassLayout.from_region_map(student.region_map)
    cases = student.cases()
    dataset_class = dataset_class_of(student.data_folder)
    patch = student.patch_size
    lines = []
    for region, region_name in enumerate(layout.region_names):
        mine = [c for c in cases if student.region_map.case_regions.get(c) == region]
        if not mine:
            lines.append(f"  {region_name}: no preprocessed case, not probed")
            continue
        data, _, _, _ = dataset_class(student.data_folder, [mine[0]]).load_case(mine[0])
        image = np.asarray(data[:], dtype=np.float32)
        spatial = image.shape[1:]
        if len(patch) == len(spatial) - 1:  # 2D configuration: the middle slice
            image, spatial = image[:, spatial[0] // 2], spatial[1:]
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        bbox = [[s // 2 - p // 2, s // 2 - p // 2 + p] for s, p in zip(spatial, patch, strict=True)]
        x = torch.from_numpy(np.asarray(crop_and_pad_nd(image, bbox, 0)))[None].to(device)
        probs = batch_probabilities(teacher, x, [region], layout)[:, : layout.num_classes(region)]
        check_probabilities(probs, f"case {mine[0]}")
        means = ", ".join(
            f"{n} {float(m):.3f}"
            for n, m in zip(layout.class_names[region], probs.mean((0, *range(2, probs.dim()))), strict=True)
        )
        lines.append(f"  {region_name}: case {mine[0]}, patch {list(patch)}: mean probability {means}")
    return lines


# ------------------------------------------------------------------------------------------ commands
def cmd_set(args: argparse.Namespace) -> int:
    student = load_student(args.d, args.c, args.p)
    ref = TeacherRef(os.path.abspath(args.teacher), parse_fold(args.teacher_fold), args.teacher_checkpoint,
                     _parse_aliases(args.class_alias))  # fmt: skip
    allow = bool(args.allow_teacher_fold_overlap)
    # validates the values before anything is loaded
    settings = KDSettings(student.plans_name, ref, args.mode, args.weight, args.temperature,
                          allow_teacher_fold_overlap=allow)  # fmt: skip
    print(f"Teacher fold check (it runs again when a student fold starts training{'; overlap allowed' * allow}):")
    for line in preview_student_folds(settings, student.name, student.region_map.case_sources, student.folder):
        print(line)
    device = torch.device(args.device)
    layout = RegionClassLayout.from_region_map(student.region_map)
    print(f"Loading teacher {ref.model_folder} (fold {ref.fold}, {ref.checkpoint}) on {device} ...")
    teacher = load_configured_teacher(ref, device, student.student_spec())
    check_teacher_classes(teacher, layout, dict(ref.class_aliases))
    print(f"Teacher: {teacher!r}, {'one softmax' if teacher.exclusive else 'independent sigmoids'}; it knows all "
          f"{len(layout.all_class_names)} classes of the regions {', '.join(layout.region_names)}")  # fmt: skip
    for line in probe_teacher(teacher, student, device):
        print(line)
    settings = KDSettings(
        student.plans_name,
        ref,
        args.mode,
        args.weight,
        args.temperature,
        teacher_exclusive=bool(teacher.exclusive),
        allow_teacher_fold_overlap=allow,
    )
    path = write_settings(student.folder, student.configuration, settings)
    print(f"Wrote {path}: KD on for {student.name} {student.configuration} (mode {settings.mode}, weight "
          f"{settings.weight:g}, temperature {settings.temperature:g})")  # fmt: skip
    if settings.mode == "cached":
        folder = cache_folder(student.folder, student.configuration_manager.data_identifier)
        try:
            verify_cache(folder, teacher_identity(ref), layout, _case_regions(student), student.data_folder, "")
            print(f"The soft-label cache in {folder} is up to date.")
        except KDCacheError:
            plans = "" if student.plans_name == "nnUNetPlans" else f" -p {student.plans_name}"
            print(f"Next: lorkd-kd cache -d {student.name} -c {student.configuration}{plans}  (mode 'cached' "
                  "needs the soft labels before training)")  # fmt: skip
    return 0


def _case_regions(student: StudentData) -> dict[str, int]:
    return {case: student.region_map.region_of_case(case) for case in student.cases()}


def _cache_teacher(ref: TeacherRef, student_spec: object, layout: RegionClassLayout, exclusive: bool | None,
                   device: torch.device) -> Teacher:  # fmt: skip
    """Load and check the teacher (module level: -np workers call it through functools.partial)."""
    teacher = load_configured_teacher(ref, device, student_spec)
    check_teacher_classes(teacher, layout, dict(ref.class_aliases))
    if exclusive is not None and bool(teacher.exclusive) != exclusive:
        raise TeacherError(
            "the teacher's exclusive flag differs from what lorkd_kd.json recorded; rerun `lorkd-kd set`"
        )
    return teacher


def cmd_cache(args: argparse.Namespace) -> int:
    student = load_student(args.d, args.c, args.p)
    settings = settings_for(student.folder, student.configuration, student.plans_name)
    if settings is None:
        raise KDConfigError(
            f"{config_path(student.folder)} has no KD settings for configuration '{student.configuration}'; "
            f"run `lorkd-kd set -d {student.name} -c {student.configuration} --teacher MODEL_FOLDER` first"
        )
    if settings.teacher_exclusive is None:
        raise KDConfigError("lorkd_kd.json does not record whether the teacher is exclusive; rerun `lorkd-kd set`")
    layout = RegionClassLayout.from_region_map(student.region_map)
    cases = student.cases()
    jobs = [
        CaseJob(case, r, layout.class_names[r], source_file(student.data_folder, case))
        for case in cases
        for r in [student.region_map.region_of_case(case)]
    ]
    spec = CacheSpec(
        preprocessed_folder=student.data_folder,
        folder=cache_folder(student.folder, student.configuration_manager.data_identifier),
        patch_size=student.patch_size,
        dtype=args.dtype,
        step_size=args.step_size,
        batch_size=args.batch_size,
    )
    factory = functools.partial(
        _cache_teacher, settings.teacher, student.student_spec(), layout, settings.teacher_exclusive
    )
    manifest = build_cache(
        spec,
        teacher_identity(settings.teacher),
        settings.teacher_exclusive,
        jobs,
        layout.region_names,
        factory,
        torch.device(args.device),
        num_processes=args.np,
        overwrite=args.overwrite,
    )
    size = sum(os.path.getsize(os.path.join(spec.folder, c + ".b2nd")) for c in manifest["cases"])
    print(f"Soft labels of {len(manifest['cases'])} cases in {spec.folder} ({size / 1e6:.1f} MB, {spec.dtype})")
    if settings.mode != "cached":
        print(f"Note: lorkd_kd.json uses mode '{settings.mode}' for {student.configuration}; the trainer reads the "
              "cache only in mode 'cached' (lorkd-kd set ... --mode cached)")  # fmt: skip
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    name, folder = dataset_folder(args.d)
    config = read_config(folder)
    if not config:
        print(f"{name}: distillation is OFF ({config_path(folder)} does not exist)")
        return 0
    print(f"{name}: {config_path(folder)}")
    for configuration, settings in sorted(config.items()):
        print(json.dumps({configuration: settings.to_json()}, indent=2))
        try:
            student = load_student(args.d, configuration, settings.plans)
        except KDConfigError as e:
            print(f"  ({e})")
            continue
        folder_c = cache_folder(folder, student.configuration_manager.data_identifier)
        manifest = read_manifest(folder_c)
        if manifest is None:
            state = "none"
        else:
            try:
                layout = RegionClassLayout.from_region_map(student.region_map)
                verify_cache(folder_c, teacher_identity(settings.teacher), layout, _case_regions(student),
                             student.data_folder, "lorkd-kd cache")  # fmt: skip
                state = f"up to date ({len(manifest['cases'])} cases, {manifest['dtype']})"
            except (KDCacheError, KDConfigError) as e:
                state = f"stale: {e}"
        print(f"  soft-label cache {folder_c}: {state}")
    return 0


def cmd_off(args: argparse.Namespace) -> int:
    name, folder = dataset_folder(args.d)
    removed = remove_settings(folder, args.c)
    what = f"configuration '{args.c}'" if args.c else "all configurations"
    if removed:
        print(f"{name}: distillation is now OFF for {what} ({config_path(folder)} updated)")
    else:
        print(f"{name}: distillation was already off for {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorkd-kd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("set", help="turn KD on for a configuration (checks the teacher, writes lorkd_kd.json)")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--teacher", required=True, help="trained nnU-Net model folder of the teacher")
    p.add_argument("--teacher-fold", default="0", help="teacher fold (an integer or 'all'; default 0)")
    p.add_argument("--teacher-checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint file name in the fold folder")
    p.add_argument("--mode", choices=MODES, default="online",
                   help="online: teacher forward on every augmented patch (exact); cached: soft labels computed "
                        "once by `lorkd-kd cache` (fast)")  # fmt: skip
    p.add_argument("--weight", type=float, default=DEFAULT_WEIGHT, help=f"lambda (default {DEFAULT_WEIGHT:g})")
    p.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help=f"tau (default {DEFAULT_TEMPERATURE:g})"
    )
    p.add_argument("--class-alias", action="append", default=[], metavar="STUDENT=TEACHER",
                   help="teacher class name for a student class name (repeatable)")  # fmt: skip
    p.add_argument("--device", default=default_device(), help="device for the teacher check (default: cuda if any)")
    p.add_argument(ALLOW_FLAG, action="store_true",
                   help="train a student fold even if the teacher was trained on its validation cases (refused by "
                        "default; allowed, the training log warns and names the cases)")  # fmt: skip
    p.set_defaults(func=cmd_set)

    p = sub.add_parser("cache", help="compute the teacher's soft labels for every preprocessed case")
    p.add_argument("-d", required=True)
    p.add_argument("-c", required=True)
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-np", type=int, default=1, help="processes (each loads the teacher once; default 1)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=DTYPES, default="uint8", help="storage of the probabilities (default uint8)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--batch-size", type=int, default=2, help="tiles per teacher call")
    p.add_argument("--overwrite", action="store_true", help="recompute cases that are up to date too")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("show", help="print the KD settings and the state of the caches")
    p.add_argument("-d", required=True)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("off", help="turn KD off (remove lorkd_kd.json or one configuration's entry)")
    p.add_argument("-d", required=True)
    p.add_argument("-c", default=None)
    p.set_defaults(func=cmd_off)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "np", 1) < 1 or (getattr(args, "batch_size", 1) or 1) < 1:
        print("lorkd-kd: error: -np and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.command == "cache" and not 0 < args.step_size <= 1:
        print("lorkd-kd: error: --step-size must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (KDConfigError, KDCacheError, TeacherError, RegionMapError) as e:
        print(f"lorkd-kd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
