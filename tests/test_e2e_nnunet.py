"""End to end through the real commands, on a tiny synthetic 3-region dataset (CPU):
lorkd-merge -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train -tr nnUNetTrainerLoRKD_smoke -> resume (--c)
-> lorkd-fuse --verify -> nnUNetv2_predict -tr nnUNetTrainer where nnunetv2_lorkd cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from synthetic import REGIONS, write_region_dataset, write_test_image

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(args: list[str], env: dict, cwd: Path | None = None) -> str:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def nn_env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nnunet")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}  # discovery must need no variable
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_def_n_proc="1",
        root=str(root),
    )
    for region in REGIONS:
        write_region_dataset(env["nnUNet_raw"], region, num_cases=4)
    _run([str(BIN / "lorkd-merge"), "-i", "901", "abdomen", "-i", "902", "pelvis", "-i", "903", "thorax",
          "-d", "900", "-n", "Merged"], env)  # fmt: skip
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "900", "-c", "3d_fullres", "2d", "-np", "1"], env)
    shadow = root / "shadow"
    for package in ("nnunetv2_lorkd", "nnunetv2_lorkd_trainers"):  # the plugin is "not installed"
        (shadow / package).mkdir(parents=True)
        (shadow / package / "__init__.py").write_text("raise ImportError('nnunetv2-lorkd is not installed')\n")
    test_images = root / "test_images"
    test_images.mkdir()
    write_test_image(str(test_images / "new_000_0000.nii.gz"), "pelvis")
    return env


def _train_fuse_predict(env: dict, configuration: str) -> tuple[Path, Path]:
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    out = _run([str(BIN / "nnUNetv2_train"), "900", configuration, "0", "-tr", "nnUNetTrainerLoRKD_smoke",
                "-device", "cpu"], train_env)  # fmt: skip
    assert "Pseudo dice per region: abdomen" in out
    results = Path(env["nnUNet_results"]) / "Dataset900_Merged"
    model = results / f"nnUNetTrainerLoRKD_smoke__nnUNetPlans__{configuration}"
    regions_summary = json.loads((model / "fold_0" / "validation" / "summary_lorkd_regions.json").read_text())
    assert set(regions_summary) <= set(REGIONS) and regions_summary
    out = _run([str(BIN / "lorkd-fuse"), "-d", "900", "-c", configuration, "-tr", "nnUNetTrainerLoRKD_smoke",
                "--region", "all", "--verify"], env)  # fmt: skip
    assert out.count("max |routed - fused|") == 3
    fused = results / f"nnUNetTrainer__nnUNetPlans_pelvis__{configuration}"
    assert json.loads((fused / "dataset.json").read_text())["labels"] == {
        "background": 0, "urinary_bladder": 1, "femur_left": 2}  # fmt: skip

    bare = {**env, "PYTHONPATH": str(Path(env["root"]) / "shadow")}
    probe = subprocess.run(
        [sys.executable, "-c", "import nnunetv2_lorkd"], env=bare, cwd=env["root"], capture_output=True, text=True
    )
    assert probe.returncode != 0 and "not installed" in probe.stderr
    predictions = Path(env["root"]) / f"pred_{configuration}"
    _run([str(BIN / "nnUNetv2_predict"), "-i", str(Path(env["root"]) / "test_images"), "-o", str(predictions),
          "-d", "900", "-c", configuration, "-tr", "nnUNetTrainer", "-p", "nnUNetPlans_pelvis", "-f", "0",
          "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"], bare, cwd=Path(env["root"]))  # fmt: skip
    return model, predictions


def _check_prediction(env: dict, predictions: Path) -> None:
    image = sitk.ReadImage(str(Path(env["root"]) / "test_images" / "new_000_0000.nii.gz"))
    seg = sitk.ReadImage(str(predictions / "new_000.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}  # only the pelvis labels
    assert seg.GetSize() == image.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(seg.GetDirection(), image.GetDirection())


def test_3d_merge_train_resume_fuse_vanilla_predict(nn_env, monkeypatch):
    model, predictions = _train_fuse_predict(nn_env, "3d_fullres")
    _check_prediction(nn_env, predictions)

    # resume (--c) goes through nnU-Net's own loader: every expert weight is restored bit-exactly
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, nn_env[key])
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainer = get_trainer_from_args("900", "3d_fullres", 0, "nnUNetTrainerLoRKD_smoke", device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    saved = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = trainer.network.state_dict()
    expert_keys = [k for k in saved["network_weights"] if ".lora_" in k]
    assert expert_keys and set(state) == set(saved["network_weights"])
    assert all(torch.equal(state[k], saved["network_weights"][k]) for k in saved["network_weights"])
    assert type(trainer).__module__ == "nnunetv2_lorkd_trainers.lorkd"  # one copy of the class, its real home


def test_2d_train_fuse_vanilla_predict(nn_env):
    _, predictions = _train_fuse_predict(nn_env, "2d")
    _check_prediction(nn_env, predictions)
