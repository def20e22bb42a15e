"""Teachers: loading from model folders, name matching, frozen state, patch padding, the preprocessing refusal,
and the SAT checkpoint adapter's grid and intensity mapping."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sat_helpers import (
    CLASS_NAMES,
    dataset_json,
    plain_network,
    sat_config,
    sat_network,
    tiny_plans,
    write_model_folder,
)

from nnunetv2_lorkd.teachers import (
    NNUNetModelTeacher,
    PreprocessingSpec,
    SATCheckpointTeacher,
    SATGrid,
    SATIntensity,
    SATStyleTeacher,
    Teacher,
    TeacherError,
    load_teacher,
    match_class_names,
)


def _spec(plans: dict, configuration: str, dataset: dict | None = None) -> PreprocessingSpec:
    return PreprocessingSpec.from_plans(plans, configuration, dataset or dataset_json(), source="student")


@pytest.fixture
def plain_folder(tmp_path):
    plans, configuration = tiny_plans()
    net = plain_network(plans, configuration)
    return write_model_folder(str(tmp_path / "plain"), plans, configuration, dataset_json(), net), net


@pytest.fixture
def sat_folder(tmp_path):
    plans, configuration = tiny_plans()
    sat_config().store_in(plans, configuration, {})
    net = sat_network(plans, configuration)
    folder = write_model_folder(
        str(tmp_path / "sat"), plans, configuration, dataset_json(), net, "nnUNetTrainerSATStyle"
    )
    return folder, net


# ------------------------------------------------------------------------------------------ class names
def test_class_names_match_ignoring_case_and_separators_with_aliases():
    available = ("liver", "Spleen", "urinary_bladder", "kidney_left")
    assert match_class_names(["Urinary Bladder", "liver", "spleen"], available) == [2, 0, 1]
    assert match_class_names(["left kidney"], available, aliases={"Left_Kidney": "kidney left"}) == [3]


def test_all_unmatched_names_are_reported_at_once():
    with pytest.raises(TeacherError) as error:
        match_class_names(["liver", "pancreas", "femur_left", "aorta"], ("liver", "spleen"), teacher="teacher X")
    message = str(error.value)
    assert "teacher X has no class for 3 of the 4 requested names" in message
    assert all(n in message for n in ("'pancreas'", "'femur_left'", "'aorta'", "'spleen'", "class_aliases"))
    with pytest.raises(TeacherError, match="both read as 'femur left'"):
        match_class_names(["liver"], ("femur_left", "Femur-Left"))


# ------------------------------------------------------------------------------------------ loading
def test_nnunet_model_teacher_is_the_softmax_of_its_network(plain_folder):
    folder, net = plain_folder
    teacher = load_teacher(folder, 0, class_aliases={"bladder": "urinary_bladder"})
    assert isinstance(teacher, NNUNetModelTeacher) and isinstance(teacher, Teacher)
    assert teacher.exclusive is True and teacher.class_names == CLASS_NAMES
    x = torch.randn(2, 1, 8, 16, 16)
    probs = teacher.probabilities(x, ["lung", "bladder", "liver"])
    net.eval()
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)[:, [5, 3, 1]]
    torch.testing.assert_close(probs, expected)
    with torch.no_grad():
        assert float(torch.softmax(net(x), 1)[:, 1:].sum(1).max()) <= 1 + 1e-6  # exclusive: they share one simplex
    with pytest.raises(TeacherError, match="'pancreas', 'aorta'"):
        teacher.probabilities(x, ["liver", "pancreas", "aorta"])


def test_sat_style_teacher_gives_independent_sigmoids(sat_folder):
    folder, net = sat_folder
    teacher = load_teacher(folder, 0)
    assert isinstance(teacher, SATStyleTeacher) and teacher.exclusive is False
    x = torch.randn(1, 1, 8, 16, 16)
    probs = teacher.probabilities(x, ["spleen", "femur left"])
    net.eval()
    with torch.no_grad():
        expected = torch.sigmoid(net(x)[:, [2, 4]])
    torch.testing.assert_close(probs, expected)


def test_any_patch_size_is_padded_to_the_stride_and_cropped_back(sat_folder):
    folder, net = sat_folder
    teacher = load_teacher(folder, 0)
    assert teacher.strides == (2, 4, 4)
    x = torch.randn(1, 1, 7, 13, 18)
    probs = teacher.probabilities(x, list(CLASS_NAMES))
    assert probs.shape == (1, 5, 7, 13, 18)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 2, 0, 1))  # (18->20: 1+1, 13->16: 1+2, 7->8: 0+1)
    with torch.no_grad():
        expected = torch.sigmoid(net.eval()(padded)[:, 1:, :7, 1:14, 1:19])
    torch.testing.assert_close(probs, expected)
    with pytest.raises(TeacherError, match="expects 1 input channels, got 2"):
        teacher.probabilities(torch.randn(1, 2, 8, 16, 16), ["liver"])
    with pytest.raises(TeacherError, match="3D model"):
        teacher.probabilities(torch.randn(1, 1, 16, 16), ["liver"])


def test_teacher_stays_frozen_and_its_batchnorm_statistics_never_change(tmp_path):
    plans, configuration = tiny_plans(norm="torch.nn.BatchNorm3d")
    net = plain_network(plans, configuration)
    with torch.no_grad():  # non-default statistics, so using batch statistics instead would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folder = write_model_folder(str(tmp_path / "bn"), plans, configuration, dataset_json(), net)
    teacher = load_teacher(folder, 0)
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    assert not teacher.network.training
    assert not any(p.requires_grad for p in teacher.network.parameters())

    teacher.network.train()  # e.g. a trainer's .train() reaching it: probabilities() must still be frozen
    x = torch.randn(2, 1, 8, 16, 16) * 3 + 1
    probs = teacher.probabilities(x, ["liver", "lung"])
    assert not teacher.network.training and not probs.requires_grad
    after = teacher.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and num_batches_tracked too
    with torch.no_grad():
        expected = torch.softmax(net.eval()(x), 1)[:, [1, 5]]
    torch.testing.assert_close(probs, expected)

    # the probabilities are ordinary tensors a student loss can use (not inference-mode tensors)
    student_logits = torch.randn(2, 2, 8, 16, 16, requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(student_logits, probs).backward()
    assert student_logits.grad is not None


def test_missing_and_unusable_checkpoints_are_refused_clearly(plain_folder, tmp_path):
    folder, _ = plain_folder
    with pytest.raises(TeacherError, match=r"checkpoint_best.pth does not exist \(checkpoints there: checkpoint_final"):
        load_teacher(folder, 0, "checkpoint_best.pth")
    with pytest.raises(TeacherError, match=r"plans\.json does not exist; is this a trained nnU-Net model folder"):
        load_teacher(str(tmp_path), 0)

    # a pickled arbitrary object: weights_only loading must refuse it
    torch.save({"network_weights": {}, "payload": argparse.Namespace(x=1)}, f"{folder}/fold_0/checkpoint_evil.pth")
    with pytest.raises(TeacherError, match="cannot read checkpoint"):
        load_teacher(folder, 0, "checkpoint_evil.pth")


def test_lorkd_expert_folders_are_refused_with_the_fix(plain_folder):
    folder, _ = plain_folder
    path = Path(folder) / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["lorkd_experts"] = {"region_names": ["abdomen"]}
    path.write_text(json.dumps(plans))
    with pytest.raises(TeacherError, match="lorkd-fuse"):
        load_teacher(folder, 0)


# -------------------------------------------------------------------------------- preprocessing check
def test_matching_preprocessing_is_accepted(plain_folder):
    folder, _ = plain_folder
    plans, configuration = tiny_plans()
    load_teacher(folder, 0, student=_spec(plans, configuration))  # other architecture details do not matter


def test_mismatched_preprocessing_is_refused_naming_every_difference(plain_folder):
    folder, _ = plain_folder
    plans, configuration = tiny_plans(spacing=[3.0, 0.8, 0.8])
    plans["transpose_forward"] = [2, 1, 0]
    plans["transpose_backward"] = [2, 1, 0]
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] = 40.0
    with pytest.raises(TeacherError) as error:
        load_teacher(folder, 0, student=_spec(plans, configuration))
    message = str(error.value)
    assert "target spacing [2.0, 1.0, 1.0] vs student [3.0, 0.8, 0.8]" in message
    assert "axis transpose [0, 1, 2] vs student [2, 1, 0]" in message
    assert "CTNormalization uses the dataset intensity statistics" in message and "mean=40" in message
    assert "nnUNetv2_move_plans_between_datasets" in message

    plans, configuration = tiny_plans()
    plans["configurations"][configuration]["normalization_schemes"] = ["ZScoreNormalization"]
    with pytest.raises(TeacherError, match=r"normalisation \['CTNormalization'\] vs student \['ZScoreNormalization'\]"):
        load_teacher(folder, 0, student=_spec(plans, configuration))
    two_channels = copy.deepcopy(dataset_json())
    two_channels["channel_names"] = {"0": "CT", "1": "PET"}
    plans["configurations"][configuration]["normalization_schemes"] = ["CTNormalization", "ZScoreNormalization"]
    plans["configurations"][configuration]["use_mask_for_norm"] = [False, False]
    with pytest.raises(TeacherError, match="1 input channels vs student 2"):
        load_teacher(folder, 0).check_student(_spec(plans, configuration, two_channels))


def test_per_image_normalisation_ignores_dataset_statistics():
    plans, configuration = tiny_plans()
    plans["configurations"][configuration]["normalization_schemes"] = ["ZScoreNormalization"]
    other = copy.deepcopy(plans)
    other["foreground_intensity_properties_per_channel"]["0"]["mean"] = 123.0
    assert _spec(plans, configuration).differences(_spec(other, configuration)) == []


# ---------------------------------------------------------------------------------- SAT checkpoint adapter
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_sat_grid_orientation_from_direction_and_transpose():
    # identity direction (LPS), array axes (z, y, x): S is axis 0 as is, A is -y (axis 1, flipped), R is -x
    grid = SATGrid.from_direction(IDENTITY, (3.0, 1.0, 1.0))
    assert grid.source_axis == (2, 1, 0) and grid.flip == (True, True, False)
    # a RAS-stored image (direction diag(-1, -1, 1)) needs no flips; with transpose_forward (2, 1, 0) the
    # student's axes are (x, y, z) already
    grid = SATGrid.from_direction((-1, 0, 0, 0, -1, 0, 0, 0, 1), (1.0, 1.0, 3.0), transpose_forward=(2, 1, 0))
    assert grid.source_axis == (0, 1, 2) and grid.flip == (False, False, False)
    # sagittal storage: index axis 0 points to +S... (columns are index axes)
    grid = SATGrid.from_direction((0, 0, 1, 1, 0, 0, 0, 1, 0), (1.0, 1.0, 1.0))
    # array axis a is index axis 2 - a: axis 0 -> column 2 = (1,0,0) L -> R flipped; axis 1 -> column 1 =
    # (0,0,1) S; axis 2 -> column 0 = (0,1,0) P -> A flipped
    assert grid.source_axis == (0, 2, 1) and grid.flip == (True, True, False)
    with pytest.raises(TeacherError, match="oblique"):
        c, s = math.cos(0.3), math.sin(0.3)
        SATGrid.from_direction((c, -s, 0, s, c, 0, 0, 0, 1), (3.0, 1.0, 1.0))


def test_sat_grid_moves_a_marker_to_the_right_anterior_superior_place_and_back():
    grid = SATGrid.from_direction(IDENTITY, (3.0, 1.0, 1.0))  # student spacing equals SAT's 1x1x3 (R, A, S)
    x = torch.zeros(1, 1, 4, 6, 8)
    x[0, 0, 3, 0, 0] = 1.0  # last z (most superior), first y (most anterior in LPS), first x (most right)
    sat = grid.to_sat(x)
    assert sat.shape == (1, 1, 8, 6, 4)  # (R, A, S) sizes at unchanged spacing
    assert np.unravel_index(int(sat.argmax()), sat.shape[2:]) == (7, 5, 3)  # max R, max A, max S
    torch.testing.assert_close(grid.from_sat(sat, x.shape[2:]), x)  # same spacing: exact round trip

    fine = SATGrid.from_direction(IDENTITY, (1.5, 0.5, 0.5))  # resampling: a smooth field survives the round trip
    zz, yy, xx = torch.meshgrid(
        torch.linspace(0, 1, 16), torch.linspace(0, 1, 24), torch.linspace(0, 1, 24), indexing="ij"
    )
    field = (torch.sin(2 * zz) + yy * xx)[None, None]
    sat = fine.to_sat(field)
    assert sat.shape == (1, 1, 12, 12, 8)
    back = fine.from_sat(sat, field.shape[2:])
    assert float((back - field)[..., 2:-2, 2:-2, 2:-2].abs().max()) < 0.05


def test_sat_intensity_recovers_hounsfield_and_applies_sats_window():
    plans, configuration = tiny_plans()
    plans["foreground_intensity_properties_per_channel"]["0"].update(mean=100.0, std=200.0)
    intensity = SATIntensity.from_student(_spec(plans, configuration))
    hu = torch.tensor([-1000.0, -500.0, 0.0, 400.0, 2000.0]).view(1, 1, 5, 1, 1)
    normalised = (hu - 100.0) / 200.0  # nnU-Net CTNormalization inside its clip window
    torch.testing.assert_close(intensity.to_hounsfield_or_raw(normalised), hu)
    out = intensity.normalize(hu)
    clipped = hu.clamp(-500, 1000).flatten()
    torch.testing.assert_close(out[0, 0].flatten(), (clipped - clipped.mean()) / clipped.std())
    assert out.shape == (1, 3, 5, 1, 1) and torch.equal(out[:, 0], out[:, 2])
    fixed = SATIntensity.from_student(_spec(plans, configuration), zscore_stats=(0.0, 100.0))
    torch.testing.assert_close(fixed.normalize(hu)[0, 0].flatten(), clipped / 100.0)


def test_sat_checkpoint_teacher_wraps_a_sat_callable_on_the_students_grid():
    plans, configuration = tiny_plans(spacing=[3.0, 1.0, 1.0])
    plans["foreground_intensity_properties_per_channel"]["0"].update(mean=0.0, std=100.0)
    student = _spec(plans, configuration)
    calls = []

    def fake_sat(image: torch.Tensor, names, modality: str) -> torch.Tensor:
        """Stands in for SAT: 'anterior' = front half along A, 'bright' = z-scored intensity > 0."""
        calls.append((tuple(image.shape), list(names), modality))
        a = torch.arange(image.shape[3]).view(1, 1, 1, -1, 1).expand(image.shape[0], 1, *image.shape[2:])
        maps = {"anterior": (a >= 3).float() * 20 - 10, "bright": (image[:, :1] > 0).float() * 20 - 10}
        return torch.cat([maps[n] for n in names], 1)

    teacher = SATCheckpointTeacher(fake_sat, ["bright", "anterior"], student, "ct", max_queries=1)
    assert isinstance(teacher, Teacher) and teacher.exclusive is False
    x = torch.zeros(1, 1, 4, 6, 8)
    x[:, :, :, :, :4] = 3.0  # 300 HU on the right half (low x index in LPS = right)
    with pytest.raises(TeacherError, match="bind_case"):
        teacher.probabilities(x, ["anterior"])
    teacher.bind_case({"sitk_stuff": {"direction": IDENTITY, "spacing": (1.0, 1.0, 3.0), "origin": (0, 0, 0)}})
    probs = teacher.probabilities(x, ["Anterior", "bright"])
    assert probs.shape == (1, 2, 4, 6, 8)
    assert calls[0] == ((1, 3, 32, 32, 32), ["anterior"], "ct") and len(calls) == 2  # padded, one query a call
    # anterior in LPS is low y: the first 3 rows (A index 5..3 after the flip) are anterior
    expected_anterior = torch.zeros(4, 6, 8)
    expected_anterior[:, :3] = 1
    torch.testing.assert_close(probs[0, 0], torch.sigmoid(expected_anterior * 20 - 10))
    expected_bright = torch.zeros(4, 6, 8)
    expected_bright[:, :, :4] = 1
    torch.testing.assert_close(probs[0, 1], torch.sigmoid(expected_bright * 20 - 10))
    with pytest.raises(TeacherError, match="'pancreas'"):
        teacher.probabilities(x, ["pancreas"])


@pytest.mark.slow
def test_custom_trainer_names_are_resolved_like_nnunets_predictor(plain_folder, tmp_path):
    """A model trained with another trainer class is rebuilt by that class (nnU-Net's own trainer search)."""
    _, net = plain_folder
    plans, configuration = tiny_plans()
    folder = write_model_folder(
        str(tmp_path / "variant"), plans, configuration, dataset_json(), net, "nnUNetTrainer_5epochs"
    )
    teacher = load_teacher(folder, 0)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher.probabilities(x, ["liver"]), torch.softmax(net.eval()(x), 1)[:, [1]])
    folder = write_model_folder(str(tmp_path / "unknown"), plans, configuration, dataset_json(), net, "NoSuchTrainer")
    with pytest.raises(TeacherError, match="cannot find the teacher's trainer class 'NoSuchTrainer'"):
        load_teacher(folder, 0)


def test_sat_intensity_for_mr_clips_to_percentiles_like_numpy():
    plans, configuration = tiny_plans()
    plans["configurations"][configuration]["normalization_schemes"] = ["ZScoreNormalization"]
    intensity = SATIntensity.from_student(_spec(plans, configuration))
    values = torch.randn(2, 1, 9, 11, 13, dtype=torch.float64) ** 3
    out = intensity.normalize(values)
    for b in range(2):
        flat = values[b].flatten().numpy()
        clipped = np.clip(flat, np.percentile(flat, 0.5), np.percentile(flat, 99.5))
        np.testing.assert_allclose(out[b, 0].flatten().numpy(), (clipped - clipped.mean()) / clipped.std(ddof=1))
    plans["configurations"][configuration]["normalization_schemes"] = ["RescaleTo01Normalization"]
    with pytest.raises(TeacherError, match=r"CTNormalization .* and ZScoreNormalization"):
        SATIntensity.from_student(_spec(plans, configuration))
