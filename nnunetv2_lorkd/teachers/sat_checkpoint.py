"""Adapter point for a real SAT checkpoint (SAT-Nano / SAT-Pro, zhaoziheng/SAT) as a teacher.

SAT sees images that are reoriented to RAS, resampled to 1 x 1 x 3 mm (R, A, S), intensity-normalised its own
way (CT: clip to [-500, 1000] HU, then z-score; MR/PET: clip to the 0.5-99.5 percentiles, then z-score) and
replicated to 3 channels. A LoRKD student's patch lives on nnU-Net's preprocessed grid: the case's own voxel
order (optionally transposed by the plans), the plans' target spacing, nnU-Net's normalisation. This module
maps a student patch to SAT's grid and SAT's probabilities back:

- :class:`SATGrid`: axis permutation and flips (from the case's direction matrix and the plans' transpose) and
  trilinear resampling between the two spacings;
- :class:`SATIntensity`: undoes nnU-Net's CT normalisation (back to HU, within nnU-Net's clip window) and
  applies SAT's;
- :class:`SATCheckpointTeacher`: wraps a user-supplied SAT model callable into a :class:`~.base.Teacher`.

What this package cannot ship (see docs/teachers.md): SAT's code and weights (a ~1.5 GB / ~5.9 GB checkpoint
plus its BioLORD text encoder) and a GPU with 24-34 GB. The user builds SAT, loads its checkpoint and passes
``model(image, class_names, modality) -> logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import TeacherError, match_class_names
from .nnunet_model import PreprocessingSpec

SAT_SPACING = (1.0, 1.0, 3.0)  # mm along SAT's array axes R, A, S
SAT_CT_WINDOW = (-500.0, 1000.0)
SAT_PERCENTILES = (0.5, 99.5)
SAT_MODALITIES = ("ct", "mri", "us", "pet")
# unit vectors of SAT's axes (+R, +A, +S) in ITK's LPS world coordinates
_RAS_IN_LPS = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])

SATModel = Callable[[torch.Tensor, Sequence[str], str], torch.Tensor]


@dataclass(frozen=True)
class SATGrid:
    """Maps (B, C, *spatial) tensors between the student's preprocessed grid and SAT's RAS 1x1x3 mm grid.

    ``source_axis[k]`` is the student axis that becomes SAT axis k (R, A, S); ``flip[k]`` reverses it.
    """

    source_axis: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    student_spacing: tuple[float, float, float]
    sat_spacing: tuple[float, float, float] = SAT_SPACING

    @classmethod
    def from_direction(
        cls,
        direction: Sequence[float],
        student_spacing: Sequence[float],
        transpose_forward: Sequence[int] = (0, 1, 2),
        tolerance: float = 1e-3,
    ) -> SATGrid:
        """From a SimpleITK direction (9 numbers, row-major; column c = world direction of index axis c in LPS),
        the plans' spacing (student axis order) and transpose_forward."""
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
        if len(student_spacing) != 3 or sorted(transpose_forward) != [0, 1, 2]:
            raise TeacherError(
                f"SAT is a 3D model: need a 3D spacing and transpose, got {list(student_spacing)}, "
                f"{list(transpose_forward)}"
            )
        source_axis = [-1, -1, -1]
        flip = [False, False, False]
        for j, original_axis in enumerate(transpose_forward):
            # numpy array axis a of a SimpleITK image is its index axis 2 - a
            world = _RAS_IN_LPS @ matrix[:, 2 - original_axis]
            k = int(np.argmax(np.abs(world)))
            off_axis = np.delete(np.abs(world), k)
            if abs(abs(world[k]) - 1.0) > tolerance or (off_axis > tolerance).any() or source_axis[k] != -1:
                raise TeacherError(
                    f"the image direction {np.round(matrix, 4).tolist()} is not axis-aligned (oblique); SAT's grid "
                    "mapping here handles axis permutations and flips only. Resample the case to an axis-aligned "
                    "grid first, or compute the teacher's probabilities on the raw image and resample them."
                )
            source_axis[k] = j
            flip[k] = bool(world[k] < 0)
        return cls(
            tuple(source_axis),  # type: ignore[arg-type]
            tuple(flip),  # type: ignore[arg-type]
            tuple(float(s) for s in student_spacing),  # type: ignore[arg-type]
        )

    @classmethod
    def from_case_properties(cls, properties: Mapping, student: PreprocessingSpec) -> SATGrid:
        """From an nnU-Net preprocessed case's properties (its .pkl: ``sitk_stuff.direction``)."""
        try:
            direction = properties["sitk_stuff"]["direction"]
        except (KeyError, TypeError):
            raise TeacherError(
                "the case properties have no sitk_stuff.direction (written by nnU-Net's SimpleITK readers); "
                "pass the direction to SATGrid.from_direction yourself"
            ) from None
        return cls.from_direction(direction, student.spacing, student.transpose_forward)

    def sat_shape(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            max(1, round(spatial_shape[j] * self.student_spacing[j] / self.sat_spacing[k]))
            for k, j in enumerate(self.source_axis)
        )

    def to_sat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *student spatial) -> (B, C, R, A, S) on SAT's spacing (trilinear)."""
        if x.dim() != 5:
            raise TeacherError(f"SAT is a 3D model; got a patch of shape {tuple(x.shape)}")
        target = self.sat_shape(x.shape[2:])
        y = x.permute(0, 1, *(2 + j for j in self.source_axis))
        flips = [2 + k for k in range(3) if self.flip[k]]
        if flips:
            y = y.flip(flips)
        return F.interpolate(y.float(), size=target, mode="trilinear", align_corners=False)

    def from_sat(self, y: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """(B, N, R, A, S) on SAT's grid -> (B, N, *spatial_shape) on the student's grid (trilinear)."""
        permuted = tuple(int(spatial_shape[j]) for j in self.source_axis)
        y = F.interpolate(y.float(), size=permuted, mode="trilinear", align_corners=False)
        flips = [2 + k for k in range(3) if self.flip[k]]
        if flips:
            y = y.flip(flips)
        inverse = [0, 0, 0]
        for k, j in enumerate(self.source_axis):
            inverse[j] = k
        return y.permute(0, 1, *(2 + k for k in inverse))


@dataclass(frozen=True)
class SATIntensity:
    """Turns one channel of an nnU-Net-normalised patch into SAT's normalised 3-channel input.

    CT (the student channel uses nnU-Net's CTNormalization): x * std + mean gives HU back (exact inside nnU-Net's
    own clip window [percentile_00_5, percentile_99_5], which loses what lies outside it), then SAT's clip to
    [-500, 1000] and a z-score. Other schemes (nnU-Net's per-image z-score): SAT's percentile clip and z-score.
    The z-score statistics are those of the tensor given (the whole case when the teacher runs on whole cases,
    as SAT does; the patch when it runs per patch), unless fixed ``zscore_stats`` (mean, std) are given.
    """

    scheme: str
    ct_mean: float | None = None
    ct_std: float | None = None
    channel: int = 0
    zscore_stats: tuple[float, float] | None = None

    @classmethod
    def from_student(
        cls, student: PreprocessingSpec, channel: int = 0, zscore_stats: tuple[float, float] | None = None
    ) -> SATIntensity:
        if not 0 <= channel < student.num_channels:
            raise TeacherError(f"channel {channel} does not exist; the student has {student.num_channels} channels")
        scheme = student.normalization_schemes[channel]
        if scheme == "CTNormalization":
            props = dict(student.intensity_properties[channel] or ())
            return cls(scheme, props["mean"], props["std"], channel, zscore_stats)
        if scheme == "ZScoreNormalization":
            return cls(scheme, channel=channel, zscore_stats=zscore_stats)
        raise TeacherError(
            f"the student's channel {channel} uses {scheme}; the SAT adapter maps CTNormalization (CT) and "
            "ZScoreNormalization (MR/PET) inputs only"
        )

    def to_hounsfield_or_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) nnU-Net-normalised -> (B, 1, ...) in HU (CT) or unchanged (per-image z-scored)."""
        channel = x[:, self.channel : self.channel + 1].float()
        if self.scheme == "CTNormalization":
            return channel * max(float(self.ct_std), 1e-8) + float(self.ct_mean)
        return channel

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) HU / raw on SAT's grid -> (B, 3, ...) SAT-normalised."""
        flat = x.flatten(1)
        if self.scheme == "CTNormalization":
            flat = flat.clamp(*SAT_CT_WINDOW)
        else:
            low, high = (_percentile(flat, p) for p in SAT_PERCENTILES)
            flat = torch.maximum(torch.minimum(flat, high), low)
        if self.zscore_stats is None:
            mean, std = flat.mean(1, keepdim=True), flat.std(1, keepdim=True)
        else:
            mean, std = (torch.full_like(flat[:, :1], v) for v in self.zscore_stats)
        flat = (flat - mean) / std.clamp_min(1e-8)
        return flat.view_as(x).expand(-1, 3, *x.shape[2:]).contiguous()


def _percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-th percentile with linear interpolation (numpy's default), (B, N) -> (B, 1); unlike
    torch.quantile it has no input size limit, and whole CT volumes exceed 16 M voxels."""
    position = (flat.shape[1] - 1) * q / 100
    lower = int(np.floor(position))
    upper = min(lower + 1, flat.shape[1] - 1)
    low = flat.kthvalue(lower + 1, dim=1, keepdim=True).values
    high = flat.kthvalue(upper + 1, dim=1, keepdim=True).values
    return low + (high - low) * (position - lower)


class SATCheckpointTeacher:
    """A real SAT model as a :class:`~.base.Teacher` (independent sigmoids, ``exclusive=False``).

    ``model(image, class_names, modality)`` is the user's SAT: image (B, 3, R, A, S) on SAT's grid and
    normalisation, returning logits (B, len(class_names), R, A, S). ``vocabulary`` lists the class names the
    user's SAT knows (SAT answers free text, but only names from its training vocabulary are reliable).

    The orientation of a patch depends on its case: call :meth:`bind_case` (nnU-Net case properties) or
    :meth:`bind_direction` before asking for the patches of a case. Queries go in chunks of ``max_queries``
    (SAT's inference default 16), and the SAT-grid input is zero-padded to a multiple of ``input_multiple``.
    """

    exclusive = False

    def __init__(
        self,
        model: SATModel,
        vocabulary: Sequence[str],
        student: PreprocessingSpec,
        modality: str = "ct",
        *,
        intensity: SATIntensity | None = None,
        max_queries: int = 16,
        input_multiple: Sequence[int] = (32, 32, 32),
        class_aliases: Mapping[str, str] | None = None,
        device: torch.device | str = "cpu",
    ):
        if modality not in SAT_MODALITIES:
            raise TeacherError(f"SAT knows the modalities {SAT_MODALITIES}, got {modality!r}")
        self.model = model
        self.class_names = tuple(vocabulary)
        self.student = student
        self.modality = modality
        self.intensity = intensity or SATIntensity.from_student(student)
        self.max_queries = int(max_queries)
        self.input_multiple = tuple(int(m) for m in input_multiple)
        self.class_aliases = dict(class_aliases or {})
        self.grid: SATGrid | None = None
        self._device = torch.device(device)
        self._freeze()

    def _freeze(self) -> None:
        if isinstance(self.model, nn.Module):
            self.model.eval()
            self.model.requires_grad_(False)

    def to(self, device: torch.device | str) -> SATCheckpointTeacher:
        self._device = torch.device(device)
        if isinstance(self.model, nn.Module):
            self.model.to(self._device)
        return self

    def bind_case(self, properties: Mapping) -> SATCheckpointTeacher:
        """Use the orientation of this nnU-Net case (its preprocessed .pkl properties) for the next patches."""
        self.grid = SATGrid.from_case_properties(properties, self.student)
        return self

    def bind_direction(self, direction: Sequence[float]) -> SATCheckpointTeacher:
        self.grid = SATGrid.from_direction(direction, self.student.spacing, self.student.transpose_forward)
        return self

    def class_indices(self, class_names: Sequence[str]) -> list[int]:
        return match_class_names(class_names, self.class_names, self.class_aliases, "the SAT vocabulary")

    def probabilities(self, x: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        if self.grid is None:
            raise TeacherError(
                "SATCheckpointTeacher needs the case's orientation to map a patch to SAT's RAS grid: call "
                "bind_case(properties) (or bind_direction) before the patches of each case"
            )
        names = [self.class_names[i] for i in self.class_indices(class_names)]
        self._freeze()
        with torch.no_grad():
            values = self.grid.to_sat(self.intensity.to_hounsfield_or_raw(x.to(self._device)))
            image = self.intensity.normalize(values)
            shape = image.shape[2:]
            pad: list[int] = []
            for size, multiple in zip(shape, self.input_multiple, strict=True):
                pad = [0, -size % multiple, *pad]
            image = F.pad(image, pad) if any(pad) else image
            chunks = []
            for start in range(0, len(names), self.max_queries):
                queries = names[start : start + self.max_queries]
                logits = self.model(image, queries, self.modality)
                expected = (image.shape[0], len(queries), *image.shape[2:])
                if tuple(logits.shape) != expected:
                    raise TeacherError(
                        f"the SAT model returned logits of shape {tuple(logits.shape)}, expected {expected} "
                        "(batch, queries, R, A, S)"
                    )
                chunks.append(torch.sigmoid(logits.float()[..., : shape[0], : shape[1], : shape[2]]))
            probs = self.grid.from_sat(torch.cat(chunks, 1), x.shape[2:])
        return probs.clamp(0.0, 1.0).to(x.device)
