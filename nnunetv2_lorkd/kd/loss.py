"""L = L_seg + lambda * L_KD, over the deep-supervision outputs with the segmentation loss's weights.

nnU-Net's train_step calls ``loss(outputs, targets)`` and nothing else, so, like the class mask of the
partial-label loss, the batch's teacher probabilities are handed over right before the call
(:meth:`SegmentationDistillationLoss.set_teacher`) and cleared right after. Without teacher probabilities
(validation) the loss is the segmentation loss alone, so validation losses stay comparable with and
without KD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnunetv2_lorkd.kd.layout import RegionClassLayout
from nnunetv2_lorkd.kd.targets import DEFAULT_EPS, kd_divergence, pool_to, student_log_probs, target_distribution
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss


class DistillationLoss(nn.Module):
    """tau^2 * KL(teacher target || student), per sample over background + that sample's region classes (the
    student's other class logits are left out, as in the deployed region model), summed over the
    deep-supervision outputs with ``weights`` (the targets are area-averaged to each output)."""

    def __init__(
        self,
        layout: RegionClassLayout,
        exclusive: bool | None,
        temperature: float,
        weights: Sequence[float] | None = None,
        eps: float = DEFAULT_EPS,
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.layout = layout
        self.exclusive = exclusive  # None until the teacher is known (set before the first call)
        self.temperature = float(temperature)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.eps = eps

    def forward(
        self,
        outputs: torch.Tensor | Sequence[torch.Tensor],
        teacher_probs: torch.Tensor,
        region_ids: Sequence[int],
        class_mask: torch.Tensor,
    ) -> torch.Tensor:
        if self.exclusive is None:
            raise RuntimeError("the KD loss does not know yet whether the teacher is exclusive (softmax) or not")
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        weights = self.weights or [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} deep-supervision outputs but {len(weights)} weights")
        full = outputs[0]
        if tuple(teacher_probs.shape[2:]) != tuple(full.shape[2:]) or teacher_probs.shape[0] != full.shape[0]:
            raise ValueError(
                f"teacher probabilities {tuple(teacher_probs.shape)} do not match the student output "
                f"{tuple(full.shape)} (batch and spatial size must agree)"
            )
        if teacher_probs.shape[1] != self.layout.max_classes:
            raise ValueError(
                f"teacher probabilities have {teacher_probs.shape[1]} channels, the layout needs "
                f"{self.layout.max_classes} (the largest region's class count)"
            )
        index, valid = self.layout.index_and_valid(region_ids, full.device)
        target = target_distribution(teacher_probs.to(full.device), valid, self.exclusive, self.temperature, self.eps)
        total = full.new_zeros((), dtype=target.dtype)
        for w, out in zip(weights, outputs, strict=True):
            if w == 0:
                continue
            logp = student_log_probs(out, class_mask, index, self.temperature)
            total = total + w * kd_divergence(logp, pool_to(target, tuple(out.shape[2:])), valid)
        return total * self.temperature**2


class SegmentationDistillationLoss(nn.Module):
    """The partial-label segmentation loss plus ``weight`` times :class:`DistillationLoss`.

    Exposes ``set_class_mask`` like :class:`DeepSupervisionPartialLoss`, so trainers use either loss the
    same way. The last components are kept (detached) for logging.
    """

    def __init__(self, segmentation: DeepSupervisionPartialLoss, distillation: DistillationLoss, weight: float):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"KD weight must be > 0 (turn KD off instead of weighting it 0), got {weight}")
        self.segmentation = segmentation
        self.distillation = distillation
        self.weight = float(weight)
        self._class_mask: torch.Tensor | None = None
        self._teacher: tuple[torch.Tensor, list[int]] | None = None
        self.last_segmentation: torch.Tensor | None = None
        self.last_distillation: torch.Tensor | None = None

    def set_class_mask(self, class_mask: torch.Tensor | None) -> None:
        self._class_mask = class_mask
        self.segmentation.set_class_mask(class_mask)

    def set_teacher(self, teacher_probs: torch.Tensor | None, region_ids: Sequence[int] | None = None) -> None:
        """Teacher probabilities (B, max_classes, *spatial) for the next call, or None for no KD term."""
        if teacher_probs is None:
            self._teacher = None
            return
        if region_ids is None or len(region_ids) != teacher_probs.shape[0]:
            raise ValueError("set_teacher needs one region id per sample of the teacher probabilities")
        self._teacher = (teacher_probs, [int(r) for r in region_ids])

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        seg = self.segmentation(outputs, targets)
        self.last_segmentation = seg.detach()
        if self._teacher is None:
            self.last_distillation = None
            return seg
        if self._class_mask is None:
            raise RuntimeError("distillation loss called without a class mask; call set_class_mask() for the batch")
        probs, region_ids = self._teacher
        kd = self.distillation(outputs, probs, region_ids, self._class_mask)
        self.last_distillation = kd.detach()
        return seg + self.weight * kd
