"""The demo report from fake metrics: goal verdict per region, markdown tables, caveats, PNG charts; the demo
trainer variants and the CPU preset's small plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunetv2_lorkd.demo.evaluate import METHOD_NAMES, restricted_argmax, to_local
from nnunetv2_lorkd.demo.presets import BASE_TRAINERS, PRESETS, get_preset
from nnunetv2_lorkd.demo.report import GOAL, render_markdown, verdict, write_report

TS_NOTE = "TotalSegmentator labels are that model's predictions, not manual annotations."


def _method(mean: float, per_class: dict[str, float | None]) -> dict:
    return {"dice": per_class, "nsd": dict(per_class), "mean_dice": mean, "mean_nsd": mean}


def fake_metrics() -> dict:
    """abdomen: LoRKD beats teacher and MTL and is 1 point below the specialist (met, at the boundary);
    pelvis: LoRKD is below MTL (not met)."""
    return {
        "tolerance_mm": 3.0,
        "methods": METHOD_NAMES,
        "regions": {
            "abdomen": {
                "dataset": "Dataset701_LoRKDAbdomen",
                "classes": ["liver", "spleen"],
                "test_voxels": {"liver": 100, "spleen": 50},
                "methods": {
                    "teacher": _method(0.70, {"liver": 0.8, "spleen": 0.6}),
                    "lorkd": _method(0.79, {"liver": 0.9, "spleen": 0.68}),
                    "mtl": _method(0.75, {"liver": 0.85, "spleen": 0.65}),
                    "specialist": _method(0.80, {"liver": 0.9, "spleen": 0.7}),
                },
            },
            "pelvis": {
                "dataset": "Dataset702_LoRKDPelvis",
                "classes": ["urinary_bladder", "prostate"],
                "test_voxels": {"urinary_bladder": 80, "prostate": 0},
                "methods": {
                    "teacher": _method(0.50, {"urinary_bladder": 0.5, "prostate": None}),
                    "lorkd": _method(0.55, {"urinary_bladder": 0.55, "prostate": None}),
                    "mtl": _method(0.60, {"urinary_bladder": 0.6, "prostate": None}),
                    "specialist": _method(0.56, {"urinary_bladder": 0.56, "prostate": None}),
                },
            },
        },
        "parameters": {
            "teacher": {"total": 2_000_000, "experts": 0},
            "lorkd": {"total": 1_500_000, "experts": 300_000},
            "mtl": {"total": 1_200_000, "experts": 0},
            "lorkd_fused": {"abdomen": 1_200_000, "pelvis": 1_200_000},
            "specialist": {"abdomen": 1_200_000, "pelvis": 1_200_000},
        },
    }


def fake_run(smoke: bool) -> dict:
    return {
        "preset": "cpu" if smoke else "gpu",
        "description": "SMOKE RUN: a tiny thing" if smoke else "benchmark",
        "smoke": smoke,
        "configuration": "2d",
        "plans": "nnUNetPlansDemoCPU",
        "epochs": 6,
        "teacher_epochs": 12,
        "iterations": 20,
        "trainers": {b: f"{b}_demoCPU" for b in BASE_TRAINERS},
        "kd_mode": "cached",
        "machine": "test machine",
        "runs": [{"wall_seconds": 600.0, "ended": "now"}],
        "wall_seconds_all_runs": 600.0,
        "data": {
            "labels_notes": [TS_NOTE],
            "skipped_regions": {"brain": "apt-get is not available"},
            "split": {
                "method": "z-slabs",
                "parts": [
                    {"case_id": "abdomen_tr00", "region": "abdomen", "scan_id": "s", "split": "train", "z_mm": [0, 30]},
                    {"case_id": "abdomen_ts00", "region": "abdomen", "scan_id": "s", "split": "test", "z_mm": [33, 50]},
                ],
            },
        },
        "work": "/tmp/work",
        "logs": "/tmp/work/cpu/logs",
    }


def test_verdict_per_region_and_overall() -> None:
    result = verdict(fake_metrics())
    assert result["regions"]["abdomen"]["met"] is True
    assert result["regions"]["pelvis"]["checks"] == {
        "lorkd >= teacher": True,
        "lorkd >= mtl": False,
        "lorkd >= specialist - 0.03": True,
    }
    # 1 of 2 regions beats both baselines; ceil(0.75 * 2) = 2 are needed
    assert (result["beaten"], result["needed"]) == (1, 2)
    # the teacher's liver Dice (80) is below the 85 every model must reach
    assert result["parts"] == {"segments": False, "beats_baselines": False, "near_specialists": True}
    assert result["met"] is False
    metrics = fake_metrics()
    metrics["regions"]["abdomen"]["methods"]["teacher"]["dice"]["liver"] = 0.85
    metrics["regions"]["pelvis"]["methods"]["mtl"]["mean_dice"] = 0.55  # a tie is "at least"
    assert verdict(metrics)["met"] is True
    metrics["regions"]["abdomen"]["methods"]["lorkd"]["mean_dice"] = 0.77  # exactly 3 points below still counts
    assert verdict(metrics)["regions"]["abdomen"]["checks"]["lorkd >= specialist - 0.03"] is True
    metrics["regions"]["abdomen"]["methods"]["lorkd"]["mean_dice"] = 0.7699
    assert verdict(metrics)["regions"]["abdomen"]["checks"]["lorkd >= specialist - 0.03"] is False
    assert verdict(metrics)["parts"]["near_specialists"] is False
    metrics["regions"]["abdomen"]["methods"]["teacher"]["mean_dice"] = None
    assert verdict(metrics)["met"] is None


def test_landmark_classes_must_be_segmented_by_every_model() -> None:
    metrics = fake_metrics()
    assert verdict(metrics)["landmarks"]["liver"]["met"] is False  # the teacher's liver is 80 < 85
    metrics["regions"]["abdomen"]["methods"]["teacher"]["dice"]["liver"] = 0.85
    result = verdict(metrics)
    assert result["landmarks"]["liver"]["ok"] == {"teacher": True, "lorkd": True, "mtl": True, "specialist": True}
    assert result["parts"]["segments"] is True
    metrics["regions"]["abdomen"]["methods"]["mtl"]["dice"]["liver"] = None  # no liver predicted nor present
    assert verdict(metrics)["parts"]["segments"] is None


def test_markdown_states_goal_verdict_caveats_and_tables() -> None:
    text = render_markdown(fake_metrics(), fake_run(smoke=True), {"abdomen": "abdomen.png", "pelvis": "pelvis.png"})
    assert "SMOKE RUN" in text.splitlines()[0]
    assert GOAL in text and "the goal is **not met**" in text
    assert "LoRKD >= teacher and >= MTL on 1 of 2 regions (needed: 2): **not met**" in text
    assert "| abdomen | 70.0 | 79.0 | 75.0 | 80.0 | yes | yes | yes |" in text
    assert "| pelvis | 50.0 | 55.0 | 60.0 | 56.0 | yes | no | yes |" in text
    assert "| liver (85) | 80.0 ✗ | 90.0 | 85.0 | 90.0 | no |" in text
    assert TS_NOTE in text and "not evidence that results generalise" in text
    assert "Region brain was skipped: apt-get is not available" in text
    assert "| liver | 100 | 80.0 / 80.0 | 90.0 / 90.0 | 85.0 / 85.0 | 90.0 / 90.0 |" in text
    assert "| prostate | 0 | – / – |" in text  # undefined scores are shown as such, not as 0
    assert "LoRKD (stored: backbone + 2 experts) | 1.50 M (experts 0.30 M)" in text
    assert "nnU-Net specialists (2 models) | 2.40 M in total" in text
    assert "![abdomen](abdomen.png)" in text
    assert "training z (mm) 0..30; test z (mm) 33..50" in text
    benchmark = render_markdown(fake_metrics(), fake_run(smoke=False), {"abdomen": "a.png", "pelvis": "p.png"})
    assert "SMOKE" not in benchmark


def test_learning_curve_end_and_report_section(tmp_path: Path) -> None:
    from nnunetv2_lorkd.demo.curves import curve_end

    rising = curve_end([0.1 * i for i in range(10)])
    assert rising["state"] == "still rising" and rising["change"] == pytest.approx(0.2)
    flat = curve_end([0.0, 0.2, 0.5, 0.8, 0.81, 0.8, 0.82, 0.8, 0.81, 0.82])
    assert flat["state"] == "flat" and flat["final"] == pytest.approx(0.815)
    assert curve_end([0.5, None, 0.6])["state"] == "too short to judge"
    assert curve_end([0.0, 0.01, 0.0, 0.02, 0.01, 0.0, 0.01, 0.0, 0.02, 0.01])["state"] == "not learning yet"
    metrics = fake_metrics()
    values = [0.1 * i for i in range(10)]
    metrics["curves"] = {
        m: {r: {"iterations_per_epoch": 40, "values": values, "end": curve_end(values)} for r in ("abdomen", "pelvis")}
        for m in ("teacher", "lorkd", "mtl", "specialist")
    }
    path = write_report(metrics, fake_run(smoke=True), tmp_path / "report")
    text = path.read_text()
    assert "## Learning curves" in text and "![learning curves](curves.png)" in text
    assert "85.0 at 400 it. (still rising, +20.0 over the last fifth)" in text
    assert (tmp_path / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_aggregate_mean_spread_and_verdict_on_the_means(tmp_path: Path) -> None:
    from nnunetv2_lorkd.demo.seeds import aggregate, write_seeds_report

    runs = {}
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.02)):
        metrics = fake_metrics()
        metrics["regions"]["abdomen"]["methods"]["lorkd"]["mean_dice"] += shift
        metrics["regions"]["pelvis"]["methods"]["mtl"]["mean_dice"] = 0.55 + shift  # LoRKD - MTL: 0, -2, +2
        runs[seed] = metrics
    summary = aggregate(runs)
    assert summary["mean"]["regions"]["abdomen"]["methods"]["lorkd"]["mean_dice"] == pytest.approx(0.79)
    assert summary["sd"]["abdomen"]["lorkd"] == pytest.approx(0.02)
    assert summary["sd"]["abdomen"]["mtl"] == pytest.approx(0.0)
    assert summary["differences"]["pelvis"]["lorkd - mtl"] == pytest.approx([0.0, -0.02, 0.02])
    assert verdict(summary["mean"])["regions"]["pelvis"]["checks"]["lorkd >= mtl"] is True
    files = {}
    for seed, metrics in runs.items():
        files[seed] = tmp_path / f"metrics{seed}.json"
        files[seed].write_text(json.dumps(metrics))
    text = write_seeds_report(files, tmp_path / "report", "demo").read_text()
    assert text.startswith("# demo: 3 seeds (0, 1, 2)")
    assert "| abdomen | 70.0 ± 0.0 | 79.0 ± 2.0 | 75.0 ± 0.0 | 80.0 ± 0.0 | yes | yes | yes |" in text
    assert "| pelvis | lorkd - mtl | 0.0 | -2.0 | 2.0 | 0.0 | sign differs between seeds: not a result |" in text
    assert "| abdomen | lorkd - teacher | 9.0 | 11.0 | 7.0 | 9.0 | same sign in every seed (+) |" in text
    assert json.loads((tmp_path / "report" / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="no seed"):
        aggregate({})


def test_write_report_makes_markdown_and_one_png_per_region(tmp_path: Path) -> None:
    import matplotlib.image

    path = write_report(fake_metrics(), fake_run(smoke=True), tmp_path / "report")
    assert path.read_text().startswith("# LoRKD demo report")
    for region in ("abdomen", "pelvis"):
        png = tmp_path / "report" / f"{region}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert height > 200 and width > 400
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["abdomen.png", "pelvis.png", "report.md"]


def test_label_mapping_by_name_and_region_restricted_argmax() -> None:
    import numpy as np

    # a fused model numbers the region's labels in union order (aorta before heart), the region dataset does not
    prediction = np.array([[0, 1, 2, 3]])
    local = to_local(
        prediction, {"aorta": 1, "heart": 2, "pulmonary_artery": 3}, ["heart", "pulmonary_artery", "aorta"]
    )
    assert local.tolist() == [[0, 3, 1, 2]]
    with pytest.raises(Exception, match="has no label 'aorta'"):
        to_local(prediction, {"heart": 1}, ["heart", "aorta"])
    # union channels: 0 background, 1 liver (abdomen), 2 bladder (pelvis), 3 spleen (abdomen)
    probabilities = np.array([[0.2, 0.1, 0.5], [0.3, 0.2, 0.1], [0.4, 0.6, 0.1], [0.1, 0.25, 0.3]])[:, None, :]
    # voxels 0 and 1: the bladder wins overall, but among background/liver/spleen liver resp. spleen (local 2)
    # does; voxel 2: background
    assert restricted_argmax(
        probabilities, {"liver": 1, "urinary_bladder": 2, "spleen": 3}, ["liver", "spleen"]
    ).tolist() == [[1, 2, 0]]


def test_presets_and_demo_trainer_variants() -> None:
    from nnunetv2_lorkd_trainers import demo
    from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD

    for preset in PRESETS.values():
        for base in BASE_TRAINERS:
            cls = getattr(demo, preset.trainer(base))
            assert cls.__name__ in demo.__all__ and cls.__module__ == "nnunetv2_lorkd_trainers.demo"
    assert issubclass(demo.nnUNetTrainerLoRKD_demoCPU, nnUNetTrainerLoRKD)
    assert "24 epochs" in demo.nnUNetTrainerSATStyle_demoCPU.__doc__  # the teacher trains longer
    assert "16 epochs" in demo.nnUNetTrainerMTL_demoCPU.__doc__
    assert "no mirroring" in demo.nnUNetTrainerMTL_demoCPU.__doc__
    assert get_preset("cpu").configuration == "2d" and get_preset("gpu").configuration == "3d_fullres"
    # the longer cpu preset is the cpu preset with 3x the schedule: same plans, network, data and augmentation
    cpu, full = get_preset("cpu"), get_preset("cpu-full")
    assert (full.epochs, full.teacher_epochs) == (3 * cpu.epochs, 3 * cpu.teacher_epochs)
    assert "48 epochs" in demo.nnUNetTrainerLoRKD_demoCPUFull.__doc__
    # presets that share a plans file write the same small network into it (they would overwrite each other)
    by_plans: dict = {}
    for preset in PRESETS.values():
        by_plans.setdefault(preset.plans, set()).add((preset.configuration, preset.small_network))
    assert all(len(networks) == 1 for networks in by_plans.values()), by_plans
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("fast")
    with pytest.raises(ValueError, match="no demo variant"):
        get_preset("cpu").trainer("nnUNetTrainerFoo")


def test_small_plans_for_the_cpu_preset(tmp_path: Path) -> None:
    from nnunetv2_lorkd.demo.run import write_small_plans

    plans = {
        "plans_name": "nnUNetPlans",
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d",
                "batch_size": 12,
                "patch_size": [112, 128],
                "architecture": {
                    "arch_kwargs": {
                        "features_per_stage": [32, 64, 128, 256, 512],
                        "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 1]],
                    }
                },
            },
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2},
        },
    }
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    target = write_small_plans(tmp_path, get_preset("cpu"))
    small = json.loads(target.read_text())
    assert target.name == "nnUNetPlansDemoCPU.json" and small["plans_name"] == "nnUNetPlansDemoCPU"
    assert list(small["configurations"]) == ["2d"]
    config = small["configurations"]["2d"]
    # a quarter of nnU-Net's features, capped at 128
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 128]
    assert config["batch_size"] == 4 and config["data_identifier"] == "nnUNetPlansDemoCPU_2d"
    assert config["patch_size"] == [112, 128]  # the whole slice: below the 128 cap, multiples of 16 and 8


def test_progress_estimates_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunetv2_lorkd.demo import run as run_module

    clock = [100.0]
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    progress = run_module.Progress({"data": 0.5, "teacher": 1.0, "mtl": 1.0}, 10.0, out=lines.append)
    assert progress.left() == 25.0  # everything at the prior of 10 s per unit
    progress.begin("data", "building")
    clock[0] += 50
    progress.finish("data")  # a non-training stage measured at 100 s per unit
    assert progress.left() == 20.0  # training stages keep the prior until one of them finished
    progress.begin("teacher", "training")
    clock[0] += 30
    progress.step("epoch 1/2", 0.5)
    assert progress.left() == 15.0  # half of the teacher and all of the MTL baseline
    clock[0] += 30
    progress.finish("teacher")  # 60 s for one unit
    assert progress.left() == 60.0
    assert lines[-1] == "[lorkd-demo 01:50 elapsed, ~01:00 left]   teacher: done in 01:00"
    assert lines[0].startswith("[lorkd-demo 00:00 elapsed, ~00:25 left] stage 1/3 data: building")


def test_demo_leaves_out_an_unavailable_optional_region_loudly(tmp_path: Path) -> None:
    from nnunetv2_lorkd.demo.run import Demo, DemoError

    lines: list[str] = []
    demo = Demo(get_preset("gpu"), tmp_path, ("abdomen", "pelvis", "brain"), out=lines.append)
    assert demo.region_datasets["brain"] == "Dataset703_LoRKDBrain"
    manifest = {
        "regions": ["abdomen", "pelvis"],
        "skipped_regions": {"brain": "apt-get download mricron-data failed"},
        "datasets": {"abdomen": "Dataset701_LoRKDAbdomen", "pelvis": "Dataset702_LoRKDPelvis"},
        "merged": "Dataset700_LoRKDMerged",
    }
    demo.raw.mkdir(parents=True)
    (demo.raw / "lorkd_data_manifest.json").write_text(json.dumps(manifest))
    demo.adopt_manifest()
    assert demo.regions == ("abdomen", "pelvis") and "brain" not in demo.region_datasets
    assert any("optional region brain is left out" in line and "apt-get" in line for line in lines)
    manifest["regions"] = ["abdomen"]  # a required region missing is an error, not a skip
    (demo.raw / "lorkd_data_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DemoError, match="lorkd-data built regions"):
        demo.adopt_manifest()


def test_demo_environment_keeps_zero_da_workers_away_from_the_planner(tmp_path, monkeypatch):
    """An exported nnUNet_n_proc_DA=0 reaches training commands only: nnU-Net's planner fails on it."""
    from nnunetv2_lorkd.demo.run import Demo

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    demo = Demo(preset=PRESETS["cpu"], work=tmp_path, regions=("abdomen", "pelvis"), out=lambda _: None)
    assert "nnUNet_n_proc_DA" not in demo.env()
    assert demo.env(training=True)["nnUNet_n_proc_DA"] == "0"
    assert demo.env()["nnUNet_raw"] == str(tmp_path.resolve() / "nnUNet_raw")
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")
    assert demo.env()["nnUNet_n_proc_DA"] == "3"  # any other value is the user's choice


def test_kd_stage_resets_the_teacher_another_seed_left_in_the_shared_preprocessed_folder(tmp_path: Path) -> None:
    """Every seed shares nnUNet_preprocessed (and so lorkd_kd.json): a seed's KD stage is skipped only while the
    settings still name that seed's own teacher."""
    from nnunetv2_lorkd.demo.run import Demo
    from nnunetv2_lorkd.kd.config import KDSettings, TeacherRef, write_settings

    demos = [Demo(preset=PRESETS["cpu"], work=tmp_path, regions=("abdomen",), out=lambda _: None, seed=s)
             for s in (0, 1)]  # fmt: skip
    assert demos[0].results != demos[1].results and demos[0].run_dir != demos[1].run_dir
    assert demos[1].env()["LORKD_DEMO_SEED"] == "1"
    calls: list[list[str]] = []
    folder = tmp_path / "nnUNet_preprocessed" / demos[0].merged
    folder.mkdir(parents=True)

    def fake_run(name, args, watch=None, training=False, demo=None):
        calls.append([str(a) for a in args])
        teacher = str(demo.model_folder(demo.merged, "nnUNetTrainerSATStyle"))
        write_settings(str(folder), "2d", KDSettings(plans=demo.preset.plans, teacher=TeacherRef(teacher)))

    for demo in demos:
        demo.run = lambda name, args, watch=None, training=False, demo=demo: fake_run(name, args, watch, training, demo)
    assert demos[0].stage_kd() is True and len(calls) == 1
    assert demos[0].stage_kd() is False  # its own teacher is still set: skipped
    assert demos[1].stage_kd() is True and str(demos[1].results) in " ".join(calls[-1])
    assert demos[0].stage_kd() is True and str(demos[0].results) in " ".join(calls[-1])  # seed 1's teacher replaced
