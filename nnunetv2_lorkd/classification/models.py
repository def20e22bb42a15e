"""Networks: a light 2D ResNet, the multi-task classifier (shared backbone + per-task heads, optional
LoRKD experts routed by task id in one forward), the frozen teacher, and the plain per-task model of fusion.

Normalisation: BatchNorm, shared by all tasks as in the LoRKD classification student. Its batch statistics
therefore mix tasks during training; at inference the running statistics are shared constants, so a fused
per-task network computes exactly what the routed multi-task network computes for that task.

Every model takes float images in the 0..255 range, (B, C, H, W); the fixed scaling to [-1, 1] is part of
the network, so an exported per-task model needs no preprocessing code beside it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..experts import add_experts, backbone_parameter_count, expert_layers, fuse_expert, group_by_region, route

# width/depth presets; the teacher is ~30x the student (see docs/classification.md)
ARCH_PRESETS: dict[str, dict[str, list[int]]] = {
    "student": {"widths": [16, 32, 64], "blocks": [1, 1, 1]},
    "teacher": {"widths": [32, 64, 128], "blocks": [2, 2, 2]},
}


def _scale_to_unit(x: torch.Tensor) -> torch.Tensor:
    return x * (2.0 / 255.0) - 1.0


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class LightResNet(nn.Module):
    """A small ResNet for 28-64 px images: 3x3 stem at full resolution, then stages that halve the size."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {list(widths)} and blocks {list(blocks)} need the same, non-zero length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(depth):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


@dataclass(frozen=True)
class TaskGroup:
    """The samples of one task in a batch: their positions and that task's logits."""

    task: int
    index: torch.Tensor
    logits: torch.Tensor


class MultiTaskClassifier(nn.Module):
    """Shared LightResNet backbone + one linear head per task.

    With ``config["experts"]`` the backbone gets LoRKD experts (one per task) on every groups==1 conv; one
    forward serves a batch of mixed tasks: the expert convs split the batch by task id internally, and
    each sample's logits come from its own task's head.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        arch = config["arch"]
        self.task_names = [t["name"] for t in config["tasks"]]
        self.backbone = LightResNet(arch["in_channels"], arch["widths"], arch["blocks"])
        self.heads = nn.ModuleList(nn.Linear(self.backbone.feature_dim, len(t["class_names"])) for t in config["tasks"])
        experts = config.get("experts")
        if experts:
            add_experts(
                self.backbone,
                num_experts=len(self.task_names),
                rank=int(experts["rank"]),
                alpha=float(experts["alpha"]),
                region_names=self.task_names,
                report=lambda _line: None,
            )

    @property
    def has_experts(self) -> bool:
        return bool(expert_layers(self.backbone))

    def features(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        x = _scale_to_unit(x)
        if not self.has_experts:
            return self.backbone(x)
        with route(self.backbone, task_ids):
            return self.backbone(x)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int]) -> list[TaskGroup]:
        """One routed forward for a mixed-task batch; returns the logits grouped by task."""
        ids = task_ids.tolist() if isinstance(task_ids, torch.Tensor) else [int(i) for i in task_ids]
        if len(ids) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(ids)} task ids; give one task id per image")
        groups = group_by_region(ids)  # (task, positions), the grouping routing uses; the heads reuse it
        feats = self.features(x, ids if len(groups) > 1 else groups[0][0])
        out = []
        for task, positions in groups:
            index = torch.as_tensor(positions, device=x.device)
            out.append(TaskGroup(task, index, self.heads[task](feats.index_select(0, index))))
        return out

    def task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of one task for a batch that is all that task (evaluation, equality checks)."""
        return self.heads[task](self.features(x, task))

    def deployed_parameter_count(self, task: int) -> int:
        """Parameters of the plain network this model yields for `task` (backbone + that head)."""
        return backbone_parameter_count(self.backbone) + sum(p.numel() for p in self.heads[task].parameters())

    def stored_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PlainTaskClassifier(nn.Module):
    """What fusion yields for one task: a plain backbone (W0 + expert merged) and that task's head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(_scale_to_unit(x)))


def fuse_task(model: MultiTaskClassifier, task: int) -> PlainTaskClassifier:
    """The plain per-task network: the expert merged into the conv weights (in float64), no expert classes."""
    if not 0 <= task < len(model.heads):
        raise ValueError(f"task {task} out of range 0..{len(model.heads) - 1} ({', '.join(model.task_names)})")
    backbone = fuse_expert(model.backbone, task) if model.has_experts else copy.deepcopy(model.backbone)
    plain = PlainTaskClassifier(backbone, copy.deepcopy(model.heads[task]))
    return plain.train(model.training)


class FrozenTeacher(nn.Module):
    """A trained teacher that stays in eval mode with no gradients: `.train()` cannot unfreeze it, so its
    BatchNorm statistics never move while the student trains."""

    def __init__(self, model: MultiTaskClassifier) -> None:
        super().__init__()
        self.model = model
        model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @property
    def task_names(self) -> list[str]:
        return self.model.task_names

    @torch.no_grad()
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int]) -> list[TaskGroup]:
        return self.model(x, task_ids)


def make_config(
    tasks: Sequence[tuple[str, Sequence[str]]],
    in_channels: int,
    image_size: int,
    preset: str = "student",
    experts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A plain-dict model description (it goes into checkpoints loaded with weights_only=True)."""
    if preset not in ARCH_PRESETS:
        raise ValueError(f"unknown architecture preset '{preset}'; choose one of {', '.join(ARCH_PRESETS)}")
    return {
        "arch": {
            "name": "light_resnet",
            "preset": preset,
            "in_channels": int(in_channels),
            **ARCH_PRESETS[preset],
        },
        "image_size": int(image_size),
        "tasks": [{"name": n, "class_names": [str(c) for c in names]} for n, names in tasks],
        "experts": dict(experts) if experts else None,
    }
