"""Frozen teachers for distillation (see :mod:`.base` for the protocol and docs/teachers.md).

- :func:`load_teacher`: a trained nnU-Net model folder -> :class:`SATStyleTeacher` (nnUNetTrainerSATStyle,
  independent sigmoids) or :class:`NNUNetModelTeacher` (any other nnU-Net model, one softmax);
- :class:`SATCheckpointTeacher`: a user-supplied real SAT model, mapped to and from SAT's grid.
"""

from .base import Teacher, TeacherError, match_class_names, normalize_class_name
from .nnunet_model import (
    FrozenNetworkTeacher,
    NNUNetModelTeacher,
    PreprocessingSpec,
    SATStyleTeacher,
    load_teacher,
)
from .sat_checkpoint import SATCheckpointTeacher, SATGrid, SATIntensity

__all__ = [
    "FrozenNetworkTeacher",
    "NNUNetModelTeacher",
    "PreprocessingSpec",
    "SATCheckpointTeacher",
    "SATGrid",
    "SATIntensity",
    "SATStyleTeacher",
    "Teacher",
    "TeacherError",
    "load_teacher",
    "match_class_names",
    "normalize_class_name",
]
