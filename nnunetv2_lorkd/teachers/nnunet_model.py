"""Teachers from trained nnU-Net model folders: the SAT-style model (independent sigmoids) and any other nnU-Net
model, e.g. a TotalSegmentator-style universal model (one softmax), plus the preprocessing check.

Preprocessing decision: a teacher must see what it was trained on. A teacher whose plans preprocess
differently from the student's (target spacing, axis transpose, number of channels, normalisation scheme,
the dataset intensity statistics CT normalisation uses, or the image resampling function) is REFUSED with a
message naming every difference and the fix; there is no on-the-fly resampling. Resampling a patch is not
enough to make it right: the student's patch has lost the intensities outside its own CT clip window and the
context outside the patch, so a "resampled" teacher would silently see other inputs than in its training.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..files import read_json
from .base import Teacher, TeacherError, match_class_names

# nnU-Net's normalisation schemes that use only the image itself; every other scheme (CTNormalization, custom
# ones) may use the dataset's foreground intensity statistics, which must then agree between teacher and student
PER_IMAGE_NORMALIZATION = {
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
}
_INTENSITY_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")
_REL_TOL = 1e-4


@dataclass(frozen=True)
class PreprocessingSpec:
    """What an nnU-Net configuration does to an image before the network sees it."""

    source: str
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    num_channels: int
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[tuple[tuple[str, float], ...] | None, ...]  # per channel, None if per-image
    resampling_fn_data: str

    @classmethod
    def from_plans(
        cls, plans: Mapping, configuration: str, dataset_json: Mapping, source: str = ""
    ) -> PreprocessingSpec:
        """From an nnU-Net plans dict, a configuration name in it, and the dataset.json it belongs to."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        source = source or f"{plans.get('plans_name', 'plans')} / {configuration}"
        plans_manager = PlansManager(copy.deepcopy(dict(plans)))
        try:
            cm = plans_manager.get_configuration(configuration)
        except Exception as error:
            raise TeacherError(f"{source}: configuration {configuration!r} cannot be read ({error})") from None
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        if not channels:
            raise TeacherError(f"{source}: dataset.json has no channel_names")
        schemes = tuple(cm.normalization_schemes)
        if len(schemes) != len(channels):
            raise TeacherError(f"{source}: {len(schemes)} normalisation schemes for {len(channels)} channels")
        properties = plans.get("foreground_intensity_properties_per_channel", {})
        intensity: list[tuple[tuple[str, float], ...] | None] = []
        for c, scheme in enumerate(schemes):
            if scheme in PER_IMAGE_NORMALIZATION:
                intensity.append(None)
                continue
            channel = properties.get(str(c), properties.get(c))
            if channel is None:
                raise TeacherError(f"{source}: no foreground intensity properties for channel {c} ({scheme})")
            intensity.append(tuple((k, float(channel[k])) for k in _INTENSITY_KEYS if k in channel))
        return cls(
            source=source,
            spacing=tuple(float(s) for s in cm.spacing),
            transpose_forward=tuple(int(a) for a in plans_manager.transpose_forward),
            num_channels=len(channels),
            normalization_schemes=schemes,
            use_mask_for_norm=tuple(bool(m) for m in cm.use_mask_for_norm),
            intensity_properties=tuple(intensity),
            resampling_fn_data=str(cm.configuration.get("resampling_fn_data", "")),
        )

    def differences(self, student: PreprocessingSpec) -> list[str]:
        """Human-readable list of everything that makes this (teacher) preprocessing differ from the student's."""
        diffs = []
        if len(self.spacing) != len(student.spacing) or not all(
            math.isclose(a, b, rel_tol=_REL_TOL) for a, b in zip(self.spacing, student.spacing, strict=False)
        ):
            diffs.append(f"target spacing {list(self.spacing)} vs student {list(student.spacing)}")
        if self.transpose_forward != student.transpose_forward:
            diffs.append(f"axis transpose {list(self.transpose_forward)} vs student {list(student.transpose_forward)}")
        if self.num_channels != student.num_channels:
            diffs.append(f"{self.num_channels} input channels vs student {student.num_channels}")
        if self.normalization_schemes != student.normalization_schemes:
            diffs.append(
                f"normalisation {list(self.normalization_schemes)} vs student {list(student.normalization_schemes)}"
            )
        elif self.use_mask_for_norm != student.use_mask_for_norm:
            diffs.append(
                f"use_mask_for_norm {list(self.use_mask_for_norm)} vs student {list(student.use_mask_for_norm)}"
            )
        else:
            for c, (mine, theirs) in enumerate(
                zip(self.intensity_properties, student.intensity_properties, strict=True)
            ):
                if mine is None:
                    continue
                a, b = dict(mine), dict(theirs or ())
                if set(a) != set(b) or not all(math.isclose(a[k], b[k], rel_tol=_REL_TOL, abs_tol=1e-6) for k in a):
                    diffs.append(
                        f"channel {c} {self.normalization_schemes[c]} uses the dataset intensity statistics "
                        f"{_fmt(a)} vs student {_fmt(b)}"
                    )
        if self.resampling_fn_data != student.resampling_fn_data:
            diffs.append(f"image resampling {self.resampling_fn_data!r} vs student {student.resampling_fn_data!r}")
        return diffs

    def require_compatible(self, student: PreprocessingSpec) -> None:
        diffs = self.differences(student)
        if diffs:
            raise TeacherError(
                f"the teacher ({self.source}) preprocesses images differently from the student ({student.source}): "
                + "; ".join(diffs)
                + ". A teacher is only used on the student's own preprocessing grid. Fix: train the student on the "
                "teacher's plans (nnUNetv2_move_plans_between_datasets -s TEACHER_DATASET -t STUDENT_DATASET "
                "-sp TEACHER_PLANS -tp TEACHER_PLANS, then nnUNetv2_preprocess -d STUDENT_DATASET -plans_name "
                "TEACHER_PLANS) or train the teacher on the student's plans; or precompute the teacher's "
                "probabilities on the raw images and resample them to the student's grid."
            )


def _fmt(values: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}={v:.4g}" for k, v in values.items()) + "}"


# --------------------------------------------------------------------------------------------- teachers
class FrozenNetworkTeacher:
    """Shared machinery: a frozen network, padding any patch to the network's stride, device handling."""

    exclusive: bool

    def __init__(
        self,
        network: nn.Module,
        class_names: Sequence[str],
        preprocessing: PreprocessingSpec,
        strides: Sequence[int],
        description: str,
        class_aliases: Mapping[str, str] | None = None,
    ):
        self._network = network
        self.class_names = tuple(class_names)
        self.preprocessing = preprocessing
        self.strides = tuple(int(s) for s in strides)
        self.description = description
        self.class_aliases = dict(class_aliases or {})
        self._index_cache: dict[tuple[str, ...], list[int]] = {}
        self.freeze()

    @property
    def network(self) -> nn.Module:
        return self._network

    @property
    def device(self) -> torch.device:
        return next(self._network.parameters()).device

    def freeze(self) -> None:
        """Eval mode (normalisation layers use, and never update, their statistics) and no gradients."""
        self._network.eval()
        self._network.requires_grad_(False)

    def to(self, device: torch.device | str) -> FrozenNetworkTeacher:
        self._network.to(device)
        return self

    def class_indices(self, class_names: Sequence[str]) -> list[int]:
        """The teacher's class index of each requested name; one TeacherError lists every unmatched name."""
        key = tuple(class_names)
        if key not in self._index_cache:
            self._index_cache[key] = match_class_names(key, self.class_names, self.class_aliases, self.description)
        return self._index_cache[key]

    def check_student(self, student: PreprocessingSpec) -> None:
        """Refuse (TeacherError naming each difference) a student whose preprocessing differs from the teacher's."""
        self.preprocessing.require_compatible(student)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
        if x.dim() - 2 != len(self.strides):
            raise TeacherError(
                f"{self.description} is a {len(self.strides)}D model; got a patch of shape {tuple(x.shape)} "
                f"(expected (B, C, {', '.join('...' for _ in self.strides)}))"
            )
        if x.shape[1] != self.preprocessing.num_channels:
            raise TeacherError(
                f"{self.description} expects {self.preprocessing.num_channels} input channels, got {x.shape[1]}"
            )
        pad: list[int] = []
        crop = [slice(None), slice(None)]
        for size, stride in zip(x.shape[2:], self.strides, strict=True):
            total = -size % stride
            before = total // 2
            crop.append(slice(before, before + size))
            pad = [before, total - before, *pad]  # F.pad wants the last axis first
        x = x.to(self.device, non_blocking=True)
        if any(pad):
            x = F.pad(x, pad)  # zero = the normalised mean intensity, as nnU-Net pads for its sliding window
        return x, tuple(crop)

    def probabilities(self, x: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        indices = self.class_indices(class_names)
        self.freeze()  # a caller's .train() on an enclosing module must not reach the teacher
        padded, crop = self._prepare(x)
        with torch.no_grad():
            probs = self._probabilities(padded, indices)
        return probs[crop].float().to(x.device)

    def _probabilities(self, x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self.class_names)} classes)"


class NNUNetModelTeacher(FrozenNetworkTeacher):
    """Any trained nnU-Net model with integer labels: one softmax over background + its classes."""

    exclusive = True

    def _probabilities(self, x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        logits = self._network(x)
        if isinstance(logits, list | tuple):
            logits = logits[0]
        probs = torch.softmax(logits.float(), 1)
        return probs[:, [i + 1 for i in indices]]  # channel 0 is background, channel k+1 the k-th class


class SATStyleTeacher(FrozenNetworkTeacher):
    """The nnUNetTrainerSATStyle model: an independent sigmoid per named class; only the requested classes'
    queries are computed."""

    exclusive = False

    def _probabilities(self, x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return torch.sigmoid(self._network.class_logits(x, indices).float())


# --------------------------------------------------------------------------------------------- loading
def load_teacher(
    model_folder: str | os.PathLike,
    fold: int | str,
    checkpoint_name: str = "checkpoint_final.pth",
    device: torch.device | str = "cpu",
    *,
    student: PreprocessingSpec | None = None,
    class_aliases: Mapping[str, str] | None = None,
) -> Teacher:
    """A frozen teacher from a trained nnU-Net model folder (``<results>/DatasetX/<trainer>__<plans>__<cfg>``).

    An nnUNetTrainerSATStyle folder (its plans carry ``lorkd_sat``) gives a :class:`SATStyleTeacher`
    (``exclusive=False``); any other nnU-Net model gives an :class:`NNUNetModelTeacher` (``exclusive=True``).
    With ``student`` (the student's :class:`PreprocessingSpec`) a teacher that preprocesses differently is refused
    here; otherwise call ``teacher.check_student(spec)`` before using it. ``class_aliases`` maps student class
    names to the teacher's names where they differ beyond case and '_'/'-'/space.
    """
    folder = os.fspath(model_folder)
    plans = _read_json(os.path.join(folder, "plans.json"))
    dataset_json = _read_json(os.path.join(folder, "dataset.json"))
    fold_folder = os.path.join(folder, f"fold_{fold}")
    checkpoint = _read_checkpoint(os.path.join(fold_folder, checkpoint_name))
    configuration = checkpoint.get("init_args", {}).get("configuration")
    trainer_name = checkpoint.get("trainer_name")
    if configuration not in plans.get("configurations", {}):
        raise TeacherError(f"the checkpoint's configuration {configuration!r} is not in {folder}/plans.json")
    weights = checkpoint.get("network_weights")
    if not isinstance(weights, Mapping):
        raise TeacherError(f"{fold_folder}/{checkpoint_name} has no network_weights; not an nnU-Net checkpoint")

    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_lorkd.sat.network import PLANS_KEY as SAT_KEY

    plans_manager = PlansManager(copy.deepcopy(plans))
    cm = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    num_inputs = determine_num_input_channels(plans_manager, cm, dataset_json)
    description = f"teacher {os.path.basename(os.path.normpath(folder))} fold {fold}"
    spec = PreprocessingSpec.from_plans(plans, configuration, dataset_json, source=description)
    strides = [math.prod(s[a] for s in cm.pool_op_kernel_sizes) for a in range(len(cm.patch_size))]

    if label_manager.has_regions:
        raise TeacherError(
            f"{folder} is a region-based nnU-Net model (labels {list(dataset_json['labels'])} are overlapping "
            "regions); only models with integer labels are supported as teachers"
        )
    if SAT_KEY in cm.configuration:
        from nnunetv2_lorkd.sat.network import SATConfig, build_prompted_network

        network = build_prompted_network(
            plans_manager, cm, num_inputs, label_manager.num_segmentation_heads, enable_deep_supervision=False
        )
        names = SATConfig.from_configuration(cm.configuration).class_names
        teacher_class: type[FrozenNetworkTeacher] = SATStyleTeacher
    elif "lorkd_experts" in cm.configuration:
        raise TeacherError(
            f"{folder} is a LoRKD model with region experts; a teacher needs one network. Fuse a region first "
            f"(lorkd-fuse) and load the fused folder, or use the SAT-style model as teacher."
        )
    else:
        network = _build_nnunet_network(trainer_name, plans_manager, cm, num_inputs, label_manager)
        names = _label_names(dataset_json)
        teacher_class = NNUNetModelTeacher
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise TeacherError(
            f"the weights in {fold_folder}/{checkpoint_name} do not fit the network its plans describe "
            f"({str(error).splitlines()[0]})"
        ) from None
    teacher = teacher_class(network, names, spec, strides, description, class_aliases).to(device)
    if student is not None:
        teacher.check_student(student)
    return teacher


def _build_nnunet_network(trainer_name: Any, plans_manager, cm, num_inputs: int, label_manager) -> nn.Module:
    """The network exactly as the model's trainer builds it (resolved the way nnU-Net's predictor does)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if not isinstance(trainer_name, str):
        raise TeacherError(f"the checkpoint names no trainer (trainer_name={trainer_name!r})")
    trainer_class = nnUNetTrainer
    if trainer_name != "nnUNetTrainer":
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
        except Exception as error:
            raise TeacherError(
                f"cannot find the teacher's trainer class {trainer_name!r} ({type(error).__name__}: {error}); "
                "install the package that defines it, or add its folder to nnUNet_extTrainer"
            ) from None
    return trainer_class.build_network_architecture(
        plans_manager, cm, num_inputs, label_manager.num_segmentation_heads, enable_deep_supervision=False
    )


def _label_names(dataset_json: Mapping) -> tuple[str, ...]:
    by_value = {v: k for k, v in dataset_json["labels"].items() if k != "ignore"}
    values = sorted(v for v in by_value if v != 0)
    if values != list(range(1, len(values) + 1)):
        raise TeacherError(f"the teacher's foreground label values must be 1..K without gaps, got {values}")
    return tuple(by_value[v] for v in values)


def _read_json(path: str) -> dict:
    return read_json(path, TeacherError, missing_hint="is this a trained nnU-Net model folder?")


def _read_checkpoint(path: str) -> dict:
    from nnunetv2_lorkd.fuse import FuseError, load_checkpoint

    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        present = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
        raise TeacherError(
            f"{path} does not exist"
            + (f" (checkpoints there: {', '.join(present)})" if present else f" ({folder} holds no checkpoint)")
        )
    try:
        return load_checkpoint(path)
    except FuseError as error:
        raise TeacherError(str(error)) from None
