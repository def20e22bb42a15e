"""Distillation for one training run: what the LoRKD/MTL trainers delegate to.

The trainer reads the dataset's ``lorkd_kd.json`` when it is created (:meth:`Distillation.from_preprocessed`;
no entry for its configuration means no KD, logged explicitly), wraps its segmentation loss
(:meth:`Distillation.wrap_loss`), prepares the teacher or the cache when training starts
(:meth:`Distillation.prepare`, which raises for a missing or stale cache, or a teacher trained on the student's
validation cases (:mod:`nnunetv2_lorkd.kd.teacher_folds`), before any step), and asks for each batch's teacher
probabilities (:meth:`Distillation.batch_probabilities`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from nnunetv2_lorkd.files import write_json
from nnunetv2_lorkd.kd.cache import SoftLabelCache, cache_folder, dataset_class_of, teacher_identity, verify_cache
from nnunetv2_lorkd.kd.config import KDSettings, config_path, settings_for
from nnunetv2_lorkd.kd.data import SOFT_LABEL_KEY, CachedSoftLabels
from nnunetv2_lorkd.kd.layout import RegionClassLayout
from nnunetv2_lorkd.kd.loss import DistillationLoss, SegmentationDistillationLoss
from nnunetv2_lorkd.kd.teacher_folds import enforce_teacher_fold
from nnunetv2_lorkd.kd.teacher_inference import batch_probabilities, check_teacher_classes, load_configured_teacher
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss
from nnunetv2_lorkd.regions import RegionMap
from nnunetv2_lorkd.teachers import Teacher, TeacherError

RECORD_FILE = "lorkd_kd.json"


class Distillation:
    def __init__(
        self,
        settings: KDSettings,
        layout: RegionClassLayout,
        dataset_name: str,
        configuration: str,
        preprocessed_dataset_folder: str,
        data_identifier: str,
        case_sources: Mapping[str, str] | None = None,
    ):
        self.settings = settings
        self.layout = layout
        self.dataset_name = dataset_name
        self.configuration = configuration
        self.preprocessed_dataset_folder = preprocessed_dataset_folder
        self.data_identifier = data_identifier
        self.teacher: Teacher | None = None
        self.teacher_id: dict | None = None
        self.exclusive: bool | None = settings.teacher_exclusive
        # the student dataset's lorkd.case_sources: the teacher fold check matches patients through it
        self.case_sources: dict[str, str] = dict(case_sources or {})

    @classmethod
    def from_preprocessed(
        cls,
        preprocessed_dataset_folder: str | None,
        dataset_name: str,
        configuration: str,
        plans: str,
        data_identifier: str,
        region_map: RegionMap,
    ) -> tuple[Distillation | None, str]:
        """The run's distillation (None when off) and a log line saying which and why."""
        if preprocessed_dataset_folder is None:
            return None, "Distillation: off (nnUNet_preprocessed is not set)"
        settings = settings_for(preprocessed_dataset_folder, configuration, plans)
        path = config_path(preprocessed_dataset_folder)
        if settings is None:
            reason = (
                "does not exist" if not os.path.isfile(path) else f"has no entry for configuration '{configuration}'"
            )
            return None, (
                f"Distillation: OFF ({path} {reason}; "
                f"`lorkd-kd set -d {dataset_name} -c {configuration} --teacher ...` turns it on)"
            )
        kd = cls(
            settings,
            RegionClassLayout.from_region_map(region_map),
            dataset_name,
            configuration,
            preprocessed_dataset_folder,
            data_identifier,
            region_map.case_sources,
        )
        return kd, f"Distillation: ON ({kd.describe()}; from {path})"

    def describe(self) -> str:
        s = self.settings
        return (
            f"mode {s.mode}, weight {s.weight:g}, temperature {s.temperature:g}, teacher {s.teacher.model_folder} "
            f"fold {s.teacher.fold} {s.teacher.checkpoint}"
        )

    @property
    def cached(self) -> bool:
        return self.settings.mode == "cached"

    @property
    def cache_folder(self) -> str:
        return cache_folder(self.preprocessed_dataset_folder, self.data_identifier)

    def fix_command(self) -> str:
        plans = "" if self.settings.plans == "nnUNetPlans" else f" -p {self.settings.plans}"
        return f"lorkd-kd cache -d {self.dataset_name} -c {self.configuration}{plans}"

    # ---------------------------------------------------------------------------------------- loss
    def wrap_loss(self, segmentation: DeepSupervisionPartialLoss) -> SegmentationDistillationLoss:
        """The segmentation loss plus lambda * KD over the same deep-supervision outputs and weights. Whether
        the teacher is exclusive is settled by :meth:`prepare` (it loads the teacher or reads the cache)."""
        kd = DistillationLoss(self.layout, self.exclusive, self.settings.temperature, segmentation.weights)
        return SegmentationDistillationLoss(segmentation, kd, self.settings.weight)

    # ---------------------------------------------------------------------------------------- start
    def prepare(
        self,
        device: torch.device,
        dataset_tr,
        case_regions: dict[str, int],
        loss: SegmentationDistillationLoss,
        student: object | None = None,
        validation_cases: Sequence[str] | None = None,
        fold: int | str | None = None,
    ) -> str:
        """Before the first step: refuse a teacher trained on the student's validation cases (``validation_cases``
        and ``fold`` of this run; see :mod:`nnunetv2_lorkd.kd.teacher_folds`), then load the teacher (online; refused if
        its preprocessing differs from ``student``, a teachers.PreprocessingSpec) or check the cache and hand it to
        the training dataset (cached). Returns log text."""
        s = self.settings
        fold_note = self.check_teacher_fold(case_regions, validation_cases, fold)
        self.teacher_id = teacher_identity(s.teacher)
        if self.cached:
            manifest = verify_cache(
                self.cache_folder,
                self.teacher_id,
                self.layout,
                case_regions,
                os.path.join(self.preprocessed_dataset_folder, self.data_identifier),
                self.fix_command(),
            )
            self.exclusive = bool(manifest["teacher_exclusive"])
            dataset_tr.lorkd_soft_labels = CachedSoftLabels(
                SoftLabelCache(self.cache_folder),
                self.layout.max_classes,
                {case: self.layout.num_classes(r) for case, r in case_regions.items()},
            )
            note = (
                f"cached soft labels ({manifest['dtype']}) from {self.cache_folder}, {len(case_regions)} cases checked"
            )
        else:
            self.teacher = load_configured_teacher(s.teacher, device, student)
            check_teacher_classes(self.teacher, self.layout, dict(s.teacher.class_aliases))
            self.exclusive = bool(self.teacher.exclusive)
            note = f"online teacher {type(self.teacher).__name__} on {device}"
        if s.teacher_exclusive is not None and s.teacher_exclusive != self.exclusive:
            raise TeacherError(
                f"lorkd_kd.json says the teacher is {'exclusive' if s.teacher_exclusive else 'independent-sigmoid'}, "
                f"but it is not (anymore); rerun `lorkd-kd set` (and `lorkd-kd cache`)"
            )
        loss.distillation.exclusive = self.exclusive
        targets = "softmax" if self.exclusive else "sigmoid"
        return f"{fold_note}\nDistillation prepared: {note}, teacher {targets} targets"

    def check_teacher_fold(
        self,
        train_cases: Mapping[str, object] | Sequence[str],
        validation_cases: Sequence[str] | None = None,
        fold: int | str | None = None,
    ) -> str:
        """The teacher fold check for this run; raises TeacherFoldOverlapError. Without ``validation_cases`` they
        are taken as the preprocessed cases the student does not train on (said in the returned line)."""
        derived = ""
        if validation_cases is None:
            data_folder = os.path.join(self.preprocessed_dataset_folder, self.data_identifier)
            everything = dataset_class_of(data_folder).get_identifiers(data_folder)
            validation_cases = sorted(set(everything) - set(train_cases))
            derived = " [validation cases taken as the preprocessed cases the student does not train on]"
        line = enforce_teacher_fold(
            self.settings,
            self.dataset_name,
            self.configuration,
            self.case_sources,
            train_cases,
            validation_cases,
            os.path.dirname(os.path.abspath(self.preprocessed_dataset_folder)),
            fold,
        )
        return line + derived

    # ---------------------------------------------------------------------------------------- steps
    def batch_probabilities(self, batch: dict, data: torch.Tensor, region_ids: Sequence[int]) -> torch.Tensor:
        """(B, max_classes, *patch) teacher probabilities of this batch, on ``data``'s device."""
        if self.cached:
            probs = batch.get(SOFT_LABEL_KEY)
            if probs is None:
                raise RuntimeError(
                    "KD mode is 'cached' but the training batch has no soft labels: the training data loader is not "
                    "the KD loader (nnUNetTrainerLoRKD._data_loader_class must return KDDataLoader in cached mode)"
                )
            return probs.to(data.device, non_blocking=True)
        if self.teacher is None:
            raise RuntimeError("online KD: the teacher is not loaded; Distillation.prepare() must run before training")
        return batch_probabilities(self.teacher, data, region_ids, self.layout)

    def write_record(self, output_folder: str) -> str:
        """The settings this run used (plus the teacher's identity) in its output folder; atomic."""
        record = {
            "configuration": self.configuration,
            **self.settings.to_json(),
            "teacher_exclusive": self.exclusive,
            "teacher_identity": self.teacher_id,
            "cache_folder": self.cache_folder if self.cached else None,
            "classes_per_region": dict(zip(self.layout.region_names, map(list, self.layout.class_names), strict=True)),
        }
        return str(write_json(os.path.join(output_folder, RECORD_FILE), record))
