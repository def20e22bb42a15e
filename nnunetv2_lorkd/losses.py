"""Partial-label segmentation loss for multi-region training.

A sample of region t is annotated for region t's classes only: structures of other regions in its field of
view are labelled 0. The deployed region-t model (``fuse.py`` slices the heads to background + region t's
classes; validation and the final validation mask the other classes out) decides by comparing the raw
background logit with region t's logits and nothing else. The loss therefore trains exactly that rule: for
a region-t sample it is a softmax over background + region t's classes only, the other classes' logits are
left out (no gradient, no probability mass). A voxel of another region's structure (labelled 0) must then
score higher on background than on every region-t class, which is what the sliced model needs to predict
background there. (An earlier version merged the other classes into background with a log-sum-exp; such a
voxel then cost nothing when it scored high for its own class, and the sliced model, which no longer sees
that class, could label it as a region-t class.) Dice is computed on the same restricted probabilities and
only over the classes each sample is annotated for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# log-probability reported for classes a sample is not annotated for: exp() is exactly 0 in float32, and a
# label of such a class (a data error) gives a huge but finite loss instead of inf/NaN
_UNANNOTATED_LOGP = -1.0e4


def region_log_probs(logits: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over each sample's annotated channels only (background + its region's classes).

    This is the deployed decision rule (argmax of background vs. the region's logits), so training optimises
    what the fused region model predicts. logits (B, C, ...), class_mask (B, C) bool with the background
    column True. Excluded channels get the finite ``_UNANNOTATED_LOGP`` and receive exactly zero gradient.
    """
    # half-precision logits (autocast) are upcast; float64 stays float64 (exact reference computations)
    z = logits if logits.dtype == torch.float64 else logits.float()
    mask = class_mask.to(z.device).view(*class_mask.shape, *([1] * (logits.dim() - 2)))
    logp = torch.log_softmax(z.masked_fill(~mask, float("-inf")), 1)
    return logp.masked_fill(~mask, _UNANNOTATED_LOGP)


class PartialLabelDiceCELoss(nn.Module):
    """nnU-Net's Dice + CE, per sample a softmax over background + that sample's region classes only."""

    def __init__(self, batch_dice: bool = True, smooth: float = 1e-5, weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        logp = region_log_probs(logits, class_mask)
        labels = target.long()
        if labels.dim() == logits.dim():
            labels = labels[:, 0]
        ce = -logp.gather(1, labels[:, None]).mean()
        probs = logp.exp()[:, 1:]
        onehot = torch.zeros_like(logp).scatter_(1, labels[:, None], 1.0)[:, 1:]
        axes = tuple(range(2, logits.dim()))
        intersect = (probs * onehot).sum(axes)
        denominator = probs.sum(axes) + onehot.sum(axes)
        valid = class_mask[:, 1:].to(logits.device).float()
        if self.batch_dice:
            intersect, denominator = (intersect * valid).sum(0), (denominator * valid).sum(0)
            valid = (valid.sum(0) > 0).float()
        dice = (2 * intersect + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        dice_loss = -(dice * valid).sum() / valid.sum().clamp_min(1.0)
        return self.weight_ce * ce + self.weight_dice * dice_loss


class DeepSupervisionPartialLoss(nn.Module):
    """Applies a per-sample class-masked loss to every deep-supervision output.

    nnU-Net calls ``loss(outputs, targets)`` with nothing else, so the trainer sets the batch's class mask
    with :meth:`set_class_mask` right before each call; a call without one raises instead of silently
    supervising every class.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]
        self._class_mask: torch.Tensor | None = None

    def set_class_mask(self, class_mask: torch.Tensor | None) -> None:
        self._class_mask = class_mask

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if self._class_mask is None:
            raise RuntimeError("partial-label loss called without a class mask; call set_class_mask() for the batch")
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, targets, self._class_mask)
        weights = self.weights or [1.0] * len(outputs)
        total = 0.0
        for w, out, tgt in zip(weights, outputs, targets, strict=False):
            if w != 0:
                total = total + w * self.loss(out, tgt, self._class_mask)
        return total
