"""nnUNetTrainerLoRKD with distillation, on a tiny preprocessed dataset (CPU, a few iterations): off without
lorkd_kd.json (said so), the exact loss of a KD step, a whole epoch with the KD curve in progress.png, the
teacher staying frozen, and the clear error for a missing cache."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
from kd_toy import FakeTeacher, make_trainer, nnunet_env, patch_load_teacher, teacher_folder, write_dataset
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from PIL import Image

from nnunetv2_lorkd.experts import route
from nnunetv2_lorkd.kd.cache import KDCacheError
from nnunetv2_lorkd.kd.config import KDSettings, TeacherRef, write_settings
from nnunetv2_lorkd.kd.data import KDDataLoader
from nnunetv2_lorkd.kd.loss import DistillationLoss, SegmentationDistillationLoss
from nnunetv2_lorkd.kd.progress import KD_LOSS_KEY, SEG_LOSS_KEY
from nnunetv2_lorkd.kd.teacher_inference import batch_probabilities
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss
from nnunetv2_lorkd.nnunet.runtime import OutputRestriction, RegionBalancedDataLoader

CLASSES = ("liver", "spleen", "urinary_bladder")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    env = nnunet_env(monkeypatch, str(tmp_path))
    return write_dataset(env["nnUNet_preprocessed"]), teacher_folder(str(tmp_path))


def _log(trainer) -> str:
    with open(trainer.log_file) as f:
        return f.read()


def test_without_kd_file_kd_is_off_and_says_so(toy):
    trainer = make_trainer(nnUNetTrainerLoRKD)
    assert trainer.distillation is None
    assert "Distillation: OFF" in _log(trainer) and "lorkd_kd.json does not exist" in _log(trainer)
    trainer.initialize()
    assert type(trainer.loss) is DeepSupervisionPartialLoss


def test_a_trainer_can_opt_out_of_distillation(toy):
    folder, model = toy
    write_settings(folder, "3d_fullres", KDSettings("nnUNetPlans", TeacherRef(model), "online", 1.0, 1.0, False))

    class LabelsOnly(nnUNetTrainerLoRKD):
        lorkd_distill = False

    assert make_trainer(nnUNetTrainerLoRKD).distillation is not None
    trainer = make_trainer(LabelsOnly)
    assert trainer.distillation is None
    assert "Distillation: OFF (LabelsOnly.lorkd_distill is False)" in _log(trainer)


def test_kd_train_step_loss_is_seg_plus_weighted_kd_on_the_same_patch(toy, monkeypatch):
    folder, model = toy
    teacher = FakeTeacher(CLASSES)
    assert teacher.norm.training  # the fake comes unfrozen on purpose
    before = {k: v.clone() for m in (teacher.norm, teacher.head) for k, v in m.state_dict().items()}
    patch_load_teacher(monkeypatch, teacher)
    write_settings(folder, "3d_fullres", KDSettings("nnUNetPlans", TeacherRef(model), "online", 0.7, 2.0, False))
    trainer = make_trainer(nnUNetTrainerLoRKD)
    assert "Distillation: ON (mode online, weight 0.7, temperature 2" in _log(trainer)
    trainer.on_train_start()
    assert isinstance(trainer.loss, SegmentationDistillationLoss)
    batch = next(trainer.dataloader_train)
    regions = trainer.region_map.region_ids(batch["keys"])
    mask = trainer.region_class_mask[regions]
    with torch.no_grad(), route(trainer.network, regions):
        outputs = trainer.network(batch["data"])
    trainer.loss.segmentation.set_class_mask(mask)
    seg = trainer.loss.segmentation(outputs, batch["target"])
    probs = batch_probabilities(teacher, batch["data"], regions, trainer.distillation.layout)
    weights = trainer.loss.segmentation.weights
    kd = DistillationLoss(trainer.distillation.layout, False, 2.0, weights)(outputs, probs, regions, mask)
    trainer.on_train_epoch_start()  # network.train() must not reach the teacher
    result = trainer.train_step(batch)
    assert float(result["loss"]) == pytest.approx(float(seg + 0.7 * kd), rel=1e-5)
    assert float(result["kd_loss"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(kd) > 0
    trainer.train_step(next(trainer.dataloader_train))

    # the teacher: eval mode, no gradients, weights and normalisation statistics unchanged
    assert not teacher.norm.training and not teacher.head.training
    for module in (teacher.norm, teacher.head):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    after = {k: v for m in (teacher.norm, teacher.head) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.on_train_end()


def test_the_kd_loader_serves_only_runs_that_distil_from_cached_soft_labels(toy):
    """Without distillation (or with an online teacher) nnU-Net's get_dataloaders builds the plain region-balanced
    loader, and its own loader class is back in place afterwards."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    folder, model = toy
    trainer = make_trainer(nnUNetTrainerLoRKD)
    trainer.on_train_start()
    assert type(trainer.dataloader_train.data_loader) is RegionBalancedDataLoader
    assert nnunet_trainer_module.nnUNetDataLoader is nnUNetDataLoader
    trainer.on_train_end()
    for mode, loader in (("online", RegionBalancedDataLoader), ("cached", KDDataLoader)):
        write_settings(folder, "3d_fullres", KDSettings("nnUNetPlans", TeacherRef(model), mode, 1.0, 1.0, False))
        assert make_trainer(nnUNetTrainerLoRKD)._data_loader_class() is loader


def test_final_validation_routes_each_case_as_nnunet_loads_it(toy):
    """nnU-Net's final validation loads each case through self.dataset_class right before predicting it: the
    routed dataset class hands the case to the trainer first, which routes and restricts the network to its region."""
    trainer = make_trainer(nnUNetTrainerLoRKD)
    trainer.initialize()
    routed: list[int | None] = []
    trainer._route_case = routed.append
    dataset_class = trainer._routed_dataset_class(trainer.dataset_class)
    assert issubclass(dataset_class, trainer.dataset_class)
    dataset = dataset_class(trainer.preprocessed_dataset_folder, ["abd_003", "pel_003"])
    trainer._output_restriction = OutputRestriction(trainer.network)
    try:
        dataset.load_case("pel_003")
        assert routed == [trainer.region_map.region_of_case("pel_003")]
        excluded = trainer._output_restriction.excluded.tolist()
        assert excluded == [False, True, True, False]  # background + urinary_bladder only
        dataset.load_case("abd_003")
        assert trainer._output_restriction.excluded.tolist() == [False, False, False, True]
    finally:
        trainer._output_restriction.remove()


@pytest.mark.slow
def test_online_kd_epoch_logs_and_plots_kd(toy, monkeypatch):
    folder, model = toy
    teacher = FakeTeacher(CLASSES)
    patch_load_teacher(monkeypatch, teacher)
    write_settings(folder, "3d_fullres", KDSettings("nnUNetPlans", TeacherRef(model), "online", 1.0, 1.0, False))
    trainer = make_trainer(nnUNetTrainerLoRKD, iterations=3)
    trainer.run_training()
    assert teacher.calls >= 3

    logged = trainer.logger.local_logger.my_fantastic_logging
    assert len(logged[KD_LOSS_KEY]) == 1 and math.isfinite(logged[KD_LOSS_KEY][0]) and logged[KD_LOSS_KEY][0] > 0
    assert math.isfinite(logged[SEG_LOSS_KEY][0])
    assert logged["train_losses"][0] == pytest.approx(logged[SEG_LOSS_KEY][0] + logged[KD_LOSS_KEY][0], rel=1e-5)
    assert "KD loss" in _log(trainer)
    # progress.png has nnU-Net's three panels plus the KD one: 4 rows of the same height
    width, height = Image.open(os.path.join(trainer.output_folder, "progress.png")).size
    assert height / width == pytest.approx(54 / 30 * 4 / 3, rel=0.01)
    with open(os.path.join(trainer.output_folder, "lorkd_kd.json")) as f:
        record = json.load(f)
    assert record["mode"] == "online" and record["weight"] == 1.0 and record["teacher_exclusive"] is False
    assert record["teacher_identity"]["checkpoint_sha256"]
    assert record["classes_per_region"] == {"abdomen": ["liver", "spleen"], "pelvis": ["urinary_bladder"]}
    checkpoint = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert checkpoint["logging"][KD_LOSS_KEY] == logged[KD_LOSS_KEY]


def test_cached_mode_without_cache_stops_before_training(toy, monkeypatch):
    folder, model = toy
    patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    write_settings(folder, "3d_fullres", KDSettings("nnUNetPlans", TeacherRef(model), "cached", 1.0, 1.0, False))
    trainer = make_trainer(nnUNetTrainerLoRKD)
    with pytest.raises(
        KDCacheError, match=r"no soft-label cache .* Run `lorkd-kd cache -d Dataset950_KDToy -c 3d_fullres`"
    ):
        trainer.on_train_start()
    assert not glob.glob(os.path.join(trainer.output_folder, "checkpoint_*.pth"))


def test_logger_resumes_a_checkpoint_without_kd_keys():
    """A run resumed from a checkpoint written without KD (or before this version) gets NaN-padded KD lists,
    so nnU-Net's plot (which plots as many epochs as its shortest list has) keeps working."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    from nnunetv2_lorkd.kd.progress import LoRKDLocalLogger

    old = LocalLogger()
    for key in old.my_fantastic_logging:
        old.my_fantastic_logging[key] = [0.5, 0.4]
    logger = LoRKDLocalLogger()
    logger.load_checkpoint(old.get_checkpoint())
    assert all(math.isnan(v) for v in logger.my_fantastic_logging[KD_LOSS_KEY])
    assert len(logger.my_fantastic_logging[SEG_LOSS_KEY]) == 2
    logger.log(KD_LOSS_KEY, 0.1, 2)
    assert logger.get_value(KD_LOSS_KEY, step=-1) == 0.1
