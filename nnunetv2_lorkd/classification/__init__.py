"""LoRKD for multi-task medical image classification (side module of nnunetv2-lorkd).

Each task has its own label set. A light 2D ResNet student carries one low-rank expert per task on every
groups==1 convolution (the core :func:`nnunetv2_lorkd.add_experts`), serves a batch of mixed tasks in one
routed forward, has one head per task, learns from labels and from a larger frozen teacher (logit KD), and
is fused into plain per-task models that load with torch alone. See docs/classification.md.
"""

from .data import DatasetFormatError, TaskData, load_medmnist_npz, save_medmnist_npz
from .export import export_fused_models, load_exported
from .losses import multitask_loss
from .metrics import classification_metrics
from .models import (
    FrozenTeacher,
    LightResNet,
    MultiTaskClassifier,
    PlainTaskClassifier,
    fuse_task,
    make_config,
)
from .organmnist import build_organmnist_style
from .radimagenet import load_radimagenet_csv
from .train import (
    CheckpointError,
    TrainSettings,
    evaluate_split,
    load_checkpoint,
    save_checkpoint,
    train_model,
)

__all__ = [
    "CheckpointError",
    "DatasetFormatError",
    "FrozenTeacher",
    "LightResNet",
    "MultiTaskClassifier",
    "PlainTaskClassifier",
    "TaskData",
    "TrainSettings",
    "build_organmnist_style",
    "classification_metrics",
    "evaluate_split",
    "export_fused_models",
    "fuse_task",
    "load_checkpoint",
    "load_exported",
    "load_medmnist_npz",
    "load_radimagenet_csv",
    "make_config",
    "multitask_loss",
    "save_checkpoint",
    "save_medmnist_npz",
    "train_model",
]
