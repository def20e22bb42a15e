"""The LoRKD classification objective: per-task cross-entropy plus per-task logit distillation.

    L = (1/B) * sum_t sum_{i in B_t} [ CE(y_i, p_i) + beta * tau^2 * KL(q_i^tau || p_i^tau) ]

(the task-knowledge-transfer loss of the LoRKD paper: Zhou et al., CVPR 2024), with p the student's and q the
frozen teacher's softened distributions from the heads of sample i's own task. Each task's term is weighted
by its share n_t/B of the batch, so every sample counts once whatever the task mix. The released LoRKD
classification scripts multiply the KD term by 0; here beta defaults to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import TaskGroup


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor  # un-weighted parts, for logging
    kd: torch.Tensor


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), averaged over samples (Hinton et al.'s scaling keeps
    the gradient size independent of tau)."""
    t = float(temperature)
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.detach() / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def multitask_loss(
    student: Sequence[TaskGroup],
    labels: torch.Tensor,
    teacher: Sequence[TaskGroup] | None = None,
    kd_weight: float = 1.0,
    temperature: float = 4.0,
) -> LossParts:
    """Per-task CE on each task's own samples, plus the weighted KD term when a teacher is given."""
    batch = sum(int(g.index.numel()) for g in student)
    teacher_by_task = {g.task: g for g in teacher} if teacher is not None else {}
    ce = kd = student[0].logits.new_zeros(())
    for group in student:
        share = group.index.numel() / batch
        ce = ce + share * F.cross_entropy(group.logits, labels.index_select(0, group.index))
        if teacher is not None:
            t_group = teacher_by_task[group.task]
            if not torch.equal(t_group.index, group.index):
                raise RuntimeError("teacher and student grouped the batch differently; pass the same task ids to both")
            kd = kd + share * kd_kl(group.logits, t_group.logits, temperature)
    total = ce + kd_weight * kd if teacher is not None else ce
    return LossParts(total, ce.detach(), kd.detach())
