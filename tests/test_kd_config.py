"""lorkd_kd.json and the lorkd-kd CLI: what is written, what is refused and how the errors read."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
from kd_toy import DATASET, FakeTeacher, nnunet_env, patch_load_teacher, teacher_folder, write_dataset

from nnunetv2_lorkd.kd.cli import main
from nnunetv2_lorkd.kd.config import (
    KDConfigError,
    KDSettings,
    TeacherRef,
    read_config,
    remove_settings,
    settings_for,
    write_settings,
)

CLASSES = ("liver", "spleen", "urinary_bladder", "heart")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    env = nnunet_env(monkeypatch, str(tmp_path))
    folder = write_dataset(env["nnUNet_preprocessed"])
    return folder, teacher_folder(str(tmp_path))


def test_settings_round_trip_and_other_configurations_kept(tmp_path):
    ref = TeacherRef("/models/t", "all", "checkpoint_best.pth", (("urinary_bladder", "bladder"),))
    a = KDSettings("nnUNetPlans", ref, "cached", 0.5, 2.0, teacher_exclusive=False)
    b = KDSettings("nnUNetPlans", TeacherRef("/models/u"), "online")
    write_settings(str(tmp_path), "3d_fullres", a)
    write_settings(str(tmp_path), "2d", b)
    assert read_config(str(tmp_path)) == {"3d_fullres": a, "2d": b}
    data = json.loads((tmp_path / "lorkd_kd.json").read_text())
    assert data["version"] == 1
    assert data["configurations"]["3d_fullres"]["teacher"] == {
        "model_folder": "/models/t", "fold": "all", "checkpoint": "checkpoint_best.pth",
        "class_aliases": {"urinary_bladder": "bladder"}}  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["lorkd_kd.json"]  # no temp file left behind
    assert settings_for(str(tmp_path), "3d_fullres", "nnUNetPlans") == a
    assert settings_for(str(tmp_path), "3d_lowres", "nnUNetPlans") is None
    with pytest.raises(KDConfigError, match=r"set for plans 'nnUNetPlans'.*uses plans 'Other'.*-p Other"):
        settings_for(str(tmp_path), "3d_fullres", "Other")
    assert remove_settings(str(tmp_path), "2d") and read_config(str(tmp_path)) == {"3d_fullres": a}
    assert not remove_settings(str(tmp_path), "2d")
    assert remove_settings(str(tmp_path)) and read_config(str(tmp_path)) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": 0.0}, "weight must be a finite number > 0.*lorkd-kd off"),
        ({"weight": -1.0}, "weight must be"),
        ({"weight": math.nan}, "weight must be"),
        ({"temperature": 0}, "temperature must be"),
        ({"mode": "lazy"}, "mode must be one of"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(KDConfigError, match=message):
        KDSettings("nnUNetPlans", TeacherRef("/m"), **kwargs)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"version": 7, "configurations": {}}', "expected an object with version 1"),
        ('{"version": 1, "configurations": {"2d": {"plans": "P"}}}', r"configurations.2d lacks \['teacher'\]"),
        (
            '{"version": 1, "configurations": {"2d": {"plans": "P", "teacher": {"model_folder": "/m", "fold": "x"}}}}',
            "fold must be an integer >= 0 or 'all'",
        ),
        (
            '{"version": 1, "configurations": {"2d": {"plans": "P", "teacher": {"model_folder": "/m"}, "lambda": 1}}}',
            r"unknown keys \['lambda'\]",
        ),
    ],
)
def test_malformed_file_gives_one_clear_error(tmp_path, content, message):
    (tmp_path / "lorkd_kd.json").write_text(content)
    with pytest.raises(KDConfigError, match=message):
        read_config(str(tmp_path))


def test_cli_set_show_off(toy, monkeypatch, capsys):
    folder, model = toy
    calls = patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    code = main(["set", "-d", "950", "-c", "3d_fullres", "--teacher", model, "--mode", "cached", "--weight", "0.5",
                 "--temperature", "2", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "abdomen: case abd_000" in out and "pelvis: case pel_000" in out  # probed on real patches
    assert "Next: lorkd-kd cache -d Dataset950_KDToy -c 3d_fullres" in out
    settings = read_config(folder)["3d_fullres"]
    assert settings == KDSettings("nnUNetPlans", TeacherRef(model, 0), "cached", 0.5, 2.0, teacher_exclusive=False)
    # the teacher was loaded with the student's preprocessing, so the teachers package can refuse a mismatch
    assert calls[0]["student"] is not None and calls[0]["student"].spacing == (2.0, 1.0, 1.0)

    assert main(["cache", "-d", DATASET, "-c", "3d_fullres", "--device", "cpu"]) == 0
    assert "Soft labels of 8 cases" in capsys.readouterr().out
    assert main(["show", "-d", "950"]) == 0
    out = capsys.readouterr().out
    assert '"mode": "cached"' in out and "up to date (8 cases, uint8)" in out

    assert main(["off", "-d", "950", "-c", "3d_fullres"]) == 0
    assert not os.path.exists(os.path.join(folder, "lorkd_kd.json"))
    assert main(["show", "-d", "950"]) == 0
    assert "distillation is OFF" in capsys.readouterr().out


def test_cli_errors(toy, monkeypatch, capsys):
    folder, model = toy
    patch_load_teacher(monkeypatch, FakeTeacher(("liver", "spleen")))  # no urinary_bladder
    assert main(["set", "-d", "950", "-c", "3d_fullres", "--teacher", model, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no class for 1 of the 3 requested names: 'urinary_bladder'" in err
    assert not os.path.exists(os.path.join(folder, "lorkd_kd.json"))  # nothing written on failure

    patch_load_teacher(monkeypatch, FakeTeacher(CLASSES))
    for argv, message in [
        (["set", "-d", "950", "-c", "3d_lowres", "--teacher", model], "configuration '3d_lowres' is not in"),
        (["set", "-d", "951", "-c", "3d_fullres", "--teacher", model], "Could not find a dataset with the ID 951"),
        (["set", "-d", "950", "-c", "3d_fullres", "--teacher", model, "--weight", "0"], "weight must be"),
        (["set", "-d", "950", "-c", "3d_fullres", "--teacher", model, "--teacher-fold", "x"], "fold must be"),
        (["set", "-d", "950", "-c", "3d_fullres", "--teacher", model, "--class-alias", "liver"], "STUDENT_NAME="),
        (["cache", "-d", "950", "-c", "3d_fullres"], "no KD settings for configuration '3d_fullres'.*lorkd-kd set"),
    ]:
        assert main([*argv, "--device", "cpu"] if argv[0] != "off" else argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lorkd-kd: error:")
        assert re.search(message, err), (message, err)
