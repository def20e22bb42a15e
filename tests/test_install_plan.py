"""The set-up scripts' staged install: large wheels one per pip call, so the install's peak disk use stays low."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "_install_plan.py"


def _load_plan():
    spec = importlib.util.spec_from_file_location("_install_plan", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plan


def _item(name: str, url: str, direct: bool = False) -> dict:
    return {"metadata": {"name": name}, "download_info": {"url": url}, "is_direct": direct}


def test_large_wheels_get_a_pip_call_each_and_the_project_is_left_for_last() -> None:
    plan = _load_plan()
    report = {
        "install": [
            _item("nnunetv2-lorkd", "file:///repo", direct=True),
            _item("numpy", "https://x/numpy.whl"),
            _item("torch", "https://x/torch.whl"),
            _item("nvidia-cudnn-cu13", "https://x/cudnn.whl"),
            _item("Cuda_Bindings", "https://x/cuda_bindings.whl"),
            _item("triton", "https://x/triton.whl"),
            _item("torchvision", "https://x/torchvision.whl"),
        ]
    }
    calls = plan(report)
    assert calls == [
        ["https://x/torch.whl"],
        ["https://x/cudnn.whl"],
        ["https://x/cuda_bindings.whl"],
        ["https://x/triton.whl"],
        ["https://x/numpy.whl", "https://x/torchvision.whl"],
    ]


def test_nothing_to_install_gives_no_pip_call() -> None:
    plan = _load_plan()
    assert plan({"install": [_item("nnunetv2-lorkd", "file:///repo", direct=True)]}) == []
