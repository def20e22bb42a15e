"""The demo's presets: configuration, plans, training lengths and devices (kept import-light: the demo
trainers in ``trainers/demo.py`` read their lengths from here).

nnU-Net chooses a training length only through the trainer class name, so every preset has its own trainer
classes, ``<base trainer>_<suffix>`` (e.g. ``nnUNetTrainerLoRKD_demoCPU``), for the four trainers the demo
trains: ``nnUNetTrainer`` (specialists), ``nnUNetTrainerSATStyle`` (teacher), ``nnUNetTrainerLoRKD``
(students) and ``nnUNetTrainerMTL`` (baseline). The students, the MTL baseline and the specialists train for
the same number of epochs and iterations (as nnU-Net trains every dataset with the same schedule); the teacher,
which stands for LoRKD's pre-trained foundation model, trains longer: its independent sigmoid classes need
far longer than softmax models before any probability crosses 0.5. On the cpu preset it predicted
background everywhere after 480 and after 960 iterations (Dice 0 on every region); its pseudo-Dice first
rose above 0 after about 1500 iterations, so it gets 2560 (64 epochs of 40). On the gpu preset it trains
twice as long as the students.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSATStyle", "nnUNetTrainerLoRKD", "nnUNetTrainerMTL")


@dataclass(frozen=True)
class SmallNetwork:
    """Caps applied to nnU-Net's planned configuration for the CPU presets (written as their own plans)."""

    max_features: int  # features per stage: half of nnU-Net's, at most this
    max_batch: int
    max_patch: int  # per axis, rounded down to a multiple of the network's total downsampling


@dataclass(frozen=True)
class Preset:
    name: str
    suffix: str  # trainer class suffix
    configuration: str  # nnU-Net configuration
    plans: str  # plans identifier; a "small" preset writes it from nnUNetPlans (see `small_network`)
    small_network: SmallNetwork | None  # None: nnU-Net's plans as planned
    epochs: int  # every model but the teacher
    teacher_epochs: int  # the teacher plays the pre-trained foundation model: it may train longer
    iterations: int  # training iterations per epoch
    val_iterations: int  # validation iterations per epoch
    tta: bool  # mirroring at validation and prediction
    final_validation: bool  # nnU-Net's final validation after training (the demo scores on test parts anyway)
    device: str  # "cpu" or "cuda"
    kd_mode: str  # "online" (cheaper for short runs: no sliding-window pass over every case) or "cached"
    smoke: bool  # results are a smoke run (too short to judge the method)
    regions: tuple[str, ...]
    description: str

    def trainer(self, base: str) -> str:
        if base not in BASE_TRAINERS:
            raise ValueError(f"no demo variant of {base}; known: {BASE_TRAINERS}")
        return f"{base}_{self.suffix}"


CT_REGIONS = ("abdomen", "pelvis", "cardiovascular", "thorax")

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        suffix="demoCPU",
        configuration="2d",
        plans="nnUNetPlansDemoCPU",
        small_network=SmallNetwork(max_features=64, max_batch=4, max_patch=64),
        epochs=12,
        teacher_epochs=64,
        iterations=40,
        val_iterations=2,
        tta=False,
        final_validation=False,
        device="cpu",
        kd_mode="online",
        smoke=True,
        regions=CT_REGIONS,
        description="SMOKE RUN: 2d, a small network (features <= 64, batch <= 4, patch <= 64 x 64), 12 epochs x 40 "
        "iterations per model (the teacher 64), no test-time mirroring, no nnU-Net final validation; it shows that "
        "the pipeline works end to end, it cannot show what the method achieves",
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
        tta=True,
        final_validation=True,
        device="cuda",
        kd_mode="cached",
        smoke=False,
        regions=(*CT_REGIONS, "brain"),
        description="benchmark: 3d_fullres with nnU-Net's own plans, 100 epochs x 250 iterations per model (the "
        "teacher 200), test-time mirroring",
    ),
    "tiny": Preset(
        name="tiny",
        suffix="demoTiny",
        configuration="2d",
        plans="nnUNetPlansDemoTiny",
        small_network=SmallNetwork(max_features=32, max_batch=2, max_patch=64),
        epochs=1,
        teacher_epochs=1,
        iterations=4,
        val_iterations=1,
        tta=False,
        final_validation=False,
        device="cpu",
        kd_mode="online",
        smoke=True,
        regions=("abdomen", "pelvis"),
        description="TEST RUN (CI): 2d, a tiny network, 1 epoch x 4 iterations per model on two regions; it only "
        "checks that every stage runs",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
