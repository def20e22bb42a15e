"""End to end with distillation, through the real commands on the tiny synthetic 3-region dataset (CPU):
nnUNetv2_train -tr nnUNetTrainerSATStyle_smoke (the teacher) -> lorkd-kd set -> lorkd-kd cache -np 2
-> nnUNetv2_train -tr nnUNetTrainerLoRKD_smoke (KD from the cache) -> lorkd-fuse -> vanilla nnUNetv2_predict.

Dataset, training-fuse-prediction and prediction checks are test_e2e_nnunet's own helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_e2e_nnunet import BIN, _check_prediction, _run, _train_fuse_predict, nn_env  # noqa: F401 (fixture)

from nnunetv2_lorkd.kd.progress import KD_LOSS_KEY

pytestmark = pytest.mark.slow


def test_sat_teacher_cached_kd_lorkd_fuse_vanilla_predict(nn_env):  # noqa: F811
    env = nn_env
    _run([str(BIN / "nnUNetv2_train"), "900", "3d_fullres", "0", "-tr", "nnUNetTrainerSATStyle_smoke",
          "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"})  # fmt: skip
    results = Path(env["nnUNet_results"]) / "Dataset900_Merged"
    teacher = results / "nnUNetTrainerSATStyle_smoke__nnUNetPlans__3d_fullres"

    out = _run([str(BIN / "lorkd-kd"), "set", "-d", "900", "-c", "3d_fullres", "--teacher", str(teacher),
                "--mode", "cached", "--weight", "1", "--temperature", "1", "--device", "cpu"], env)  # fmt: skip
    assert "independent sigmoids" in out and "Next: lorkd-kd cache" in out
    out = _run([str(BIN / "lorkd-kd"), "cache", "-d", "900", "-c", "3d_fullres", "-np", "2", "--device", "cpu"], env)
    assert "Soft labels of 12 cases" in out
    out = _run([str(BIN / "lorkd-kd"), "show", "-d", "900"], env)
    assert "up to date (12 cases, uint8)" in out

    model, predictions = _train_fuse_predict(env, "3d_fullres")  # trains with KD: lorkd_kd.json is set
    _check_prediction(env, predictions)
    fold = model / "fold_0"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "Distillation: ON (mode cached" in log and "Distillation prepared: cached soft labels (uint8)" in log
    record = json.loads((fold / "lorkd_kd.json").read_text())
    assert record["mode"] == "cached" and record["teacher_exclusive"] is False
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    kd = checkpoint["logging"][KD_LOSS_KEY]
    assert len(kd) == 1 and math.isfinite(kd[0]) and kd[0] > 0
    assert (fold / "progress.png").is_file()
