"""The teacher protocol: what the distillation side (KD loss, online teacher, cache) may rely on.

A teacher maps an input patch on the STUDENT's preprocessing grid (nnU-Net-normalised, shape
(B, C, *spatial)) to per-class probabilities for the class names the student asks for. It is frozen:
no gradients, eval mode, normalisation statistics never updated.

This module imports nothing from nnU-Net (the core stays nnU-Net-free); implementations that need
nnU-Net live next to it and import it lazily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    """A frozen model that gives per-class probabilities on the student's grid.

    ``exclusive`` says how the probabilities relate: True when they come from one softmax (an nnU-Net
    model: at most one class per voxel, sum <= 1), False when each class is an independent sigmoid
    (the SAT-style universal model). The KD target construction depends on it.
    """

    class_names: tuple[str, ...]
    exclusive: bool

    def probabilities(self, x: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """(B, len(class_names), *spatial) probabilities in [0, 1] for ``x`` of shape (B, C, *spatial)."""
        ...

    def to(self, device: torch.device) -> Teacher:
        """Move the frozen model; returns self."""
        ...


class TeacherError(ValueError):
    """A teacher cannot serve this student (unknown class names, other preprocessing, bad checkpoint)."""


def normalize_class_name(name: str) -> str:
    """The form class names are compared in: case-folded, with '_', '-' and runs of spaces as one space
    ("Femur_Left" and "femur left" match)."""
    return " ".join(name.replace("_", " ").replace("-", " ").casefold().split())


def match_class_names(
    requested: Sequence[str],
    available: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    teacher: str = "the teacher",
) -> list[int]:
    """Index into ``available`` of every requested name (compared with :func:`normalize_class_name`; ``aliases``
    maps a requested name to the teacher's name for it). Raises one TeacherError listing every name that has no
    match, so a user fixes them all at once."""
    lookup: dict[str, int] = {}
    for index, name in enumerate(available):
        key = normalize_class_name(name)
        if key in lookup:
            raise TeacherError(
                f"{teacher} has two classes that both read as '{key}': {available[lookup[key]]!r} and {name!r}"
            )
        lookup[key] = index
    aliases = {normalize_class_name(k): v for k, v in (aliases or {}).items()}
    indices: list[int] = []
    unmatched: list[str] = []
    for name in requested:
        key = normalize_class_name(aliases.get(normalize_class_name(name), name))
        if key in lookup:
            indices.append(lookup[key])
        else:
            unmatched.append(name)
    if unmatched:
        raise TeacherError(
            f"{teacher} has no class for {len(unmatched)} of the {len(requested)} requested names: "
            f"{', '.join(repr(n) for n in unmatched)}. Its classes are: {', '.join(repr(n) for n in available)}. "
            "Names are compared ignoring case and '_'/'-'/space differences; map the others with class_aliases "
            "(student name -> teacher name), or drop them from the classes distilled."
        )
    return indices
