"""The distillation target and divergence (derivation: docs/distillation.md).

The student of a region-t sample predicts a softmax over {background, region-t classes} of its own logits,
the other classes' logits left out (``region_log_probs`` of ``losses.py``: the rule the fused region model
deploys). Its background therefore means "none of region t's classes": region-t labels mark other regions'
structures 0, so the raw background logit is trained to beat the region's logits there. The teacher gives
per-class probabilities p_c for the region's classes. They become a distribution over the same 1 + K
outcomes:

* independent sigmoids (``exclusive=False``): condition the independent Bernoullis on "at most one of the
  region's classes is present"; outcome c has probability proportional to p_c / (1 - p_c) and background to
  1, so the target logits are ``[0, logit(p_1), ..., logit(p_K)]``;
* one softmax (``exclusive=True``): the teacher's probability of the same events, q_c = p_c and
  q_bg = 1 - sum_c p_c (teacher background plus every teacher class outside the region). This is
  deliberately *not* the teacher's own region-restricted softmax p_bg / (p_bg + sum_c p_c): that answers
  "background, given background or a region-t class", which on another region's structure is a ratio of
  two near-zero numbers and contradicts the labels (which say background there); it would also need the
  teacher's p_bg, which neither the teacher interface nor the cache provides;

both clamped at ``eps`` and softened by the temperature on the logits. The KD term is the per-voxel
KL(target || student) scaled by tau^2, averaged over voxels and samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunetv2_lorkd.losses import region_log_probs

DEFAULT_EPS = 1e-4


def target_logits(probs: torch.Tensor, valid: torch.Tensor, exclusive: bool, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Teacher probabilities (B, K, ...) of the region classes -> target logits (B, 1 + K, ...) over
    {background, classes}; channels marked invalid in ``valid`` (B, 1 + K) get -inf (probability 0)."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    p = probs if probs.dtype == torch.float64 else probs.float()
    spatial = [1] * (p.dim() - 2)
    class_valid = valid[:, 1:].view(*valid.shape[:1], -1, *spatial)
    p = p.masked_fill(~class_valid, 0.0)  # padding channels never count (exclusive: not in the sum)
    if exclusive:
        background = (1.0 - p.sum(1, keepdim=True)).clamp_min(eps)
        logits = torch.cat((background.log(), p.clamp_min(eps).log()), 1)
    else:
        p = p.clamp(eps, 1.0 - eps)
        logits = torch.cat((torch.zeros_like(p[:, :1]), torch.log(p) - torch.log1p(-p)), 1)
    return logits.masked_fill(~valid.view(*valid.shape, *spatial), float("-inf"))


def target_distribution(
    probs: torch.Tensor, valid: torch.Tensor, exclusive: bool, temperature: float, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """softmax(target_logits / tau): the tempered target over {background, region classes}."""
    return torch.softmax(target_logits(probs, valid, exclusive, eps) / temperature, 1)


def student_log_probs(
    logits: torch.Tensor, class_mask: torch.Tensor, index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Tempered student log-probabilities, a softmax over {background, region classes} only (the deployed
    rule), in the layout of ``index`` (B, 1 + K): union channel per target channel."""
    z = logits if logits.dtype == torch.float64 else logits.float()  # never divide half-precision logits
    logp = region_log_probs(z / temperature, class_mask)
    spatial = logp.shape[2:]
    gather_index = index.view(*index.shape, *([1] * len(spatial))).expand(-1, -1, *spatial)
    return logp.gather(1, gather_index)


def pool_to(target: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Average a target distribution over the voxels each coarser deep-supervision voxel covers."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(shape)]
    return pool(target, tuple(shape))


def kd_divergence(student_logp: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over samples and voxels of KL(target || student) over the valid channels."""
    spatial = [1] * (target.dim() - 2)
    mask = valid.view(*valid.shape, *spatial)
    terms = torch.xlogy(target, target) - target * student_logp
    return terms.masked_fill(~mask, 0.0).sum(1).mean()
