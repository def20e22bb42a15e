"""Fused per-task models load and run with torch alone, in a process where nnunetv2_lorkd cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cls_helpers import one_torch_thread, randomize, tiny_model

from nnunetv2_lorkd.classification.export import export_fused_models, load_exported

LOADER = """
import json, sys
try:
    import nnunetv2_lorkd  # the shadow module on sys.path raises: the package is unavailable here
except ImportError:
    pass
else:
    raise SystemExit("nnunetv2_lorkd was importable; the test would prove nothing")
import torch
model_path, input_path, output_path = sys.argv[1:4]
extra = {"meta.json": ""}
module = torch.export.load(model_path, extra_files=extra).module()
x = torch.load(input_path, weights_only=True)
torch.save({"logits": module(x), "meta": json.loads(extra["meta.json"])}, output_path)
print("modules loaded:", sorted(m for m in sys.modules if m.split(".")[0] == "nnunetv2_lorkd"))
"""


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def test_fused_model_loads_without_the_package(tmp_path: Path) -> None:
    model = randomize(tiny_model(class_counts=(3, 5), in_channels=3)).eval()
    exported = export_fused_models(model, tmp_path / "fused")
    assert [e["task"] for e in exported] == ["task0", "task1"]
    assert all(e["max_abs_diff_vs_routed"] <= 1e-5 for e in exported)
    assert json.loads((tmp_path / "fused" / "task1.json").read_text())["class_names"] == ["0", "1", "2", "3", "4"]

    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nnunetv2_lorkd.py").write_text("raise ImportError('nnunetv2_lorkd is hidden in this test')\n")
    script = tmp_path / "load_fused.py"
    script.write_text(LOADER)
    x = torch.rand(5, 3, 12, 12) * 255
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "fused" / "task1.pt2"),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "modules loaded: []" in proc.stdout
    result = torch.load(tmp_path / "y.pt", weights_only=True)
    assert result["meta"]["task"] == "task1" and result["meta"]["in_channels"] == 3
    with torch.no_grad():
        routed = model.task_logits(x, 1)
    assert (result["logits"] - routed).abs().max().item() <= 1e-5

    # the in-process loader gives the same module; batch size is dynamic
    module, meta = load_exported(tmp_path / "fused" / "task0.pt2")
    assert meta["class_names"] == ["0", "1", "2"]
    with torch.no_grad():
        assert (module(x[:1]) - model.task_logits(x[:1], 0)).abs().max().item() <= 1e-5
