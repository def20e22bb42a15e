"""``lorkd-classify``: build the OrganMNIST-style set, train teacher + LoRKD student, evaluate, fuse.

lorkd-classify build-organmnist --out data/ [--sizes 28 64] [--source-dir DIR] [--cache-dir DIR]
lorkd-classify train --data a.npz b.npz [--csv set.csv] --out run/ [--teacher run0/teacher.pt] ...
lorkd-classify evaluate run/student.pt --data a.npz b.npz [--split test] [--json m.json]
lorkd-classify evaluate run/fused --data a.npz b.npz          (exported per-task models)
lorkd-classify fuse run/student.pt --out run/fused [--tasks a]
lorkd-classify benchmark --out bench/ [--data-dir data/] [--epochs 20] [--teacher-epochs 15]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import write_json
from .data import (
    DatasetFormatError,
    TaskData,
    assemble_split,
    check_unique_names,
    common_geometry,
    load_medmnist_npz,
)
from .export import export_fused_models, load_exported
from .organmnist import LABELS_NOTE, TASK_FILES, SourceError, build_organmnist_style
from .radimagenet import load_radimagenet_csv
from .train import (
    CheckpointError,
    TrainSettings,
    evaluate_split,
    load_checkpoint,
    resolve_device,
    settings_dict,
)

PROG = "lorkd-classify"


def _log(msg: str) -> None:
    print(msg, flush=True)


def load_tasks(npz: Sequence[str] | None, csv: str | None, image_root: str | None, csv_size: int) -> list[TaskData]:
    """Tasks from MedMNIST .npz files and/or one RadImageNet-style CSV, names checked to be unique."""
    tasks = [load_medmnist_npz(p) for p in (npz or [])]
    if csv:
        tasks += load_radimagenet_csv(csv, image_root, csv_size)
    if not tasks:
        raise DatasetFormatError("no data given; pass MedMNIST files with --data and/or a dataset CSV with --csv")
    check_unique_names(tasks)
    return tasks


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    rows = [f"{'task':<24} {'n':>6} {'ACC':>7} {'AUC':>7}"]
    rows += [f"{name:<24} {m['n']:>6} {m['acc']:>7.4f} {m['auc']:>7.4f}" for name, m in metrics.items()]
    return "\n".join(rows)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", metavar="NPZ", help="MedMNIST-format .npz files, one task each")
    p.add_argument("--csv", help="RadImageNet-style CSV (filename,label,task,split); see docs/classification.md")
    p.add_argument("--image-root", help="folder the CSV's filenames are relative to (default: the CSV's folder)")
    p.add_argument("--csv-image-size", type=int, default=28, help="size CSV images are resized to (default 28)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")


def _select_for_model(tasks: list[TaskData], task_names: list[str], what: str) -> list[TaskData]:
    by_name = {t.name: t for t in tasks}
    chosen = [by_name[n] for n in task_names if n in by_name]
    if not chosen:
        raise DatasetFormatError(
            f"none of the data tasks ({', '.join(by_name)}) is a task of {what} ({', '.join(task_names)}); "
            "task "
            "names come from the .npz file names / the CSV's task column"
        )
    return chosen


def cmd_train(args: argparse.Namespace) -> int:
    from .models import FrozenTeacher, MultiTaskClassifier, make_config
    from .train import save_checkpoint, train_model

    device = resolve_device(args.device)
    tasks = load_tasks(args.data, args.csv, args.image_root, args.csv_image_size)
    channels, size = common_geometry(tasks, args.image_size)
    specs = [(t.name, t.class_names) for t in tasks]
    train = assemble_split(tasks, "train", channels, size)
    val = assemble_split(tasks, "val", channels, size)
    test = assemble_split(tasks, "test", channels, size)
    out = Path(args.out)
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        augment_shift=args.shift,
        seed=args.seed,
        progress=not args.no_progress,
    )
    _log(
        f"{len(tasks)} task(s): "
        + ", ".join(f"{t.name} ({t.num_classes} classes, {len(t.splits['train'])} train)" for t in tasks)
        + f"; images {channels}x{size}x{size}; device {device}"
    )

    teacher = None
    if args.teacher:
        teacher_model, _ = load_checkpoint(args.teacher)
        cfg = teacher_model.config
        if (cfg["arch"]["in_channels"], cfg["image_size"]) != (channels, size):
            raise CheckpointError(
                f"{args.teacher}: the teacher takes {cfg['arch']['in_channels']}x{cfg['image_size']}px "
                f"images but the data is {channels}x{size}px; "
                f"pass --image-size {cfg['image_size']} or train a new teacher"
            )
        teacher = FrozenTeacher(teacher_model)
        _log(f"teacher loaded from {args.teacher} (frozen)")
    elif args.teacher_epochs > 0 and args.kd_weight > 0:
        teacher_model = MultiTaskClassifier(make_config(specs, channels, size, "teacher"))
        t_settings = TrainSettings(**{**settings_dict(settings), "epochs": args.teacher_epochs})
        history = train_model(teacher_model, train, t_settings, device, val=val, log=_log, name="teacher")
        path = save_checkpoint(
            out / "teacher.pt",
            teacher_model,
            "teacher",
            history,
            {"test_metrics": evaluate_split(teacher_model, test, device)},
        )
        _log(f"wrote {path}")
        teacher = FrozenTeacher(teacher_model)
    if teacher is None or args.kd_weight == 0:
        _log("note: knowledge distillation is OFF (no teacher or --kd-weight 0); the student learns from labels only")

    experts = None if args.no_experts else {"rank": args.rank, "alpha": args.alpha}
    student = MultiTaskClassifier(make_config(specs, channels, size, "student", experts))
    history = train_model(student, train, settings, device, teacher=teacher, val=val, log=_log, name="student")
    test_metrics = evaluate_split(student, test, device)
    path = save_checkpoint(
        out / "student.pt",
        student,
        "student",
        history,
        {"settings": settings_dict(settings), "test_metrics": test_metrics},
    )
    write_json(out / "metrics.json", {"history": history, "test": test_metrics})
    _log(f"wrote {path}\ntest metrics (routed student):\n{_metrics_table(test_metrics)}")
    return 0


def _evaluate_exported(model_path: Path, tasks: list[TaskData], split: str, device: torch.device) -> dict:
    from .train import evaluate_plain

    files = sorted(model_path.glob("*.pt2")) if model_path.is_dir() else [model_path]
    if not files:
        raise CheckpointError(f"{model_path}: no exported .pt2 models found; write them with `{PROG} fuse`")
    by_name = {t.name: t for t in tasks}
    metrics = {}
    for f in files:
        module, meta = load_exported(f)
        if meta["task"] not in by_name:
            _log(f"skip {f.name}: no data for task '{meta['task']}'")
            continue
        task = by_name[meta["task"]]
        metrics[task.name] = evaluate_plain(module, task, meta["in_channels"], meta["image_size"], device, split)
    if not metrics:
        raise DatasetFormatError(f"no data task matches the exported models in {model_path}")
    return metrics


def _evaluate_checkpoint(model_path: Path, tasks: list[TaskData], split: str, device: torch.device) -> dict:
    model, _ = load_checkpoint(model_path)
    chosen = _select_for_model(tasks, model.task_names, str(model_path))
    index = {n: i for i, n in enumerate(model.task_names)}
    cfg = model.config
    data = assemble_split(chosen, split, cfg["arch"]["in_channels"], cfg["image_size"], index)
    return evaluate_split(model, data, device)


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    tasks = load_tasks(args.data, args.csv, args.image_root, args.csv_image_size)
    model_path = Path(args.model)
    exported = model_path.is_dir() or model_path.suffix == ".pt2"
    metrics = (_evaluate_exported if exported else _evaluate_checkpoint)(model_path, tasks, args.split, device)
    _log(f"{args.split} metrics of {model_path}:\n{_metrics_table(metrics)}")
    if args.json:
        write_json(args.json, {"model": str(model_path), "split": args.split, "metrics": metrics})
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    model, _ = load_checkpoint(args.checkpoint)
    if not model.has_experts:
        _log("note: this model has no experts; each exported model is the shared backbone plus one head")
    for item in export_fused_models(model, args.out, args.tasks):
        _log(
            f"wrote {item['path']} ({item['parameters']:,} parameters, max |routed - fused| = "
            f"{item['max_abs_diff_vs_routed']:.2e})"
        )
    _log("load without this package: torch.export.load(PATH).module()(images_0_255_float)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    info = build_organmnist_style(
        args.out, sizes=args.sizes, source_dir=args.source_dir, cache_dir=args.cache_dir, log=_log
    )
    _log(info["labels_note"])
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..benchmarks.classification import run_benchmark

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.data:
        tasks = load_tasks(args.data, None, None, 28)
    else:
        data_dir = Path(args.data_dir) if args.data_dir else Path(args.out) / "data"
        files = [data_dir / f"{name}.npz" for name in TASK_FILES.values()]
        if not all(f.is_file() for f in files):
            _log(f"building the OrganMNIST-style set into {data_dir}")
            build_organmnist_style(data_dir, sizes=(28,), cache_dir=args.cache_dir, log=_log)
        tasks = [load_medmnist_npz(f) for f in files]
    # files built by build-organmnist carry TotalSegmentator labels: every report must say so
    built = not args.data or any((Path(p).parent / "organmnist_ts_info.json").is_file() for p in args.data)
    run_benchmark(
        tasks,
        args.out,
        device=device,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.epochs,
        seed=args.seed,
        rank=args.rank,
        alpha=args.alpha,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        log=_log,
        data_note=LABELS_NOTE if built else "",
    )
    _log(f"wrote {Path(args.out) / 'benchmark.md'}" + (f"; {LABELS_NOTE}" if built else ""))
    return 0


def _add_training_args(p: argparse.ArgumentParser, epochs: int, teacher_epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"student epochs (default {epochs})")
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=teacher_epochs,
        help=f"teacher epochs when training one (default {teacher_epochs})",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=2,
        help="expert rank r (default 2; a 3x3 conv expert has 9r(Cin+Cout) params)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=8.0,
        help="expert scaling alpha; s = alpha/r (default 8 -> s = 4, as LoRKD cls)",
    )
    p.add_argument("--kd-weight", type=float, default=1.0, help="KD weight beta (default 1; 0 turns KD off)")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="KD temperature tau (default 4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="LoRKD for multi-task medical image classification.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-organmnist", help="build the OrganMNIST-style set from the TotalSegmentator example CT")
    p.add_argument("--out", required=True, help="output folder for organ{a,c,s}_ts[_SIZE].npz")
    p.add_argument("--sizes", type=int, nargs="+", default=[28], help="image sizes (default 28; e.g. 28 64)")
    p.add_argument(
        "--source-dir",
        help="folder with example_ct.nii.gz, example_seg_fast_force_split.nii.gz, map_to_binary.py",
    )
    p.add_argument("--cache-dir", help="download cache (default $LORKD_CACHE or ~/.cache/nnunetv2_lorkd)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="train (or load) a teacher, then the LoRKD student with KD")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder: teacher.pt, student.pt, metrics.json")
    p.add_argument("--teacher", help="checkpoint of a trained teacher to distil from (skips teacher training)")
    p.add_argument("--no-experts", action="store_true", help="plain multi-task student (shared backbone + heads)")
    p.add_argument("--image-size", type=int, help="resize every task to N x N (needed when sizes differ)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shift", type=int, default=2, help="random-shift augmentation in pixels (default 2; 0 = off)")
    _add_training_args(p, epochs=10, teacher_epochs=10)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="ACC/AUC per task of a checkpoint or of exported fused models")
    p.add_argument("model", help="student/teacher checkpoint (.pt), or a folder/file of exported .pt2 models")
    _add_data_args(p)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("fuse", help="write plain per-task models (expert merged) that load with torch alone")
    p.add_argument("checkpoint", help="student checkpoint written by `train`")
    p.add_argument("--out", required=True, help="folder for <task>.pt2 + <task>.json")
    p.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("benchmark", help="teacher vs LoRKD (fused) vs single-task vs MTL students, per task")
    p.add_argument("--out", required=True, help="folder for benchmark.md/.json and the models")
    p.add_argument("--data", nargs="+", metavar="NPZ", help="MedMNIST-format files (default: the OrganMNIST-style set)")
    p.add_argument("--data-dir", help="folder with organ{a,c,s}_ts.npz (built there if missing; default OUT/data)")
    p.add_argument("--cache-dir", help="download cache for building the set")
    p.add_argument("--device", default="auto")
    _add_training_args(p, epochs=20, teacher_epochs=15)
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lorkd-classify` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (DatasetFormatError, CheckpointError, SourceError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
