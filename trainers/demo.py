"""Demo-length trainer variants (``lorkd-demo``): ``<base>_<suffix>`` for every preset of
:mod:`nnunetv2_lorkd.demo.presets`, e.g. ``nnUNetTrainerLoRKD_demoCPU``.

nnU-Net picks a training length only through the trainer class name, so each preset gets its own classes.
They set the epochs (for nnUNetTrainerSATStyle the teacher's own number), iterations per epoch and
validation iterations of the preset; for presets without test-time augmentation they clear the mirroring axes
used by the final validation and stored in the checkpoint (prediction of the model then never mirrors), and for
presets without a final validation they log that it is skipped (the demo's validation case is a training case,
so on the CPU presets the minute it costs per model buys nothing: every model is scored on the held-out test
parts instead).

``nnUNetTrainerSATStyle`` and ``nnUNetTrainerMTL`` come from their own modules; when such a module does not
exist (yet), its variants are not defined here and ``lorkd-demo`` refuses to start, naming the missing
trainer. Any other import error is raised.
"""

from __future__ import annotations

import importlib

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_lorkd.demo.presets import PRESETS, Preset

from .lorkd import nnUNetTrainerLoRKD


def _optional_base(module: str, name: str) -> type | None:
    try:
        return getattr(importlib.import_module(f"nnunetv2_lorkd_trainers.{module}"), name)
    except ModuleNotFoundError as error:
        if error.name != f"nnunetv2_lorkd_trainers.{module}":
            raise
        return None


BASES: dict[str, type | None] = {
    "nnUNetTrainer": nnUNetTrainer,
    "nnUNetTrainerSATStyle": _optional_base("sat_style", "nnUNetTrainerSATStyle"),
    "nnUNetTrainerLoRKD": nnUNetTrainerLoRKD,
    "nnUNetTrainerMTL": _optional_base("mtl", "nnUNetTrainerMTL"),
}


def _variant(base: type, preset: Preset) -> type:
    epochs = preset.teacher_epochs if base.__name__ == "nnUNetTrainerSATStyle" else preset.epochs

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_iterations_per_epoch = preset.iterations
        self.num_val_iterations_per_epoch = preset.val_iterations

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        result = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        if not preset.tta:  # training augmentation keeps mirroring; only inference stops mirroring
            self.inference_allowed_mirroring_axes = None
        return result

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if preset.final_validation:
            base.perform_actual_validation(self, save_probabilities)
            return
        self.print_to_log_file(
            f"lorkd-demo --preset {preset.name}: nnU-Net's final validation is skipped; the demo scores this model on "
            "the held-out test parts instead (its validation case is a training case)",
            also_print_to_console=True,
        )

    name = preset.trainer(base.__name__)
    return type(
        name,
        (base,),
        {
            "__init__": __init__,
            "configure_rotation_dummyDA_mirroring_and_inital_patch_size": (
                configure_rotation_dummyDA_mirroring_and_inital_patch_size
            ),
            "perform_actual_validation": perform_actual_validation,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} for lorkd-demo --preset {preset.name}: {epochs} epochs x "
            f"{preset.iterations} iterations, test-time mirroring {'on' if preset.tta else 'off'}.",
        },
    )


__all__: list[str] = []
for _preset in PRESETS.values():
    for _base in BASES.values():
        if _base is not None:
            _cls = _variant(_base, _preset)
            globals()[_cls.__name__] = _cls
            __all__.append(_cls.__name__)
