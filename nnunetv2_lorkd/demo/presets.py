"""The demo's presets: configuration, plans, training lengths and devices (kept import-light: the demo
trainers in ``trainers/demo.py`` read their lengths from here).

nnU-Net chooses a training length only through the trainer class name, so every preset has its own trainer
classes, ``<base trainer>_<suffix>`` (e.g. ``nnUNetTrainerLoRKD_demoCPU``), for the four trainers the demo
trains. The students, the MTL baseline and the specialists train for the same number of iterations, as
nnU-Net trains every dataset with the same schedule; the teacher stands for LoRKD's pre-trained foundation
model and may train longer. How the cpu presets' sizes were chosen, with the measurements: docs/demo.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# the demo passes each run's seed to its trainers in this variable (trainers/demo.py seeds Python, NumPy and torch)
SEED_VARIABLE = "LORKD_DEMO_SEED"
BASE_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSATStyle", "nnUNetTrainerLoRKD", "nnUNetTrainerMTL")


@dataclass(frozen=True)
class SmallNetwork:
    """Caps applied to nnU-Net's planned configuration for the CPU presets (written as their own plans)."""

    max_features: int  # features per stage: nnU-Net's divided by feature_divisor, at most this (at least 8)
    max_batch: int
    max_patch: int  # per axis, rounded down to a multiple of the network's total downsampling
    feature_divisor: int = 2


@dataclass(frozen=True)
class Preset:
    name: str
    suffix: str  # trainer class suffix
    plans: str  # plans identifier; a "small" preset writes it from nnUNetPlans (see `small_network`)
    small_network: SmallNetwork | None  # None: nnU-Net's plans as planned
    epochs: int  # every model but the teacher
    teacher_epochs: int  # the teacher plays the pre-trained foundation model: it may train longer
    iterations: int  # training iterations per epoch
    val_iterations: int  # validation iterations per epoch
    regions: tuple[str, ...]
    description: str
    configuration: str = "2d"  # nnU-Net configuration
    # mirroring as augmentation and at test time: off in every preset. Left and right organs (lungs, kidneys,
    # femurs, hips, gluteal muscles, iliopsoas) are different classes, and a mirrored slice shows a left organ
    # where the right one belongs (docs/demo.md, "No mirroring")
    tta: bool = False
    # the largest in-plane rotation of the augmentation, in degrees (None: nnU-Net's; its 2d rule rotates whole
    # slices by up to 180 degrees, which these consistently oriented CT scans never need)
    max_rotation_deg: float | None = 15.0
    final_validation: bool = False  # nnU-Net's final validation after training (the demo scores on test parts)
    device: str = "cpu"  # "cpu" or "cuda"
    # "online" (cheaper for short runs: no sliding-window pass over every case) or "cached"
    kd_mode: str = "online"
    # the LoRKD students and the MTL baseline start from the teacher's backbone (LoRKD decomposes a trained model;
    # the baseline gets the same start so that the comparison isolates experts + distillation)
    students_from_teacher: bool = True
    smoke: bool = False  # results are a smoke run (too short to judge the method)

    def trainer(self, base: str) -> str:
        if base not in BASE_TRAINERS:
            raise ValueError(f"no demo variant of {base}; known: {BASE_TRAINERS}")
        return f"{base}_{self.suffix}"


CT_REGIONS = ("abdomen", "pelvis", "cardiovascular", "thorax")

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        suffix="demoCPU",
        plans="nnUNetPlansDemoCPU",
        # the whole 3 mm slice in one patch; a quarter of nnU-Net's features (8 ... 128) to leave the budget for
        # iterations (measurements: docs/demo.md)
        small_network=SmallNetwork(max_features=128, max_batch=4, max_patch=128, feature_divisor=4),
        epochs=16,
        teacher_epochs=24,
        iterations=50,
        val_iterations=2,
        regions=CT_REGIONS,
        description="CPU RUN (<= 25 min on 2 cores): 2d, whole-slice patches (<= 128 x 128), a small network "
        "(features 8 ... 128, batch <= 4), 16 epochs x 50 iterations per model (the teacher 24), the LoRKD students "
        "and the MTL baseline starting from the teacher's backbone, no mirroring, rotation <= 15 degrees, no nnU-Net "
        "final validation",
    ),
    "gpu": Preset(
        name="gpu",
        suffix="demoGPU",
        configuration="3d_fullres",
        plans="nnUNetPlans",
        small_network=None,
        epochs=100,
        teacher_epochs=200,
        iterations=250,
        val_iterations=50,
        max_rotation_deg=None,
        final_validation=True,
        device="cuda",
        kd_mode="cached",
        regions=(*CT_REGIONS, "brain"),
        description="benchmark: 3d_fullres with nnU-Net's own plans, 100 epochs x 250 iterations per model (the "
        "teacher 200), no mirroring (left/right classes)",
    ),
    "tiny": Preset(
        name="tiny",
        suffix="demoTiny",
        plans="nnUNetPlansDemoTiny",
        small_network=SmallNetwork(max_features=32, max_batch=2, max_patch=64),
        epochs=1,
        teacher_epochs=1,
        iterations=4,
        val_iterations=1,
        smoke=True,
        regions=("abdomen", "pelvis"),
        description="TEST RUN (CI): 2d, a tiny network, 1 epoch x 4 iterations per model on two regions; it only "
        "checks that every stage runs",
    ),
}


# the longer CPU run: the cpu preset's network, data and augmentation with 3x its schedule
PRESETS["cpu-full"] = replace(
    PRESETS["cpu"],
    name="cpu-full",
    suffix="demoCPUFull",
    epochs=48,
    teacher_epochs=72,
    description="LONGER CPU RUN (about 1 h on 2 cores): the cpu preset's network, data and augmentation with 3x "
    "its schedule, 48 epochs x 50 iterations per model (the teacher 72)",
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
