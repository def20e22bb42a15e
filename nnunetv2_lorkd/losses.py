"""Partial-label segmentation loss for multi-region training.

A sample of region t is annotated for region t's classes only: structures of other regions in its field of
view are labelled 0. A plain softmax loss would push them to background. The marginal loss used here merges
every class the sample is *not* annotated for into the background channel (log-sum-exp of their
log-probabilities), so "background or some other region's structure" is one event: other regions' classes
are neither rewarded nor pushed to background for that sample. Dice is computed on the same merged
probabilities and only over the classes each sample is annotated for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# log-probability given to classes a sample is not annotated for: exp() is exactly 0 in float32, and a
# label of such a class (a data error) gives a huge but finite loss instead of inf/NaN
_UNANNOTATED_LOGP = -1.0e4


def merged_log_probs(logits: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the classes each sample is annotated for, the rest merged into background.

    logits (B, C, ...), class_mask (B, C) bool with the background column True.
    """
    # half-precision logits (autocast) are upcast; float64 stays float64 (exact reference computations)
    logp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), 1)
    mask = class_mask.to(logp.device).view(*class_mask.shape, *([1] * (logits.dim() - 2)))
    absorbed = mask.clone()
    absorbed[:, 0] = False  # background absorbs background + every unannotated class
    background = torch.logsumexp(logp.masked_fill(absorbed, float("-inf")), 1, keepdim=True)
    merged = logp.masked_fill(~mask, _UNANNOTATED_LOGP)
    return torch.cat((background, merged[:, 1:]), 1)


class PartialLabelDiceCELoss(nn.Module):
    """nnU-Net's Dice + CE, restricted per sample to the classes of that sample's region (marginal loss)."""

    def __init__(self, batch_dice: bool = True, smooth: float = 1e-5, weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        merged = merged_log_probs(logits, class_mask)
        labels = target.long()
        if labels.dim() == logits.dim():
            labels = labels[:, 0]
        ce = -merged.gather(1, labels[:, None]).mean()
        probs = merged.exp()[:, 1:]
        onehot = torch.zeros_like(merged).scatter_(1, labels[:, None], 1.0)[:, 1:]
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
