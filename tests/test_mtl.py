"""nnUNetTrainerMTL: the same nnU-Net network without experts, with LoRKD's partial-label training, sampling,
region-restricted validation and optional distillation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from kd_toy import FakeTeacher, make_trainer, nnunet_env, patch_load_teacher, teacher_folder, write_dataset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from nnunetv2_lorkd_trainers.mtl import nnUNetTrainerMTL, nnUNetTrainerMTL_5epochs, nnUNetTrainerMTL_smoke

from nnunetv2_lorkd.experts import ExpertLayer
from nnunetv2_lorkd.kd.cli import main as lorkd_kd
from nnunetv2_lorkd.kd.progress import KD_LOSS_KEY
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss
from nnunetv2_lorkd.nnunet.config import PLANS_KEY

CLASSES = ("liver", "spleen", "urinary_bladder")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    env = nnunet_env(monkeypatch, str(tmp_path))
    return write_dataset(env["nnUNet_preprocessed"]), teacher_folder(str(tmp_path))


def test_mtl_is_the_plain_network_with_the_partial_label_loss(toy):
    trainer = make_trainer(nnUNetTrainerMTL)
    trainer.initialize()
    assert not any(isinstance(m, ExpertLayer) for m in trainer.network.modules())
    plain = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads, True
    )
    assert trainer.network.state_dict().keys() == plain.state_dict().keys()
    assert PLANS_KEY not in trainer.plans_manager.plans["configurations"]["3d_fullres"]
    assert type(trainer.loss) is DeepSupervisionPartialLoss and trainer.lorkd_region_sampling == "balanced"
    with open(trainer.log_file) as f:
        assert "MTL baseline" in f.read()
    # the LoRKD trainer on the same plans has experts: the only difference is the network
    lorkd = make_trainer(nnUNetTrainerLoRKD)
    lorkd.initialize()
    assert any(isinstance(m, ExpertLayer) for m in lorkd.network.modules())


def test_mtl_variants_are_found_by_nnunet():
    import nnunetv2_lorkd_trainers.mtl as mtl
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    assert {"nnUNetTrainerMTL", "nnUNetTrainerMTL_smoke", "nnUNetTrainerMTL_5epochs"} <= set(mtl.__all__)
    assert all(issubclass(getattr(mtl, name), nnUNetTrainerMTL) for name in mtl.__all__)
    assert nnUNetTrainerMTL_5epochs.__module__ == "nnunetv2_lorkd_trainers.mtl"
    assert recursive_find_trainer_class_by_name("nnUNetTrainerMTL_smoke") is nnUNetTrainerMTL_smoke


def test_mtl_train_step_with_mixed_regions(toy):
    trainer = make_trainer(nnUNetTrainerMTL)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    before = [p.detach().clone() for p in trainer.network.parameters()]
    result = trainer.train_step(next(trainer.dataloader_train))
    assert math.isfinite(float(result["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.network.parameters(), strict=True))
    trainer.on_train_end()


@pytest.mark.slow
def test_mtl_trains_with_cached_kd_and_validates_by_region(toy, monkeypatch):
    _, model = toy
    patch_load_teacher(monkeypatch, FakeTeacher(CLASSES, exclusive=True))
    assert (
        lorkd_kd(["set", "-d", "950", "-c", "3d_fullres", "--teacher", model, "--mode", "cached", "--device", "cpu"])
        == 0
    )
    assert lorkd_kd(["cache", "-d", "950", "-c", "3d_fullres", "--device", "cpu", "--dtype", "float16"]) == 0
    trainer = make_trainer(nnUNetTrainerMTL, iterations=3)
    trainer.run_training()
    trainer.inference_allowed_mirroring_axes = None  # no test-time mirroring: 8x fewer forwards on CPU
    trainer.perform_actual_validation()
    with open(trainer.log_file) as f:
        log = f.read()
    assert "Distillation prepared: cached soft labels (float16)" in log
    assert math.isfinite(trainer.logger.get_value(KD_LOSS_KEY, step=-1))
    with open(os.path.join(trainer.output_folder, "validation", "summary_lorkd_regions.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"abdomen", "pelvis"}
    assert "Final validation, region abdomen" in log
    weights = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert not any(".lora_" in k for k in weights["network_weights"])
    with open(os.path.join(trainer.output_folder_base, "plans.json")) as f:
        assert PLANS_KEY not in json.load(f)["configurations"]["3d_fullres"]
