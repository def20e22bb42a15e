"""``lorkd_kd.json``: whether and how a dataset's LoRKD/MTL trainers distil, per configuration.

It lives next to the plans in ``$nnUNet_preprocessed/DatasetXXX_NAME/`` and is written by ``lorkd-kd set``
(after the teacher was loaded and checked) and removed by ``lorkd-kd off``::

    {
      "version": 1,
      "configurations": {
        "3d_fullres": {
          "plans": "nnUNetPlans",
          "teacher": {"model_folder": "/abs/path/to/model", "fold": 0, "checkpoint": "checkpoint_final.pth",
                      "class_aliases": {}},
          "mode": "cached",
          "weight": 2.0,
          "temperature": 1.0,
          "teacher_exclusive": false,
          "allow_teacher_fold_overlap": false
        }
      }
    }

A configuration without an entry trains without KD (and says so in the training log).

``allow_teacher_fold_overlap`` (default false; ``lorkd-kd set --allow-teacher-fold-overlap``): training starts even
if the teacher was trained on the student fold's validation cases (see :mod:`nnunetv2_lorkd.kd.teacher_folds`), with a
WARNING naming them in the training log; by default such a run is refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from nnunetv2_lorkd.files import write_json

CONFIG_FILE = "lorkd_kd.json"
SCHEMA_VERSION = 1
MODES = ("online", "cached")
# defaults of `lorkd-kd set`; the weight comes from the ablation in docs/distillation.md
DEFAULT_WEIGHT = 2.0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


class KDConfigError(ValueError):
    """lorkd_kd.json is missing, malformed or does not fit this dataset/configuration."""


def parse_fold(value: object) -> int | str:
    if value == "all":
        return "all"
    if isinstance(value, bool):
        raise KDConfigError(f"teacher fold must be an integer >= 0 or 'all', got {value!r}")
    try:
        fold = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KDConfigError(f"teacher fold must be an integer >= 0 or 'all', got {value!r}") from None
    if fold < 0 or str(fold) != str(value).strip():
        raise KDConfigError(f"teacher fold must be an integer >= 0 or 'all', got {value!r}")
    return fold


@dataclass(frozen=True)
class TeacherRef:
    model_folder: str
    fold: int | str = 0
    checkpoint: str = DEFAULT_CHECKPOINT
    # student class name -> teacher class name, where they differ beyond case and '_'/'-'/space
    class_aliases: tuple[tuple[str, str], ...] = ()

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.model_folder, f"fold_{self.fold}", self.checkpoint)


@dataclass(frozen=True)
class KDSettings:
    """One configuration's KD settings."""

    plans: str
    teacher: TeacherRef
    mode: str = "online"
    weight: float = DEFAULT_WEIGHT
    temperature: float = DEFAULT_TEMPERATURE
    teacher_exclusive: bool | None = None  # what the teacher said when it was checked (informational)
    # train even if the teacher saw the student's validation cases (warned in the log); see kd/teacher_folds.py
    allow_teacher_fold_overlap: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KDConfigError(f"KD mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.allow_teacher_fold_overlap, bool):
            raise KDConfigError(
                f"allow_teacher_fold_overlap must be true or false, got {self.allow_teacher_fold_overlap!r}"
            )
        for name in ("weight", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                hint = " (to train without KD, run `lorkd-kd off`)" if name == "weight" else ""
                raise KDConfigError(f"KD {name} must be a finite number > 0, got {value!r}{hint}")
        if not self.plans or not isinstance(self.plans, str):
            raise KDConfigError(f"KD plans identifier must be a non-empty string, got {self.plans!r}")
        if not isinstance(self.teacher.model_folder, str) or not self.teacher.model_folder:
            raise KDConfigError("KD teacher.model_folder must be a path")
        parse_fold(self.teacher.fold)

    def to_json(self) -> dict:
        data = asdict(self)
        data["teacher"]["class_aliases"] = dict(self.teacher.class_aliases)
        return data

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> KDSettings:
        if not isinstance(data, Mapping):
            raise KDConfigError(f"{where} must be an object")
        known = {"plans", "teacher", "mode", "weight", "temperature", "teacher_exclusive", "allow_teacher_fold_overlap"}
        unknown = set(data) - known
        if unknown:
            raise KDConfigError(f"{where} has unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        missing = {"plans", "teacher"} - set(data)
        if missing:
            raise KDConfigError(f"{where} lacks {sorted(missing)}")
        teacher = data["teacher"]
        if not isinstance(teacher, Mapping) or "model_folder" not in teacher:
            raise KDConfigError(f"{where}.teacher must be an object with at least 'model_folder'")
        bad = set(teacher) - {"model_folder", "fold", "checkpoint", "class_aliases"}
        if bad:
            raise KDConfigError(f"{where}.teacher has unknown keys {sorted(bad)}")
        aliases = teacher.get("class_aliases") or {}
        if not isinstance(aliases, Mapping) or not all(isinstance(v, str) for v in aliases.values()):
            raise KDConfigError(f"{where}.teacher.class_aliases must map student class names to teacher class names")
        ref = TeacherRef(
            str(teacher["model_folder"]),
            parse_fold(teacher.get("fold", 0)),
            str(teacher.get("checkpoint", DEFAULT_CHECKPOINT)),
            tuple(sorted((str(k), v) for k, v in aliases.items())),
        )
        try:
            return cls(
                plans=data["plans"],
                teacher=ref,
                mode=data.get("mode", "online"),
                weight=data.get("weight", DEFAULT_WEIGHT),
                temperature=data.get("temperature", DEFAULT_TEMPERATURE),
                teacher_exclusive=data.get("teacher_exclusive"),
                allow_teacher_fold_overlap=data.get("allow_teacher_fold_overlap", False),
            )
        except KDConfigError as e:
            raise KDConfigError(f"{where}: {e}") from None


def config_path(preprocessed_dataset_folder: str) -> str:
    return os.path.join(preprocessed_dataset_folder, CONFIG_FILE)


def read_config(preprocessed_dataset_folder: str) -> dict[str, KDSettings] | None:
    """All configurations' settings, or None when the dataset has no lorkd_kd.json."""
    path = config_path(preprocessed_dataset_folder)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise KDConfigError(f"{path} is not valid JSON ({e}); rewrite it with `lorkd-kd set` or remove it") from None
    if not isinstance(data, Mapping) or data.get("version") != SCHEMA_VERSION:
        raise KDConfigError(f"{path}: expected an object with version {SCHEMA_VERSION}; rewrite it with `lorkd-kd set`")
    configurations = data.get("configurations")
    if not isinstance(configurations, Mapping):
        raise KDConfigError(f"{path}: 'configurations' must be an object of configuration name -> settings")
    return {
        name: KDSettings.from_json(entry, f"{path}: configurations.{name}") for name, entry in configurations.items()
    }


def settings_for(preprocessed_dataset_folder: str, configuration: str, plans: str) -> KDSettings | None:
    """The settings a trainer of (plans, configuration) uses, or None when KD is off for it."""
    config = read_config(preprocessed_dataset_folder)
    if config is None or configuration not in config:
        return None
    settings = config[configuration]
    if settings.plans != plans:
        raise KDConfigError(
            f"{config_path(preprocessed_dataset_folder)}: the KD entry for configuration '{configuration}' was set "
            f"for plans '{settings.plans}', but this trainer uses plans '{plans}'. Run `lorkd-kd set ... -p {plans}` "
            "(or `lorkd-kd off`)."
        )
    return settings


def write_settings(preprocessed_dataset_folder: str, configuration: str, settings: KDSettings) -> str:
    """Add or replace one configuration's entry (other configurations are kept); atomic."""
    existing = read_config(preprocessed_dataset_folder) or {}
    existing[configuration] = settings
    path = config_path(preprocessed_dataset_folder)
    write_json(
        path,
        {"version": SCHEMA_VERSION, "configurations": {k: v.to_json() for k, v in sorted(existing.items())}},
    )
    return path


def remove_settings(preprocessed_dataset_folder: str, configuration: str | None = None) -> bool:
    """Turn KD off for one configuration (or, without one, the whole dataset). False if it was off already."""
    existing = read_config(preprocessed_dataset_folder)
    path = config_path(preprocessed_dataset_folder)
    if existing is None:
        return False
    if configuration is None:
        os.remove(path)
        return True
    if configuration not in existing:
        return False
    del existing[configuration]
    if existing:
        write_json(
            path, {"version": SCHEMA_VERSION, "configurations": {k: v.to_json() for k, v in sorted(existing.items())}}
        )
    else:
        os.remove(path)
    return True
