"""lorkd-demo end to end on the real scans with the reduced `tiny` preset (two regions, 1 epoch x 4 iterations per
model, CPU): every stage through the real commands, the report, and resuming (a second run skips every stage).

Needs the TotalSegmentator 2.18.0 sdist (cached in the shared download cache, or downloadable); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunetv2_lorkd.data.scans import REGIONS
from nnunetv2_lorkd.data.sources import SourceUnavailableError, fetch_archive_files
from nnunetv2_lorkd.demo.run import STAGES

pytestmark = pytest.mark.slow


def _demo(work: Path, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # the demo sets its own paths
    result = subprocess.run(
        [sys.executable, "-m", "nnunetv2_lorkd.demo.run", "--preset", "tiny", "--work", str(work), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, f"lorkd-demo failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def test_tiny_preset_end_to_end_then_resume(tmp_path: Path) -> None:
    try:
        fetch_archive_files(REGIONS["abdomen"].archive)
    except SourceUnavailableError as error:
        pytest.skip(f"the TotalSegmentator sdist is neither cached nor downloadable here: {error}")
    work = tmp_path / "work"
    start = time.perf_counter()
    out = _demo(work)
    first = time.perf_counter() - start
    print(f"tiny preset, first run: {first:.0f} s")
    for index, stage in enumerate(STAGES, start=1):
        assert f"stage {index}/{len(STAGES)} {stage}:" in out, stage
    assert "elapsed, ~" in out and "left]" in out  # progress: elapsed and time left on every line
    assert "SAT-style teacher: epoch 1/1" in out

    run = work / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["regions"]) == ["abdomen", "pelvis"]
    for region, data in metrics["regions"].items():
        assert set(data["methods"]) == {"teacher", "lorkd", "mtl", "specialist"}
        assert "liver" in data["classes"] if region == "abdomen" else "urinary_bladder" in data["classes"]
        for method, scores in data["methods"].items():
            assert 0.0 <= scores["mean_dice"] <= 1.0 and 0.0 <= scores["mean_nsd"] <= 1.0, (region, method)
        assert all(n > 0 for n in data["test_voxels"].values())
    params = metrics["parameters"]
    assert params["lorkd"]["experts"] > 0 and params["mtl"]["experts"] == 0
    assert all(n < params["lorkd"]["total"] for n in params["lorkd_fused"].values())

    report = (run / "report" / "report.md").read_text()
    assert report.startswith("# LoRKD demo report — preset `tiny` (SMOKE RUN)")
    assert "Goal: (1) Every model segments the large organs" in report and "This run: the goal is **" in report
    assert "| liver (85) |" in report  # the landmark class of the abdomen is judged for every model
    assert "## Learning curves" in report and (run / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert set(metrics["curves"]) == {"teacher", "lorkd", "mtl", "specialist"}
    assert all(len(c["values"]) == 1 for per_region in metrics["curves"].values() for c in per_region.values())
    train_logs = {p.name: p.read_text() for p in (run / "logs").glob("train_*.log")}
    assert all("lorkd-demo: seed 0" in text for text in train_logs.values()), list(train_logs)
    # left and right organs are different classes: no mirroring in any model's training
    assert all("no mirroring (left/right classes), rotation up to 15 degrees" in t for t in train_logs.values())
    # the students and the MTL baseline start from the teacher's backbone
    assert "-pretrained_weights" in train_logs["train_nnUNetTrainerLoRKD_Dataset700_LoRKDMerged.log"]
    assert "-pretrained_weights" in train_logs["train_nnUNetTrainerMTL_Dataset700_LoRKDMerged.log"]
    assert "not manual annotations" in report and "| **mean** |" in report
    for region in ("abdomen", "pelvis"):
        assert (run / "report" / f"{region}.png").read_bytes()[:4] == b"\x89PNG"
        for case in json.loads((work / "nnUNet_raw" / f"Dataset70{1 if region == 'abdomen' else 2}_LoRKD"
                                f"{region.capitalize()}" / "lorkd_data.json").read_text())["test_cases"]:  # fmt: skip
            for method in ("lorkd", "specialist"):
                assert (run / "predictions" / method / region / f"{case}.nii.gz").is_file()
        fused = work / "nnUNet_results" / "Dataset700_LoRKDMerged" / f"nnUNetTrainer__nnUNetPlansDemoTiny_{region}__2d"
        assert (fused / "fold_0" / "checkpoint_final.pth").is_file()
    assert "max |routed - fused|" in (run / "logs" / "fuse.log").read_text()

    # resuming: every stage is found done and skipped; the report is written again
    start = time.perf_counter()
    again = _demo(work)
    assert "up to date" in again
    for stage in STAGES[1:-1]:
        assert f"{stage}: already done, skipped" in again, stage
    assert time.perf_counter() - start < first / 2
    # --redo evaluate recomputes evaluate (and the report), nothing before it
    redone = _demo(work, "--redo", "evaluate")
    assert "evaluate: done in" in redone and "predict: already done, skipped" in redone

    # a second seed trains every model again beside the first (seed 0 is found done) and reports mean and spread
    seeded = _demo(work, "--seeds", "2")
    assert "seed 1 of 0..1" in seeded and "mean and spread over 2 seeds" in seeded
    assert (work / "nnUNet_results_seed1" / "Dataset700_LoRKDMerged").is_dir()
    seed1_log = work / "tiny_seed1" / "logs" / "train_nnUNetTrainerLoRKD_Dataset700_LoRKDMerged.log"
    assert "lorkd-demo: seed 1" in seed1_log.read_text()
    seeds_md = (run / "report" / "seeds.md").read_text()
    assert seeds_md.startswith("# LoRKD demo, preset `tiny`: 2 seeds (0, 1)")
    assert "| abdomen | lorkd - mtl |" in seeds_md
