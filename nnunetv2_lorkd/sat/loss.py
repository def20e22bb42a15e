"""SAT's partial-label loss: independent sigmoid per class, Dice + BCE, only over the classes each sample is
annotated for.

A sample of region t carries labels for region t's classes only; another region's structure in its field of
view is labelled 0. With one sigmoid per class, "not annotated" simply means that class's map is not
supervised for that sample: its BCE and Dice terms are left out, and nothing pushes it to background.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MaskedSigmoidDiceBCELoss(nn.Module):
    """Dice + BCE over the class channels of a prompted network's output, masked per sample.

    ``logits`` (B, 1 + K, *spatial) with channel 0 the constant background logit (ignored); ``target`` a label
    map (B, 1, *spatial) or (B, *spatial) with values 0..K; ``class_mask`` (B, 1 + K) bool, column k+1 True
    where the sample is annotated for class k (column 0, background, is ignored).

    - BCE: mean over the voxels of every annotated (sample, class) pair, then over those pairs.
    - Dice: soft Dice ``(2·Σpy + s) / (Σp + Σy + s)`` per (sample, class), or with ``batch_dice`` per class
      summed over the samples annotated for it; averaged over the annotated entries. The loss adds
      ``-Dice`` (nnU-Net's convention, so a perfect prediction gives -1).
    """

    def __init__(
        self, batch_dice: bool = True, smooth: float = 1e-5, weight_bce: float = 1.0, weight_dice: float = 1.0
    ):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.weight_bce = weight_bce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        class_logits = logits[:, 1:]
        if class_logits.dtype != torch.float64:  # half (autocast) is upcast; float64 stays (exact references)
            class_logits = class_logits.float()
        num_classes = class_logits.shape[1]
        if class_mask.shape != (logits.shape[0], num_classes + 1):
            raise ValueError(
                f"class_mask has shape {tuple(class_mask.shape)}, expected (batch, 1 + classes) = "
                f"{(logits.shape[0], num_classes + 1)}"
            )
        labels = target[:, 0] if target.dim() == logits.dim() else target
        values = torch.arange(1, num_classes + 1, device=logits.device).view(1, -1, *([1] * (labels.dim() - 1)))
        onehot = (labels.long().unsqueeze(1) == values).to(class_logits.dtype)
        valid = class_mask[:, 1:].to(logits.device).to(class_logits.dtype)  # (B, K)
        pairs = valid.sum().clamp_min(1.0)
        axes = tuple(range(2, class_logits.dim()))

        bce = F.binary_cross_entropy_with_logits(class_logits, onehot, reduction="none").mean(axes)
        bce = (bce * valid).sum() / pairs

        probs = torch.sigmoid(class_logits)
        intersect = (probs * onehot).sum(axes)
        denominator = probs.sum(axes) + onehot.sum(axes)
        if self.batch_dice:
            intersect, denominator = (intersect * valid).sum(0), (denominator * valid).sum(0)
            valid = (valid.sum(0) > 0).to(class_logits.dtype)
        dice = (2 * intersect + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        dice = (dice * valid).sum() / valid.sum().clamp_min(1.0)
        return self.weight_bce * bce - self.weight_dice * dice
