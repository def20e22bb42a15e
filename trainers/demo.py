"""Demo-length trainer variants (``lorkd-demo``): ``<base>_<suffix>`` for every preset of
:mod:`nnunetv2_lorkd.demo.presets`, e.g. ``nnUNetTrainerLoRKD_demoCPU``.

nnU-Net picks a training length only through the trainer class name, so each preset gets its own classes.
They set the epochs (for nnUNetTrainerSATStyle the teacher's own number), iterations per epoch and
validation iterations of the preset; they switch mirroring off in training and in prediction (left and right
organs are different classes), cap the rotation of the augmentation where the preset says so, seed Python,
NumPy and torch with the demo's seed (``LORKD_DEMO_SEED``), and for presets without a final validation they
log that it is skipped (the demo's validation case is a training case, so on the CPU presets the minute it
costs per model buys nothing: every model is scored on the held-out test parts instead).
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_lorkd_trainers._variants import schedule_variant
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from nnunetv2_lorkd_trainers.mtl import nnUNetTrainerMTL
from nnunetv2_lorkd_trainers.sat_style import nnUNetTrainerSATStyle

from nnunetv2_lorkd.demo.presets import PRESETS, SEED_VARIABLE, Preset

BASES: tuple[type, ...] = (nnUNetTrainer, nnUNetTrainerSATStyle, nnUNetTrainerLoRKD, nnUNetTrainerMTL)


def _variant(base: type, preset: Preset) -> type:
    epochs = preset.teacher_epochs if base.__name__ == "nnUNetTrainerSATStyle" else preset.epochs

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(
            self
        )
        # no mirroring, neither as augmentation nor at test time: left and right organs are different classes
        self.inference_allowed_mirroring_axes = None
        if preset.max_rotation_deg is not None:
            limit = min(abs(rotation[1]), math.radians(preset.max_rotation_deg))
            rotation = (-limit, limit)
            patch_size = self.configuration_manager.patch_size
            dim = len(patch_size)
            initial_patch_size = get_patch_size(patch_size[-dim:], rotation, rotation, rotation, (0.85, 1.25))
            if dummy_2d:
                initial_patch_size[0] = patch_size[0]
        self.print_to_log_file(
            f"lorkd-demo --preset {preset.name}: no mirroring (left/right classes), rotation up to "
            f"{math.degrees(rotation[1]):.0f} degrees"
        )
        return rotation, dummy_2d, initial_patch_size, None

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if preset.final_validation:
            base.perform_actual_validation(self, save_probabilities)
            return
        self.print_to_log_file(
            f"lorkd-demo --preset {preset.name}: nnU-Net's final validation is skipped; the demo scores this model on "
            "the held-out test parts instead (its validation case is a training case)",
            also_print_to_console=True,
        )

    def initialize(self) -> None:
        # nnU-Net seeds nothing; the demo's repeats (--seeds) differ only by this seed, and a repeat of one seed
        # starts from the same weights and draws the same first batches (CPU kernels may still differ in the
        # last bits)
        seed = os.environ.get(SEED_VARIABLE)
        if seed is not None:
            random.seed(int(seed))
            np.random.seed(int(seed))
            torch.manual_seed(int(seed))
            self.print_to_log_file(f"lorkd-demo: seed {int(seed)} ({SEED_VARIABLE})")
        base.initialize(self)

    doc = (
        f"{base.__name__} for lorkd-demo --preset {preset.name}: {epochs} epochs x {preset.iterations} iterations, "
        "no mirroring (training or test time)"
        + ("" if preset.max_rotation_deg is None else f", rotation <= {preset.max_rotation_deg:g} degrees")
        + "."
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
            "initialize": initialize,
        },
    )


__all__: list[str] = []
for _preset in PRESETS.values():
    for _base in BASES:
        _cls = _variant(_base, _preset)
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
