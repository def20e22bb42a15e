"""Using a :class:`~nnunetv2_lorkd.teachers.Teacher` for distillation: loading it from a KD setting, keeping it
frozen, checking it can serve the student's regions, and asking it for a mixed-region batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from nnunetv2_lorkd.experts import group_by_region
from nnunetv2_lorkd.kd.config import TeacherRef
from nnunetv2_lorkd.kd.layout import RegionClassLayout
from nnunetv2_lorkd.teachers import Teacher, TeacherError, match_class_names


def student_preprocessing(plans: dict, configuration: str, dataset_json: dict, source: str) -> object:
    """The student's preprocessing, in the form the teachers package compares teachers against."""
    from nnunetv2_lorkd.teachers import PreprocessingSpec

    return PreprocessingSpec.from_plans(plans, configuration, dataset_json, source=source)


def load_configured_teacher(ref: TeacherRef, device: torch.device, student: object | None = None) -> Teacher:
    """The teacher a KD setting names, loaded by the teachers package (which refuses one whose preprocessing
    differs from ``student``, a PreprocessingSpec) and frozen."""
    from nnunetv2_lorkd.teachers import load_teacher

    teacher = load_teacher(
        ref.model_folder,
        ref.fold,
        checkpoint_name=ref.checkpoint,
        device=device,
        student=student,
        class_aliases=dict(ref.class_aliases) or None,
    )
    if not isinstance(teacher, Teacher):
        raise TeacherError(
            f"load_teacher returned {type(teacher).__name__}, which does not implement the Teacher protocol"
        )
    freeze_teacher(teacher)
    return teacher


def teacher_modules(teacher: object) -> list[nn.Module]:
    """The torch modules a teacher holds (itself, or its attributes), for freezing and checks."""
    if isinstance(teacher, nn.Module):
        return [teacher]
    return [v for v in vars(teacher).values() if isinstance(v, nn.Module)] if hasattr(teacher, "__dict__") else []


def freeze_teacher(teacher: object) -> None:
    """Eval mode (normalisation statistics are never updated) and no gradients, for every module it holds."""
    for module in teacher_modules(teacher):
        module.eval()
        module.requires_grad_(False)


def check_teacher_classes(
    teacher: Teacher, layout: RegionClassLayout, aliases: Mapping[str, str] | None = None
) -> None:
    """One error listing every class of the student's regions the teacher does not have (names compared the
    teachers package's way: ignoring case and '_'/'-'/space; ``aliases`` map student to teacher names)."""
    match_class_names(layout.all_class_names, teacher.class_names, aliases, f"the teacher {teacher!r}")


@contextlib.contextmanager
def _inference(device: torch.device) -> Iterator[None]:
    with torch.no_grad():
        if device.type == "cuda":
            with torch.autocast("cuda"):
                yield
        else:
            yield


def batch_probabilities(
    teacher: Teacher, data: torch.Tensor, region_ids: Sequence[int], layout: RegionClassLayout
) -> torch.Tensor:
    """Teacher probabilities (B, max_classes, *spatial), float32: each sample's region classes in its first
    channels, zeros after. One teacher call per region present in the batch."""
    out = torch.zeros((data.shape[0], layout.max_classes, *data.shape[2:]), dtype=torch.float32, device=data.device)
    with _inference(data.device):
        for region, rows in group_by_region(region_ids):
            names = layout.class_names[region]
            probs = teacher.probabilities(data[rows], names)
            expected = (len(rows), len(names), *data.shape[2:])
            if tuple(probs.shape) != expected:
                raise TeacherError(
                    f"the teacher returned probabilities of shape {tuple(probs.shape)} for input "
                    f"{tuple(data[rows].shape)} and {len(names)} classes; expected {expected}"
                )
            out[rows, : len(names)] = probs.float()
    return out


def check_probabilities(probs: torch.Tensor, what: str) -> None:
    """Probabilities must be finite and in [0, 1]."""
    if not torch.isfinite(probs).all():
        raise TeacherError(f"the teacher returned non-finite probabilities for {what}")
    low, high = float(probs.min()), float(probs.max())
    if low < 0 or high > 1:
        raise TeacherError(
            f"the teacher returned values in [{low:.4g}, {high:.4g}] for {what}; probabilities must be in [0, 1]"
        )
