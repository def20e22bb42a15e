"""End-to-end `lorkd-classify` on tiny synthetic MedMNIST-format files: train -> evaluate -> fuse -> evaluate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cls_helpers import one_torch_thread, write_npz

from nnunetv2_lorkd.classification.cli import main
from nnunetv2_lorkd.classification.export import load_exported
from nnunetv2_lorkd.classification.train import load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def tiny_set(tmp_path: Path) -> list[str]:
    return [
        str(write_npz(tmp_path / "grey3.npz", 3, n=(30, 9, 9), seed=1)),
        str(write_npz(tmp_path / "rgb2.npz", 2, n=(20, 6, 6), rgb=True, seed=2)),
    ]


def test_train_evaluate_fuse_end_to_end(tmp_path: Path, tiny_set: list[str], capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    common = ["--epochs", "1", "--batch-size", "16", "--no-progress", "--device", "cpu"]
    assert main(["train", "--data", *tiny_set, "--out", str(run), "--teacher-epochs", "1", *common]) == 0
    out = capsys.readouterr().out
    assert "[teacher] epoch 1/1" in out and "+ 1 x kd" in out  # KD weight logged, non-zero by default
    student, payload = load_checkpoint(run / "student.pt")
    assert student.has_experts and student.task_names == ["grey3", "rgb2"]
    assert student.config["arch"]["in_channels"] == 3  # grey tasks are repeated to RGB beside an RGB task
    assert payload["history"][0]["kd_weight"] == 1.0 and payload["history"][0]["kd"] > 0
    assert torch.load(run / "teacher.pt", weights_only=True)["kind"] == "teacher"

    # a second student reuses the trained teacher
    assert (
        main(
            [
                "train",
                "--data",
                *tiny_set,
                "--out",
                str(tmp_path / "run2"),
                "--teacher",
                str(run / "teacher.pt"),
                "--no-experts",
                *common,
            ]
        )
        == 0
    )
    assert not load_checkpoint(tmp_path / "run2" / "student.pt")[0].has_experts

    metrics_json = tmp_path / "m.json"
    assert main(["evaluate", str(run / "student.pt"), "--data", *tiny_set, "--json", str(metrics_json)]) == 0
    routed = json.loads(metrics_json.read_text())["metrics"]
    assert set(routed) == {"grey3", "rgb2"} and routed["grey3"]["n"] == 9

    assert main(["fuse", str(run / "student.pt"), "--out", str(run / "fused")]) == 0
    module, meta = load_exported(run / "fused" / "rgb2.pt2")
    assert meta["class_names"] == ["0", "1"] and meta["in_channels"] == 3
    assert module(torch.rand(3, 3, 12, 12) * 255).shape == (3, 2)

    fused_json = tmp_path / "f.json"
    assert main(["evaluate", str(run / "fused"), "--data", *tiny_set, "--json", str(fused_json)]) == 0
    fused = json.loads(fused_json.read_text())["metrics"]
    for task in routed:  # the deployed models score exactly what the routed student scores
        assert fused[task]["acc"] == pytest.approx(routed[task]["acc"])
        assert fused[task]["auc"] == pytest.approx(routed[task]["auc"], abs=1e-6)


def test_benchmark_subcommand_on_tiny_files(tmp_path: Path, tiny_set: list[str]) -> None:
    (tmp_path / "organmnist_ts_info.json").write_text("{}")  # files made by build-organmnist: label caveat
    out = tmp_path / "bench"
    args = [
        "benchmark",
        "--data",
        *tiny_set,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--teacher-epochs",
        "1",
        "--batch-size",
        "32",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    table = (out / "benchmark.md").read_text()
    assert table.startswith("Labels are TotalSegmentator 2.18.0 model predictions")
    for row in ("teacher", "LoRKD student", "MTL student", "single-task students"):
        assert row in table
    results = json.loads((out / "benchmark.json").read_text())
    lorkd = next(r for r in results["rows"] if r["model"].startswith("LoRKD"))
    mtl = next(r for r in results["rows"] if r["model"].startswith("MTL"))
    assert lorkd["params_deployed"] == mtl["params_deployed"]  # fused expert = plain backbone size
    assert lorkd["params_stored"] > mtl["params_stored"]


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = write_npz(tmp_path / "bad.npz", 3, train_labels=np.full((24, 1), -2))
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorkd-classify: error:") and str(bad) in err and "negative label" in err
    assert "\n" not in err and not (tmp_path / "r").exists()
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--data", str(write_npz(tmp_path / "ok.npz", 3))]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
