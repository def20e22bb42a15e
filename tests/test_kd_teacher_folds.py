"""The teacher fold check (issue 15, defect 5): a student fold must not distil from a teacher trained on its
validation cases. Refused with the cases and the fix; a fold-matched teacher passes; the allow option warns."""

from __future__ import annotations

import json
import os

import pytest
import torch
from kd_toy import CASES, DATASET, TRAIN, VAL, FakeTeacher, nnunet_env, patch_load_teacher, write_dataset

from nnunetv2_lorkd.kd.cli import main
from nnunetv2_lorkd.kd.config import KDConfigError, KDSettings, TeacherRef, read_config
from nnunetv2_lorkd.kd.session import Distillation
from nnunetv2_lorkd.kd.teacher_folds import (
    TeacherFoldOverlapError,
    check_teacher_fold,
    enforce_teacher_fold,
    teacher_training,
)
from nnunetv2_lorkd.regions import RegionMap

CLASSES = ("liver", "spleen", "urinary_bladder")
TWO_FOLDS = [
    {"train": TRAIN, "val": VAL},
    {"train": ["abd_000", "abd_003", "pel_000", "pel_003"], "val": ["abd_001", "abd_002", "pel_001", "pel_002"]},
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    paths = nnunet_env(monkeypatch, str(tmp_path))
    folder = write_dataset(paths["nnUNet_preprocessed"])
    with open(os.path.join(folder, "splits_final.json"), "w") as f:
        json.dump(TWO_FOLDS, f)
    return {**paths, "folder": folder, "root": str(tmp_path)}


def model_folder(root: str, dataset: str, folds=(0,), dataset_json: dict | None = None, name: str = "T") -> str:
    """A trained-model-like folder: plans.json naming its dataset, dataset.json, fold_X/checkpoint_final.pth."""
    folder = os.path.join(root, "results", dataset, f"{name}__nnUNetPlans__3d_fullres")
    for fold in folds:
        os.makedirs(os.path.join(folder, f"fold_{fold}"), exist_ok=True)
        with open(os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth"), "wb") as f:
            f.write(b"weights")
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump({"dataset_name": dataset, "plans_name": "nnUNetPlans"}, f)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json or {"labels": {"background": 0}}, f)
    return folder


def settings(folder: str, fold: int | str, allow: bool = False) -> KDSettings:
    return KDSettings("nnUNetPlans", TeacherRef(folder, fold), allow_teacher_fold_overlap=allow)


def enforce(env: dict, teacher: KDSettings, fold: int | str, sources: dict | None = None) -> str:
    split = TWO_FOLDS[fold] if fold != "all" else {"train": list(CASES), "val": list(CASES)}
    return enforce_teacher_fold(teacher, DATASET, "3d_fullres", sources or {}, split["train"], split["val"],
                                env["nnUNet_preprocessed"], fold)  # fmt: skip


# ----------------------------------------------------------------------------------------- the rule
def test_fold_matched_teacher_passes(env):
    teacher = model_folder(env["root"], DATASET, folds=(0, 1))
    for fold in (0, 1):
        line = enforce(env, settings(teacher, fold), fold)
        assert line.startswith(f"Teacher fold check (student fold {fold}): ok")
        assert f"fold {fold} of {os.path.join(env['folder'], 'splits_final.json')}" in line


def test_other_fold_teacher_is_refused_with_cases_and_fix(env):
    teacher = model_folder(env["root"], DATASET, folds=(0,))
    with pytest.raises(TeacherFoldOverlapError) as info:
        enforce(env, settings(teacher, 0), 1)
    message = str(info.value)
    # fold 0 trained on abd_000-002 and pel_000-002; fold 1 validates on abd_001/002 and pel_001/002
    assert (
        f"the teacher {teacher} fold 0 was trained on 4 of the 4 validation cases of the student fold 1: "
        "abd_001, abd_002, pel_001, pel_002 (matched by case id; teacher cases: fold 0 of " in message
    )
    assert "distilling from it leaks them into the student's validation" in message
    assert message.count("\n") == 0
    assert f"--teacher {teacher} --teacher-fold 1" in message
    assert '--allow-teacher-fold-overlap` ("allow_teacher_fold_overlap": true in lorkd_kd.json)' in message


def test_overlap_names_the_cases(env):
    teacher = model_folder(env["root"], DATASET, folds=(1,))
    with pytest.raises(TeacherFoldOverlapError, match=r"trained on 2 of the 2 validation cases of the student fold 0: "
                       r"abd_003, pel_003 \(matched by case id"):  # fmt: skip
        enforce(env, settings(teacher, 1), 0)


def test_fold_all_teacher_refused_for_a_student_fold_with_validation_cases(env):
    teacher = model_folder(env["root"], DATASET, folds=("all",))
    match = r"fold all was trained on 2 of the 2 validation cases of the student fold 0: abd_003, pel_003 .*"
    with pytest.raises(TeacherFoldOverlapError, match=match + "fold 'all' = every case of Dataset950_KDToy"):
        enforce(env, settings(teacher, "all"), 0)
    # a student that trains on every case (fold 'all') has nothing a teacher could leak
    assert ": ok, the student trains on all of its validation cases" in enforce(env, settings(teacher, "all"), "all")


def test_first_few_cases_and_the_count(env):
    many = [f"case_{i:03d}" for i in range(12)]
    teacher = model_folder(env["root"], DATASET, folds=("all",))
    with pytest.raises(TeacherFoldOverlapError) as info:
        enforce_teacher_fold(settings(teacher, "all"), DATASET, "3d_fullres", {}, [], many, env["root"], 2)
    message = str(info.value)
    assert "case_000, case_001, case_002, case_003, case_004, ... (12 in all)" in message
    assert "case_005" not in message


def test_allow_option_warns_and_names_every_case(env):
    teacher = model_folder(env["root"], DATASET, folds=(0,))
    line = enforce(env, settings(teacher, 0, allow=True), 1)
    assert line.startswith("WARNING: 4 of the 4 validation cases of the student fold 1 are training cases of the ")
    assert "allowed by allow_teacher_fold_overlap in lorkd_kd.json" in line
    assert line.endswith("Leaked cases: abd_001, abd_002, pel_001, pel_002")


def test_demo_one_fold_split_validating_on_a_training_case_passes(env):
    """lorkd-data's one-fold split validates on a training case; teacher and student both train fold 0."""
    demo = [{"train": sorted(CASES), "val": ["abd_000"]}]
    with open(os.path.join(env["folder"], "splits_final.json"), "w") as f:
        json.dump(demo, f)
    teacher = model_folder(env["root"], DATASET, folds=(0,))
    line = enforce_teacher_fold(settings(teacher, 0), DATASET, "3d_fullres", {}, demo[0]["train"], demo[0]["val"],
                                env["nnUNet_preprocessed"], 0)  # fmt: skip
    assert ": ok, the student trains on all of its validation cases" in line


def test_teacher_fold_missing_from_the_splits_cannot_be_ruled_out(env):
    teacher = model_folder(env["root"], DATASET, folds=(4,))
    with pytest.raises(TeacherFoldOverlapError, match=r"cannot rule out .*fold 4 is not in .*\(2 folds\): nnU-Net "
                       r"trained that fold on a random 80:20 split"):  # fmt: skip
        enforce(env, settings(teacher, 4), 0)
    line = enforce(env, settings(teacher, 4, allow=True), 0)
    assert line.startswith("WARNING: teacher fold check (student fold 0) skipped by allow_teacher_fold_overlap")


def test_the_model_folders_own_splits_copy_wins(env):
    teacher = model_folder(env["root"], DATASET, folds=(0,))
    with open(os.path.join(teacher, "splits_final.json"), "w") as f:
        json.dump([{"train": ["abd_000"], "val": ["abd_001"]}], f)  # trained on abd_000 only
    training = teacher_training(TeacherRef(teacher, 0), env["nnUNet_preprocessed"])
    assert training.case_ids == {"abd_000"} and training.where.endswith(os.path.join(teacher, "splits_final.json"))
    assert "ok" in enforce(env, settings(teacher, 0), 1)


# ------------------------------------------------------------------------------------ other datasets
def test_teacher_of_the_source_dataset_is_matched_through_case_sources(env):
    """The student is a split-mode merge of Dataset503_Whole; the teacher trained on Dataset503_Whole itself."""
    sources = {f"c{i}_{r}": f"Dataset503_Whole/c{i}" for i in range(4) for r in ("abdomen", "pelvis")}
    pre = os.path.join(env["nnUNet_preprocessed"], "Dataset503_Whole")
    os.makedirs(pre)
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump([{"train": ["c0", "c1", "c2"], "val": ["c3"]}], f)
    teacher = model_folder(env["root"], "Dataset503_Whole", folds=(0,))
    train = ["c0_abdomen", "c0_pelvis", "c3_abdomen", "c3_pelvis"]
    val = ["c1_abdomen", "c1_pelvis", "c2_abdomen", "c2_pelvis"]
    with pytest.raises(TeacherFoldOverlapError) as info:
        enforce_teacher_fold(settings(teacher, 0), "Dataset601_LoRKDSplit", "3d_fullres", sources, train, val,
                             env["nnUNet_preprocessed"], 1)  # fmt: skip
    message = str(info.value)
    assert "4 of the 4 validation cases of the student fold 1: c1_abdomen (Dataset503_Whole/c1)" in message
    assert "matched through the case sources of Dataset601_LoRKDSplit" in message
    # fold 'all' of the source dataset: every case of it
    teacher_all = model_folder(env["root"], "Dataset503_Whole", folds=("all",), name="A")
    with pytest.raises(TeacherFoldOverlapError, match="fold all was trained on 4 of"):
        enforce_teacher_fold(settings(teacher_all, "all"), "Dataset601_LoRKDSplit", "3d_fullres", sources, train, val,
                             env["nnUNet_preprocessed"], 1)  # fmt: skip


def test_split_mode_copies_of_one_patient_match(env):
    """A teacher of the same split-mode dataset that trained on c1_abdomen leaks c1_pelvis."""
    sources = {f"c{i}_{r}": f"Dataset503_Whole/c{i}" for i in range(2) for r in ("abdomen", "pelvis")}
    dataset_json = {"lorkd": {"case_sources": sources}}
    pre = os.path.join(env["nnUNet_preprocessed"], "Dataset601_S")
    os.makedirs(pre)
    with open(os.path.join(pre, "splits_final.json"), "w") as f:  # an old, patient-splitting split
        json.dump([{"train": ["c0_abdomen", "c1_abdomen"], "val": ["c0_pelvis", "c1_pelvis"]}], f)
    teacher = model_folder(env["root"], "Dataset601_S", folds=(0,), dataset_json=dataset_json)
    training = teacher_training(TeacherRef(teacher, 0), env["nnUNet_preprocessed"])
    result = check_teacher_fold(training, "Dataset601_S", sources, ["c0_abdomen"], ["c1_pelvis"])
    assert result.status == "overlap" and result.overlap == ("c1_pelvis",)


def test_unrelated_teacher_dataset_cannot_be_checked_and_says_so(env):
    teacher = model_folder(env["root"], "Dataset777_Elsewhere", folds=(0,))
    line = enforce(env, settings(teacher, 0), 1)
    assert line.startswith("Teacher fold check (student fold 1): unchecked, cannot be checked: the teacher was ")
    assert "trained on Dataset777_Elsewhere, and no case of Dataset950_KDToy comes from it" in line


def test_teacher_without_plans_cannot_be_checked(env, tmp_path):
    folder = tmp_path / "bare_teacher"
    (folder / "fold_0").mkdir(parents=True)
    line = enforce(env, settings(str(folder), 0), 1)
    assert "unchecked, cannot be checked: " in line and "plans.json is missing" in line


# ----------------------------------------------------------------------------------- training start
def _distillation(env, teacher: KDSettings) -> Distillation:
    with open(os.path.join(env["folder"], "dataset.json")) as f:
        region_map = RegionMap.from_dataset_json(json.load(f))
    from nnunetv2_lorkd.kd.config import write_settings

    write_settings(env["folder"], "3d_fullres", teacher)
    kd, _ = Distillation.from_preprocessed(
        env["folder"], DATASET, "3d_fullres", "nnUNetPlans", "nnUNetPlans_3d_fullres", region_map
    )
    assert kd is not None
    return kd


def test_prepare_refuses_before_loading_the_teacher(env, monkeypatch):
    calls = patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    teacher = model_folder(env["root"], DATASET, folds=("all",))
    kd = _distillation(env, settings(teacher, "all"))
    case_regions = dict.fromkeys(TRAIN, 0)
    with pytest.raises(TeacherFoldOverlapError, match="validation cases of the student fold 0: abd_003, pel_003"):
        kd.prepare(torch.device("cpu"), None, case_regions, None, validation_cases=VAL, fold=0)
    assert calls == []  # refused before the teacher was loaded
    # without the validation cases they are derived from the preprocessed folder (and the log says so)
    with pytest.raises(TeacherFoldOverlapError, match="abd_003, pel_003"):
        kd.check_teacher_fold(case_regions)
    kd.settings = settings(teacher, "all", allow=True)
    line = kd.check_teacher_fold(case_regions)
    assert line.startswith("WARNING") and line.endswith("the preprocessed cases the student does not train on]")


def test_prepare_accepts_a_fold_matched_teacher(env, monkeypatch):
    patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    teacher = model_folder(env["root"], DATASET, folds=(0,))
    kd = _distillation(env, settings(teacher, 0))
    assert ": ok, none of the 2 validation cases" in kd.check_teacher_fold(dict.fromkeys(TRAIN, 0), VAL, 0)


# ------------------------------------------------------------------------------------------ lorkd-kd set
def test_set_previews_every_student_fold(env, monkeypatch, capsys):
    patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    teacher = model_folder(env["root"], DATASET, folds=(0,))
    assert main(["set", "-d", "950", "-c", "3d_fullres", "--teacher", teacher, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Teacher fold check (it runs again when a student fold starts training):" in out
    assert "  student fold 0: ok: none of the 2 validation cases is a teacher training case" in out
    assert "  student fold 1: REFUSED at training start: the teacher trained on 4 of its 4 validation cases" in out
    assert read_config(env["folder"])["3d_fullres"].allow_teacher_fold_overlap is False


def test_set_fold_all_warns_and_the_flag_is_stored(env, monkeypatch, capsys):
    patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    teacher = model_folder(env["root"], DATASET, folds=("all",))
    argv = ["set", "-d", "950", "-c", "3d_fullres", "--teacher", teacher, "--teacher-fold", "all", "--device", "cpu"]
    assert main([*argv, "--allow-teacher-fold-overlap"]) == 0
    out = capsys.readouterr().out
    assert "note: teacher fold 'all' was trained on every case of Dataset950_KDToy" in out
    assert "student fold 0: allowed by --allow-teacher-fold-overlap, logged as a WARNING" in out
    assert read_config(env["folder"])["3d_fullres"].allow_teacher_fold_overlap is True
    with open(os.path.join(env["folder"], "lorkd_kd.json")) as f:
        data = json.load(f)
    assert data["configurations"]["3d_fullres"]["allow_teacher_fold_overlap"] is True


def test_allow_option_must_be_a_boolean(tmp_path):
    entry = {"plans": "P", "teacher": {"model_folder": "/m"}, "allow_teacher_fold_overlap": "yes"}
    (tmp_path / "lorkd_kd.json").write_text(json.dumps({"version": 1, "configurations": {"2d": entry}}))
    with pytest.raises(KDConfigError, match="allow_teacher_fold_overlap must be true or false, got 'yes'"):
        read_config(str(tmp_path))
