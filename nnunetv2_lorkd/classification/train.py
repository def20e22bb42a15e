"""Training, prediction, evaluation and checkpoints for the multi-task classifiers.

Checkpoints hold only tensors and plain dicts/lists/numbers/strings, so they load with
``torch.load(path, weights_only=True)``; the model is rebuilt from the stored config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import save_torch
from .data import MultiTaskSplit, TaskData, assemble_split, iterate_batches
from .losses import multitask_loss
from .metrics import classification_metrics
from .models import FrozenTeacher, MultiTaskClassifier, TaskGroup

CHECKPOINT_FORMAT = "nnunetv2_lorkd.classification/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, not ours, or does not fit the data it is used with."""


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    augment_shift: int = 2  # random translation in pixels (no flips: left/right organs are different classes)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch size ({self.batch_size}) must be >= 1")
        if self.kd_temperature <= 0 or self.kd_weight < 0 or self.lr <= 0:
            raise ValueError("kd temperature and lr must be > 0 and the kd weight >= 0")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; a clear error for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
    return device


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels (zero padding), a label-safe augmentation."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def teacher_task_map(student: MultiTaskClassifier, teacher: FrozenTeacher) -> torch.Tensor:
    """For each student task, the index of the teacher task of the same name (class names must match)."""
    teacher_tasks = {t["name"]: (i, t["class_names"]) for i, t in enumerate(teacher.model.config["tasks"])}
    mapping = []
    for task in student.config["tasks"]:
        if task["name"] not in teacher_tasks:
            raise CheckpointError(
                f"the teacher has no task '{task['name']}' (it has {', '.join(teacher_tasks)}); "
                "train a teacher on "
                "the same data files"
            )
        idx, names = teacher_tasks[task["name"]]
        if list(names) != list(task["class_names"]):
            raise CheckpointError(f"task '{task['name']}': the teacher's classes {names} differ from the data's")
        mapping.append(idx)
    return torch.tensor(mapping, dtype=torch.long)


def _teacher_groups_for(
    student: MultiTaskClassifier, teacher: FrozenTeacher
) -> Callable[[torch.Tensor, torch.Tensor], list[TaskGroup]]:
    """The teacher's logits for a batch, grouped and keyed by the *student's* task ids (the teacher may
    know more tasks, in another order)."""
    t_map = teacher_task_map(student, teacher)
    to_student = {int(t): s for s, t in enumerate(t_map.tolist())}

    def groups(x: torch.Tensor, ids: torch.Tensor) -> list[TaskGroup]:
        return [TaskGroup(to_student[g.task], g.index, g.logits) for g in teacher(x, t_map[ids])]

    return groups


def train_model(
    model: MultiTaskClassifier,
    train: MultiTaskSplit,
    settings: TrainSettings,
    device: torch.device,
    teacher: FrozenTeacher | None = None,
    val: MultiTaskSplit | None = None,
    log: Callable[[str], None] = print,
    name: str = "model",
) -> list[dict[str, Any]]:
    """Train in place with AdamW + cosine decay on mixed-task batches; returns one log dict per epoch.

    Each step is one routed forward of the student (and of the teacher, under no_grad). The epoch log
    holds the CE and KD parts, the KD weight in use and, with `val`, per-task validation ACC/AUC.
    """
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    model.to(device)
    teacher_groups = None
    if teacher is not None and settings.kd_weight > 0:
        teacher_groups = _teacher_groups_for(model, teacher.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(train) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        seen = 0
        start = time.perf_counter()
        batches = list(iterate_batches(len(train), settings.batch_size, shuffle=True, generator=gen))
        bar = tqdm(batches, desc=f"{name} {epoch}/{settings.epochs}", leave=False, disable=not settings.progress)
        for idx in bar:
            x = random_shift(train.images[idx].float(), settings.augment_shift, gen).to(device, non_blocking=True)
            y = train.labels[idx].to(device, non_blocking=True)
            ids = train.task_ids[idx]
            out = model(x, ids)
            t_out = teacher_groups(x, ids) if teacher_groups is not None else None
            parts = multitask_loss(out, y, t_out, settings.kd_weight, settings.kd_temperature)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            scheduler.step()
            n = len(idx)
            seen += n
            sums["loss"] += float(parts.total.detach()) * n
            sums["ce"] += float(parts.ce) * n
            sums["kd"] += float(parts.kd) * n
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            **{k: v / max(1, seen) for k, v in sums.items()},
            "kd_weight": settings.kd_weight if teacher_groups is not None else 0.0,
            "kd_temperature": settings.kd_temperature,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - start,
        }
        line = (
            f"[{name}] epoch {epoch}/{settings.epochs}: loss {record['loss']:.4f} = ce {record['ce']:.4f} "
            f"+ {record['kd_weight']:g} x kd {record['kd']:.4f} (tau {settings.kd_temperature:g}), "
            f"{record['seconds']:.1f}s"
        )
        if val is not None and len(val):
            metrics = evaluate_split(model, val, device, settings.batch_size * 2)
            record["val"] = metrics
            line += " | val " + ", ".join(f"{k} acc {m['acc']:.3f} auc {m['auc']:.3f}" for k, m in metrics.items())
        history.append(record)
        log(line)
    model.eval()
    return history


@torch.no_grad()
def predict_split(
    model: MultiTaskClassifier, data: MultiTaskSplit, device: torch.device, batch_size: int = 256
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per task id: (labels, softmax probabilities), from routed forwards of mixed batches in eval mode."""
    was_training = model.training
    model.eval().to(device)
    labels: dict[int, list[np.ndarray]] = {}
    probs: dict[int, list[np.ndarray]] = {}
    for idx in iterate_batches(len(data), batch_size, shuffle=False):
        x = data.images[idx].float().to(device)
        y = data.labels[idx]
        for group in model(x, data.task_ids[idx]):
            labels.setdefault(group.task, []).append(y[group.index.cpu()].numpy())
            probs.setdefault(group.task, []).append(torch.softmax(group.logits.float(), 1).cpu().numpy())
    model.train(was_training)
    return {t: (np.concatenate(labels[t]), np.concatenate(probs[t])) for t in sorted(labels)}


def evaluate_split(
    model: MultiTaskClassifier, data: MultiTaskSplit, device: torch.device, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Per task name: ACC and AUC (MedMNIST metrics)."""
    return {
        model.task_names[t]: classification_metrics(y, p)
        for t, (y, p) in predict_split(model, data, device, batch_size).items()
    }


def save_checkpoint(
    path: str | Path,
    model: MultiTaskClassifier,
    kind: str,
    history: Sequence[dict] = (),
    extra: dict | None = None,
) -> Path:
    """Atomically write {format, kind, config, state_dict, history, ...}; loadable with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "config": model.config,
        "state_dict": state,
        "history": list(history),
        **(extra or {}),
    }
    return save_torch(path, payload)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MultiTaskClassifier, dict]:
    """Rebuild a model from one of our checkpoints (weights_only=True: no code in the file is run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train one with `lorkd-classify train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an nnunetv2_lorkd classification checkpoint (format {CHECKPOINT_FORMAT})")
    model = MultiTaskClassifier(payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)


@torch.no_grad()
def evaluate_plain(
    module: torch.nn.Module, task: TaskData, channels: int, size: int, device: torch.device, split: str = "test"
) -> dict[str, float]:
    """ACC/AUC of a plain single-task module (e.g. an exported fused model) on one split of its task."""
    data = assemble_split([task], split, channels, size)
    module = module.to(device)
    probs = [np.zeros((0, task.num_classes), np.float32)]
    for idx in iterate_batches(len(data), 512, shuffle=False):
        probs.append(torch.softmax(module(data.images[idx].float().to(device)), 1).cpu().numpy())
    return classification_metrics(data.labels.numpy(), np.concatenate(probs))
