"""Knowledge distillation from a frozen teacher into the LoRKD (or MTL) student: KD target and loss, the
``lorkd_kd.json`` settings, the soft-label cache, the training-data integration and the ``lorkd-kd`` CLI.

See docs/distillation.md for the derivation of the target and the choice of the defaults.
"""

from .config import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, KDConfigError, KDSettings, TeacherRef
from .layout import RegionClassLayout
from .loss import DistillationLoss, SegmentationDistillationLoss
from .targets import kd_divergence, student_log_probs, target_distribution, target_logits

__all__ = [
    "DEFAULT_TEMPERATURE",
    "DEFAULT_WEIGHT",
    "DistillationLoss",
    "KDConfigError",
    "KDSettings",
    "RegionClassLayout",
    "SegmentationDistillationLoss",
    "TeacherRef",
    "kd_divergence",
    "student_log_probs",
    "target_distribution",
    "target_logits",
]
