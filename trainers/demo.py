"""Demo-length trainer variants (``lorkd-demo``): ``<base>_<suffix>`` for every preset of
:mod:`nnunetv2_lorkd.demo.presets`, e.g. ``nnUNetTrainerLoRKD_demoCPU``.

nnU-Net picks a training length only through the trainer class name, so each preset gets its own classes.
They set the epochs (for nnUNetTrainerSATStyle the teacher's own number), iterations per epoch and
validation iterations of the preset; for presets without test-time augmentation they clear the mirroring axes
used by the final validation and stored in the checkpoint (prediction of the model then never mirrors), and for
presets without a final validation they log that it is skipped (the demo's validation case is a training case,
so on the CPU presets the minute it costs per model buys nothing: every model is scored on the held-out test
parts instead).
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_lorkd_trainers._variants import schedule_variant
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from nnunetv2_lorkd_trainers.mtl import nnUNetTrainerMTL
from nnunetv2_lorkd_trainers.sat_style import nnUNetTrainerSATStyle

from nnunetv2_lorkd.demo.presets import PRESETS, Preset

BASES: tuple[type, ...] = (nnUNetTrainer, nnUNetTrainerSATStyle, nnUNetTrainerLoRKD, nnUNetTrainerMTL)


def _variant(base: type, preset: Preset) -> type:
    epochs = preset.teacher_epochs if base.__name__ == "nnUNetTrainerSATStyle" else preset.epochs

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

    doc = (
        f"{base.__name__} for lorkd-demo --preset {preset.name}: {epochs} epochs x {preset.iterations} iterations, "
        f"test-time mirroring {'on' if preset.tta else 'off'}."
    )
    return schedule_variant(
        base,
        preset.trainer(base.__name__),
        __name__,
        doc,
        epochs=epochs,
        iterations=preset.iterations,
        val_iterations=preset.val_iterations,
        overrides={
            "configure_rotation_dummyDA_mirroring_and_inital_patch_size": (
                configure_rotation_dummyDA_mirroring_and_inital_patch_size
            ),
            "perform_actual_validation": perform_actual_validation,
        },
    )


__all__: list[str] = []
for _preset in PRESETS.values():
    for _base in BASES:
        _cls = _variant(_base, _preset)
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
