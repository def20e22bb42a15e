"""-pretrained_weights for the LoRKD and MTL trainers: W0 and the class-matched heads from any nnU-Net checkpoint
of the same plans, experts fresh, through nnU-Net's own flag."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from kd_toy import make_trainer, nnunet_env, write_dataset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from nnunetv2_lorkd_trainers.mtl import nnUNetTrainerMTL
from synthetic import write_region_dataset
from test_e2e_nnunet import BIN, _run

from nnunetv2_lorkd.experts import expert_layers, fuse_expert, route
from nnunetv2_lorkd.fuse import SEG_HEAD_KEY
from nnunetv2_lorkd.nnunet.pretrained import PretrainedWeightsError
from nnunetv2_lorkd.sat import PromptedUNet, SATConfig


@pytest.fixture
def toy(tmp_path, monkeypatch):
    write_dataset(nnunet_env(monkeypatch, str(tmp_path))["nnUNet_preprocessed"])
    return tmp_path


def _plain_network(trainer, num_outputs: int, configuration: str = "3d_fullres") -> torch.nn.Module:
    cm = trainer.plans_manager.get_configuration(configuration)
    return nnUNetTrainer.build_network_architecture(trainer.plans_manager, cm, 1, num_outputs, True)


def _save(path: Path, weights: dict, dataset_json: dict | None, trainer_name: str = "nnUNetTrainer") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    init_args: dict = {"configuration": "3d_fullres"}
    if dataset_json is not None:
        init_args["dataset_json"] = dataset_json
    checkpoint = {"network_weights": weights, "trainer_name": trainer_name, "init_args": init_args}
    torch.save(checkpoint, path)
    return str(path)


def _heads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if SEG_HEAD_KEY.search(k)}


def _log(trainer) -> str:
    with open(trainer.log_file) as f:
        return f.read()


def test_lorkd_from_mtl_checkpoint_through_nnunet_flag_equals_the_source(toy):
    from nnunetv2.run.run_training import maybe_load_checkpoint

    mtl = make_trainer(nnUNetTrainerMTL)
    mtl.initialize()
    checkpoint = os.path.join(mtl.output_folder, "checkpoint_final.pth")
    mtl.save_checkpoint(checkpoint)  # nnU-Net's own checkpoint format, dataset.json in its init_args
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]

    lorkd = make_trainer(nnUNetTrainerLoRKD)
    maybe_load_checkpoint(lorkd, continue_training=False, validation_only=False, pretrained_weights_file=checkpoint)

    state = lorkd.network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # backbone and every head row
    layers = expert_layers(lorkd.network)
    assert layers and all(not b.any() for layer in layers for b in layer.lora_B)
    for region in (0, 1):  # W0 keys are the vanilla keys, and each region's fused network is the source, bit for bit
        fused = fuse_expert(lorkd.network, region).state_dict()
        assert fused.keys() == saved.keys() and all(torch.equal(fused[k], v) for k, v in saved.items())

    source = _plain_network(lorkd, 4)
    source.load_state_dict(saved)
    source.eval()
    lorkd.network.eval()
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        expected = source(x)
        for region in (0, 1):
            with route(lorkd.network, region):
                assert all(torch.equal(a, b) for a, b in zip(lorkd.network(x), expected, strict=True))
        # a mixed batch runs one conv per region group: other conv kernels, as the source on one sample
        # (which differs from its batch-of-two output by ~3e-6 too)
        with route(lorkd.network, [1, 0]):
            for a, b in zip(lorkd.network(x), expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    log = _log(lorkd)
    assert "tensors loaded into the backbone" in log
    assert "heads matched by class name for classes ['background', 'liver', 'spleen', 'urinary_bladder']" in log
    assert f"experts fresh (B_t = 0 in {len(layers)} expert layers)" in log


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerLoRKD, nnUNetTrainerMTL])
@pytest.mark.parametrize("labels_in", ["checkpoint", "model_folder"])
def test_heads_are_matched_by_class_name(toy, trainer_class, labels_in):
    student = make_trainer(trainer_class)
    student.initialize()
    fresh = _heads(student.network)
    # a specialist with another label order, one class the student lacks (kidney) and one it lacks (spleen)
    specialist = {"background": 0, "urinary_bladder": 1, "kidney": 2, "liver": 3}
    source = _plain_network(student, 4)
    model = toy / "specialist_model"
    if labels_in == "model_folder":  # what lorkd-fuse writes: no dataset.json inside the checkpoint
        model.mkdir()
        (model / "dataset.json").write_text(json.dumps({"labels": specialist}))
    stored = {"labels": specialist} if labels_in == "checkpoint" else None
    path = _save(model / "fold_0" / "checkpoint_final.pth", source.state_dict(), stored)

    report = student.load_pretrained_weights(path)

    assert report.matched_classes == ("background", "liver", "urinary_bladder")
    assert report.fresh_classes == ("spleen",)
    heads = _heads(student.network)
    for key, head in heads.items():
        src = source.state_dict()[key]
        for student_channel, source_channel in ((0, 0), (1, 3), (3, 1)):
            assert torch.equal(head[student_channel], src[source_channel])
        assert torch.equal(head[2], fresh[key][2])  # spleen: as initialised
    assert "fresh heads for classes ['spleen']" in _log(student)


def test_architecture_mismatch_is_one_clear_error_and_changes_nothing(toy):
    student = make_trainer(nnUNetTrainerLoRKD)
    student.initialize()
    before = {k: v.clone() for k, v in student.network.state_dict().items()}
    labels = student.dataset_json
    weights_2d = _plain_network(student, 4, "2d").state_dict()
    wrong = _save(toy / "m2d" / "fold_0" / "checkpoint_final.pth", weights_2d, labels)
    with pytest.raises(PretrainedWeightsError, match=r"does not fit this network: .*another shape \(first: \['encoder"):
        student.load_pretrained_weights(wrong)
    partial = {k: v for k, v in _plain_network(student, 4).state_dict().items() if "stages.1" not in k}
    with pytest.raises(PretrainedWeightsError, match=r"not in it \(first: \[.*stages\.1.*same plans and configuration"):
        student.load_pretrained_weights(_save(toy / "mp" / "fold_0" / "checkpoint_final.pth", partial, labels))
    assert all(torch.equal(before[k], v) for k, v in student.network.state_dict().items())
    orphan = _save(toy / "orphan.pth", _plain_network(student, 4).state_dict(), None)
    with pytest.raises(PretrainedWeightsError, match="classes of its heads are unknown"):
        student.load_pretrained_weights(orphan)


def test_sat_style_checkpoint_gives_only_its_unet_body(toy):
    student = make_trainer(nnUNetTrainerLoRKD)
    student.initialize()
    fresh = _heads(student.network)
    config = SATConfig(("liver", "spleen"), ("liver", "spleen"), text_encoder=None, text_dim=8, embedding_dim=6)
    teacher = PromptedUNet(_plain_network(student, 6), config)
    path = _save(toy / "sat" / "fold_0" / "checkpoint_final.pth", teacher.state_dict(), None, "nnUNetTrainerSATStyle")

    report = student.load_pretrained_weights(path)

    state = student.network.state_dict()
    body = {k[len("unet.") :]: v for k, v in teacher.state_dict().items() if k.startswith("unet.")}
    assert report.backbone_tensors > 0 and report.matched_classes == ()
    assert all(torch.equal(state[k], v) for k, v in body.items() if not SEG_HEAD_KEY.search(k))
    assert all(torch.equal(state[k], v) for k, v in fresh.items())
    assert "the SAT-style source's seg layers output per-pixel embeddings" in _log(student)


def test_sat_style_trainer_starts_its_unet_body_from_an_mtl_model(toy):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2_lorkd_trainers.sat_style import nnUNetTrainerSATStyle_learnedEmbeddings

    mtl = make_trainer(nnUNetTrainerMTL)
    mtl.initialize()
    checkpoint = os.path.join(mtl.output_folder, "checkpoint_final.pth")
    mtl.save_checkpoint(checkpoint)
    saved = mtl.network.state_dict()
    sat = make_trainer(nnUNetTrainerSATStyle_learnedEmbeddings)
    sat.initialize()
    before = {k: v.clone() for k, v in sat.network.state_dict().items()}

    maybe_load_checkpoint(sat, continue_training=False, validation_only=False, pretrained_weights_file=checkpoint)

    for key, value in sat.network.state_dict().items():
        name = key.removeprefix("unet.")
        body = key.startswith("unet.") and not SEG_HEAD_KEY.search(name)
        assert torch.equal(value, saved[name] if body else before[key]), key  # heads and prompt head stay fresh
    assert "only its U-Net body was loaded" in _log(sat)


def test_other_networks_still_get_nnunets_loader(toy):
    import nnunetv2.run.run_training as run_training

    student = make_trainer(nnUNetTrainerMTL)
    student.initialize()  # installs the hook
    assert getattr(run_training.load_pretrained_weights, "_lorkd_dispatch", False)
    plain, source = _plain_network(student, 4), _plain_network(student, 4)
    path = _save(toy / "v" / "fold_0" / "checkpoint_final.pth", source.state_dict(), student.dataset_json)
    run_training.load_pretrained_weights(plain, path)  # nnU-Net's: everything but the seg layers
    loaded, wanted = plain.state_dict(), source.state_dict()
    assert all(torch.equal(v, wanted[k]) for k, v in loaded.items() if not SEG_HEAD_KEY.search(k))
    assert not any(torch.equal(v, wanted[k]) for k, v in loaded.items() if SEG_HEAD_KEY.search(k) and v.dim() > 1)


@pytest.fixture(scope="module")
def merged_2d(tmp_path_factory) -> dict:
    """Two synthetic regions merged by lorkd-merge and planned for 2d only: the smallest real nnU-Net set-up."""
    root = tmp_path_factory.mktemp("pretrained")
    # nnU-Net's planner fails with nnUNet_n_proc_DA=0 (set_num_threads(0)); training gets it back below
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "nnUNet_n_proc_DA")}
    env.update({f"nnUNet_{d}": str(root / d) for d in ("raw", "preprocessed", "results")})
    env.update(nnUNet_def_n_proc="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for region in ("abdomen", "pelvis"):
        write_region_dataset(env["nnUNet_raw"], region, num_cases=4)
    _run([str(BIN / "lorkd-merge"), "-i", "901", "abdomen", "-i", "902", "pelvis", "-d", "900", "-n", "Merged"], env)
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "900", "-c", "2d", "-np", "1", "-npfp", "1"], env)
    return env


@pytest.mark.slow
def test_cli_lorkd_starts_from_an_mtl_model(merged_2d):
    env = {**merged_2d, "nnUNet_n_proc_DA": "0"}
    start = time.monotonic()
    _run([str(BIN / "nnUNetv2_train"), "900", "2d", "0", "-tr", "nnUNetTrainerMTL_smoke", "-device", "cpu"], env)
    results = Path(env["nnUNet_results"]) / "Dataset900_Merged"
    source = results / "nnUNetTrainerMTL_smoke__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    out = _run([str(BIN / "nnUNetv2_train"), "900", "2d", "0", "-tr", "nnUNetTrainerLoRKD_smoke", "-device", "cpu",
                "-pretrained_weights", str(source)], env)  # fmt: skip
    assert "tensors loaded into the backbone" in out
    assert "heads matched by class name for classes ['background', 'liver', 'spleen'" in out
    assert "experts fresh (B_t = 0" in out
    assert "Loading pretrained weights from file" not in out  # nnU-Net's own loader was not used
    model = results / "nnUNetTrainerLoRKD_smoke__nnUNetPlans__2d"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    logs = [p.read_text() for p in (model / "fold_0").glob("training_log_*.txt")]
    assert any("tensors loaded into the backbone" in log for log in logs)
    print(f"\ntwo smoke trainings through the CLI: {time.monotonic() - start:.0f} s")
