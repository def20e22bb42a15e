"""Checkpoint reading (issue 15, defect 6): a too-old torch or numpy is named as such, never reported as a corrupt
file; refused Python objects and really corrupt files each get their own message; the declared bounds match."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import serialization

from nnunetv2_lorkd import fuse
from nnunetv2_lorkd.fuse import MIN_NUMPY, MIN_TORCH, FuseError, load_checkpoint
from nnunetv2_lorkd.teachers import TeacherError
from nnunetv2_lorkd.teachers.nnunet_model import _read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class NotAllowed:
    """A class a checkpoint must not contain (weights_only loading refuses it)."""


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """Like nnUNetv2_train's: weights plus numpy scalars in the logs."""
    path = tmp_path / "checkpoint_final.pth"
    torch.save(
        {
            "network_weights": {"w": torch.ones(2)},
            "logging": {"ema_fg_dice": [np.float64(0.5), np.float32(0.25)]},
            "_best_ema": np.float64(0.5),
            "init_args": {"configuration": "3d_fullres"},
            "trainer_name": "nnUNetTrainer",
        },
        path,
    )
    return path


def test_an_nnunet_checkpoint_loads(checkpoint: Path) -> None:
    data = load_checkpoint(str(checkpoint))
    assert data["trainer_name"] == "nnUNetTrainer" and float(data["_best_ema"]) == 0.5
    assert torch.equal(data["network_weights"]["w"], torch.ones(2))


def test_old_torch_is_named_not_called_corrupt(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.5 has no torch.serialization.safe_globals (2.4 only add_safe_globals)."""
    monkeypatch.delattr(serialization, "safe_globals")
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(FuseError) as info:
        load_checkpoint(str(checkpoint))
    message = str(info.value)
    assert "this environment has torch 2.4.1+cpu" in message
    assert f"needs torch >= {MIN_TORCH}" in message and f"pip install 'torch>={MIN_TORCH},!=2.9.*'" in message
    assert "corrupt" not in message and "the file itself was not checked" in message
    # a teacher checkpoint goes through the same reader and keeps the message
    with pytest.raises(TeacherError, match=r"has torch 2.4.1\+cpu, .* needs torch >= 2.5"):
        _read_checkpoint(str(checkpoint))


def test_old_numpy_is_named_not_called_corrupt(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy 1.x has no numpy._core (and cannot unpickle the numpy 2 scalars of a checkpoint)."""
    monkeypatch.setattr(fuse, "np", _NumpyOneStandIn())
    with pytest.raises(FuseError) as info:
        load_checkpoint(str(checkpoint))
    message = str(info.value)
    assert "this environment has numpy 1.26.4" in message and f"need numpy >= {MIN_NUMPY}" in message
    assert "corrupt" not in message and f"pip install 'numpy>={MIN_NUMPY}'" in message


class _NumpyOneStandIn:
    """numpy as numpy 1.26 shows itself to fuse.py: everything but ``_core``."""

    __version__ = "1.26.4"

    def __getattr__(self, name: str) -> object:
        if name == "_core":
            raise AttributeError(name)
        return getattr(np, name)


def test_refused_objects_are_named(tmp_path: Path) -> None:
    path = tmp_path / "custom.pth"
    torch.save({"network_weights": {}, "extra": NotAllowed()}, path)
    with pytest.raises(FuseError, match=r"holds a Python object of type [\w.]*NotAllowed, which safe loading refuses"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 4, "half"])
def test_corrupt_files_are_called_corrupt(tmp_path: Path, checkpoint: Path, content: bytes | str) -> None:
    path = tmp_path / "broken.pth"
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)
    with pytest.raises(FuseError, match=r"the file is corrupt or not an nnU-Net checkpoint \(torch .*, numpy .*\)$"):
        load_checkpoint(str(path))


def test_declared_bounds_match_what_the_code_needs() -> None:
    """pyproject.toml must not allow a torch/numpy that load_checkpoint refuses."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    dependencies = re.findall(r'^\s*"([^"]+)"', block, flags=re.MULTILINE)
    spec = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in dependencies}
    assert f">={MIN_TORCH}" in spec["torch"] and "!=2.9.*" in spec["torch"]
    assert spec["numpy"].replace(" ", "") == f"numpy>={MIN_NUMPY}"
    # and the installed packages satisfy them
    assert tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
    assert int(np.__version__.split(".")[0]) >= 2
