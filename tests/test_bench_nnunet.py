"""lorkd-bench-nnunet: its report pieces (targets, the markdown section, argument errors, synthetic data) and, as
a slow test, one --quick run through nnU-Net (synthetic dataset, lorkd-merge, planning, both trainers, lorkd-fuse,
nnUNetPredictor), on synthetic data and again with -d on the data that run kept. Timings are not checked."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_lorkd.benchmarks import experts as bench
from nnunetv2_lorkd.benchmarks import nnunet as bench_nnunet
from nnunetv2_lorkd.benchmarks.common import Row, Section, Timing


def _section(reference: str, ours: str, ref_ms: float, ours_ms: float) -> Section:
    rows = [Row(reference, Timing(ref_ms, ref_ms, ref_ms, 3)), Row(ours, Timing(ours_ms, ours_ms, ours_ms, 3))]
    return Section("t", "c", rows, reference, ours)


def test_targets_ratio_limits_and_two_sided_prediction():
    sections = {
        "step": _section("nnUNetTrainer train_step", "nnUNetTrainerLoRKD train_step", 100.0, 108.0),
        "predict": _section("vanilla", "fused", 100.0, 96.0),
    }
    cpu = bench_nnunet.evaluate_targets(sections, torch.device("cpu"), quick=False)
    assert [(round(t.value, 3), t.limit, t.passed) for t in cpu] == [(1.08, 1.10, True), (0.96, 1.03, True),
                                                                    (0.96, 0.97, False)]  # fmt: skip
    assert cpu[0].description == "nnUNetTrainerLoRKD / nnUNetTrainer train_step (cpu)"
    gpu = bench_nnunet.evaluate_targets(sections, torch.device("cuda"), quick=False)
    assert gpu[0].limit == 1.05 and gpu[0].passed is False
    quick = bench_nnunet.evaluate_targets(sections, torch.device("cpu"), quick=True)
    assert all(t.passed is None for t in quick)


def _existing_docs() -> str:
    return (
        "# Benchmarks\n\nintro\n\n## Expert convolutions (issue: core)\n\n### CPU (x)\n\ntable\n\n"
        f"{bench.GPU_PLACEHOLDER}\n\n## Classification (issue: side-module)\n\nother text\n"
    )


def test_markdown_section_created_appended_and_gpu_placeholder_replaced(tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text(_existing_docs())
    bench_nnunet.write_markdown(md, "### CPU (run 1)\n\nnumbers 1\n", torch.device("cpu"))
    text = md.read_text()
    assert text.startswith(_existing_docs().rstrip("\n"))  # the other sections are untouched
    ours = text[text.index(bench_nnunet.SECTION_HEADING) :]
    assert ours.index("lorkd-bench-nnunet") < ours.index("### CPU (run 1)") < ours.index(bench_nnunet.GPU_PLACEHOLDER)

    md.write_text(md.read_text() + "\n## Later section\n\nlater text\n")  # our section is no longer the last
    bench_nnunet.write_markdown(md, "### CPU (run 2)\n\nnumbers 2\n", torch.device("cpu"))
    bench_nnunet.write_markdown(md, "### GPU (run 3)\n\nnumbers 3\n", torch.device("cuda"))
    text = md.read_text()
    assert text.count(bench_nnunet.SECTION_HEADING) == 1
    assert bench_nnunet.GPU_PLACEHOLDER not in text and bench.GPU_PLACEHOLDER in text  # only our placeholder went
    order = ["## Expert convolutions", "## Classification", bench_nnunet.SECTION_HEADING, "### CPU (run 1)",
             "### GPU (run 3)", "### CPU (run 2)", "## Later section", "later text"]  # fmt: skip
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    bench_nnunet.write_markdown(md, "### GPU (run 4)\n", torch.device("cuda"))  # no placeholder left: appended
    assert text.index("### CPU (run 2)") < md.read_text().index("### GPU (run 4)") < md.read_text().index("## Later")
    assert not list(tmp_path.glob(".*.tmp"))


def test_markdown_new_file(tmp_path):
    md = tmp_path / "new" / "b.md"
    bench_nnunet.write_markdown(md, "### CPU (r)\n", torch.device("cpu"))
    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and bench_nnunet.SECTION_HEADING in text and "### CPU (r)" in text


def test_argument_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert bench_nnunet.main(["-d", "600", "--device", "cpu"]) == 2
    assert "-d needs nnUNet_preprocessed" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert bench_nnunet.main(["--work-dir", str(tmp_path / "full"), "--device", "cpu"]) == 2
    assert "is not empty" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_nnunet.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_synthetic_raw_datasets(tmp_path):
    test_image = bench_nnunet.write_synthetic_raw(tmp_path / "raw", (6, 10, 12), cases_per_region=2, seed=1)
    for dataset_id, (region, structures) in zip(
        bench_nnunet.SYNTHETIC_SOURCE_IDS, bench_nnunet.SYNTHETIC_REGIONS, strict=True
    ):
        folder = tmp_path / "raw" / f"Dataset{dataset_id}_{region.capitalize()}"
        labels = json.loads((folder / "dataset.json").read_text())["labels"]
        assert labels == {"background": 0, **{n: i for i, n in enumerate(structures, start=1)}}
        segs = sorted((folder / "labelsTr").glob("*.nii.gz"))
        assert len(segs) == 2 and len(list((folder / "imagesTr").glob("*_0000.nii.gz"))) == 2
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(segs[0])))
        assert seg.shape == (6, 10, 12) and set(np.unique(seg)) == set(labels.values())  # every structure drawn
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(test_image))).shape == (6, 15, 18)  # 1.5x in-plane


# --------------------------------------------------------------------------------------- the quick run
_ROW = re.compile(r"^  (.+?)\s+([0-9.]+)\s+([0-9.]+)-([0-9.]+)\s+([0-9.]+)x\s+([0-9.]+)x$")
_TARGET = re.compile(r"^  (.+?): ([0-9.]+)x \(target (<=|>=) ([0-9.]+)x\)\s+(.*)$")


def _bench(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "nnunetv2_lorkd.benchmarks.nnunet", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _tables(out: str) -> dict[str, dict[str, float]]:
    """title -> {row name: median ms} of every printed table."""
    tables: dict[str, dict[str, float]] = {}
    title = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            title = line
        elif (m := _ROW.match(line)) and title is not None:
            tables.setdefault(title, {})[m.group(1)] = float(m.group(2))
    return tables


def _check_quick_output(out: str, region: str) -> None:
    assert "QUICK MODE" in out and "machine: CPU" in out
    tables = _tables(out)
    step = tables["train_step on identical batches"]
    assert list(step) == ["nnUNetTrainer train_step", "nnUNetTrainerLoRKD train_step"]
    iteration = tables["full training iteration (data loading in-process, nnUNet_n_proc_DA=0)"]
    assert list(iteration) == [
        "nnUNetTrainer: train_step(next(loader))",
        "nnUNetTrainerLoRKD: train_step(next(loader))",
    ]
    prediction = next(v for k, v in tables.items() if k.startswith("sliding-window prediction"))
    assert list(prediction) == ["vanilla nnUNetTrainer model", f"fused {region} model (lorkd-fuse)"]
    assert all(math.isfinite(ms) and ms > 0 for t in tables.values() for ms in t.values())
    (delta,) = re.findall(r"max \|routed - fused\| = ([0-9.e+-]+)", out.split("sliding-window")[0])
    assert float(delta) <= 1e-4  # the timed fused model is the trained LoRKD model
    summary = out.split("summary (")[1].splitlines()[1:]
    targets = [m for m in map(_TARGET.match, summary) if m]
    assert [m.group(1) for m in targets] == [
        "nnUNetTrainerLoRKD / nnUNetTrainer train_step (cpu)",
        "fused / vanilla prediction (cpu), upper",
        "fused / vanilla prediction (cpu), lower",
    ]
    assert [(m.group(3), float(m.group(4))) for m in targets] == [("<=", 1.1), ("<=", 1.03), (">=", 0.97)]
    ratio = step["nnUNetTrainerLoRKD train_step"] / step["nnUNetTrainer train_step"]
    assert float(targets[0].group(2)) == pytest.approx(ratio, abs=2e-3)
    assert all(m.group(5).startswith("n/a") for m in targets)  # quick mode gives no verdict
    assert "CPU taken by other processes" in out


@pytest.mark.slow
def test_quick_run_synthetic_then_existing_dataset(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["nnUNet_n_proc_DA"] = "0"  # what CPU users export; nnU-Net's planner alone would fail on it
    env["TMPDIR"] = str(tmp_path / "tmp")  # the benchmark's temporary folder must be gone afterwards
    (tmp_path / "tmp").mkdir()
    md = tmp_path / "benchmarks.md"
    md.write_text(_existing_docs())
    work = tmp_path / "work"
    out = _bench(["--quick", "--device", "cpu", "--markdown", str(md), "--work-dir", str(work)], tmp_path, env)
    _check_quick_output(out, "abdomen")
    text = md.read_text()
    section = text[text.index(bench_nnunet.SECTION_HEADING) :]
    assert "### CPU (" in section and "Machine: CPU" in section and "QUICK MODE" in section
    assert section.count("| variant | median ms |") == 3
    assert "| target | measured | 90% CI | limit | result |" in section
    assert bench_nnunet.GPU_PLACEHOLDER in section
    fused_models = list((work / "results").glob("*/nnUNetTrainer__nnUNetPlans_abdomen__3d_fullres/fold_0"))
    assert len(fused_models) == 1

    # -d: an existing preprocessed dataset (the one just kept); its results go to a temporary folder
    env_d = {**env, "nnUNet_preprocessed": str(work / "preprocessed"), "nnUNet_raw": str(work / "raw")}
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    out = _bench(["--quick", "--device", "cpu", "-d", str(bench_nnunet.SYNTHETIC_ID), "--region", "pelvis"],
                 tmp_path, env_d)  # fmt: skip
    _check_quick_output(out, "pelvis")
    assert "preprocessed case pel_" in out
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written into the dataset
    assert not list((tmp_path / "tmp").glob("lorkd-bench-nnunet-*"))  # torch may leave its own caches there
