"""Zero-config discovery after a regular wheel install and after an editable install.

The project's build backend (pyproject's [build-system]: setup.py, which wraps setuptools.build_meta) builds a
wheel with pip, an sdist and a wheel from it, and an editable wheel, each from a copy of the tree (so the checkout
gets no build/ or egg-info). The wheel or the editable wheel is installed with --no-deps into a fresh virtual
environment. That environment sees the heavy dependencies (torch, nnU-Net) of the running interpreter through a
plain path line in a .pth file: a plain path line does not process that folder's own .pth files, so the running
environment's editable install of this project stays invisible. A fresh interpreter there, with no
nnUNet_extTrainer set by hand, must find our trainers through nnU-Net's own lookups (training and prediction),
import every class exactly once from the installed files (the wheel's, or the source copy's for the editable
install), and leave the nnunetv2 package folder untouched. Everything lives in one temporary folder that is
removed at the end.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from synthetic import write_region_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PTH = "nnunetv2_lorkd_trainers.pth"
PACKAGE_DIRS = {"nnunetv2_lorkd": "nnunetv2_lorkd", "trainers": "nnunetv2_lorkd_trainers"}  # source -> wheel
BUILD_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
MERGED_ID = 930


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    command = " ".join(map(str, args))
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _clean_env(root: Path) -> dict:
    """The environment of a fresh shell: no discovery variable, no PYTHON* overrides, our own nnU-Net folders."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer" and not k.startswith("PYTHON")}
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_def_n_proc="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def _source_copy(dst: Path) -> Path:
    """The files a build reads: every top-level file of the checkout plus the two package folders."""
    dst.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, dst / entry.name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(REPO / folder, dst / folder, ignore=BUILD_JUNK)
    return dst


def _expected_modules() -> set[str]:
    """Every .py file of the source packages, as its path inside the wheel."""
    return {
        f"{PACKAGE_DIRS[folder]}/{path.relative_to(REPO / folder).as_posix()}"
        for folder in PACKAGE_DIRS
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def _project_scripts() -> set[str]:
    """Console-script names of pyproject's [project.scripts] (read without tomllib, which needs 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml has no [project.scripts] section"
    return set(re.findall(r"^\s*([A-Za-z0-9_.-]+)\s*=", section.group(1), re.M))


def _package_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


CALL_HOOK = r"""
import importlib, os, sys
backend_name, hook, out, *backend_path = sys.argv[1:]
sys.path[:0] = backend_path
backend = importlib.import_module(backend_name)
assert any(os.path.realpath(backend.__file__).startswith(os.path.realpath(p) + os.sep) for p in backend_path)
print("BUILT", getattr(backend, hook)(out))
"""


def _call_backend(src: Path, hook: str, out: Path, env: dict) -> Path:
    """What a PEP 517/660 frontend does with --no-build-isolation: import pyproject's build-backend from its
    backend-path and call one hook. (pip has no command that only builds an editable wheel.)"""
    text = (src / "pyproject.toml").read_text()
    backend = re.search(r'^build-backend\s*=\s*"([^"]+)"', text, re.M)
    paths = re.search(r"^backend-path\s*=\s*\[([^\]]*)\]", text, re.M)
    assert backend, "pyproject.toml names no build-backend"
    backend_path = [str((src / p).resolve()) for p in re.findall(r'"([^"]*)"', paths.group(1) if paths else "")]
    out.mkdir()
    log = _run([sys.executable, "-c", CALL_HOOK, backend.group(1), hook, str(out), *backend_path], src, env)
    (name,) = re.findall(r"^BUILT (.+)$", log, re.M)
    return out / name


def _check_record(wheel: Path) -> None:
    """RECORD lists every file of the wheel with its sha256 and size (the wheel format requires it)."""
    with zipfile.ZipFile(wheel) as zf:
        (record,) = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(zf.read(record).decode())) if row}
        assert set(rows) == set(zf.namelist()), set(rows) ^ set(zf.namelist())
        for name, (digest, size) in rows.items():
            if name != record:
                data = zf.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert (digest, int(size)) == (f"sha256={expected}", len(data)), (wheel.name, name)


@pytest.fixture(scope="module")
def build_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="lorkd-wheel-test-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def wheels(build_root: Path) -> dict[str, Path]:
    """The wheel built straight from the tree (`pip wheel .`), one built from the sdist (what `python -m build`
    does), so a file missing from the sdist is caught as well, and the editable wheel (`pip install -e .`), whose
    source copy stays in place for the editable install."""
    env = _clean_env(build_root)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
    src = _source_copy(build_root / "src")
    _run([*pip_wheel, "-w", str(build_root / "dist_tree"), str(src)], build_root, env)

    sdist = _call_backend(_source_copy(build_root / "src_for_sdist"), "build_sdist", build_root / "sdist", env)
    with tarfile.open(sdist) as tar:
        tar.extractall(build_root / "sdist_unpacked", filter="data")
    (unpacked,) = (build_root / "sdist_unpacked").iterdir()
    _run([*pip_wheel, "-w", str(build_root / "dist_sdist"), str(unpacked)], build_root, env)
    (from_tree,) = (build_root / "dist_tree").glob("*.whl")
    (from_sdist,) = (build_root / "dist_sdist").glob("*.whl")
    editable = _call_backend(_source_copy(build_root / "src_editable"), "build_editable", build_root / "dist_e", env)
    return {"tree": from_tree, "sdist": from_sdist, "editable": editable}


def test_wheel_contents(wheels: dict[str, Path]):
    names = {}
    for kind, wheel in wheels.items():
        _check_record(wheel)
        with zipfile.ZipFile(wheel) as zf:
            names[kind] = set(zf.namelist())
            # the startup hook sits at the wheel root (-> site-packages), identical to the source file
            assert zf.read(PTH).decode() == (REPO / "trainers" / PTH).read_text(), kind
            entry_points = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        declared = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*=", entry_points.split("[console_scripts]")[1], re.M))
        assert declared == _project_scripts(), kind
    # the editable wheel holds no code of ours, only setuptools' finder next to our .pth
    assert not [n for n in names["editable"] if n.startswith(tuple(f"{d}/" for d in PACKAGE_DIRS.values()))]
    for kind in ("tree", "sdist"):
        files = names[kind]
        # every module ships, nnU-Net's shim folder included, and nothing from tests/
        assert {n for n in files if n.endswith(".py")} == _expected_modules(), kind
        assert any(n.startswith("nnunetv2_lorkd_trainers/nnunet_ext/") and n.endswith("_shim.py") for n in files)
        assert "nnunetv2_lorkd/nnunet/config.py" in files  # a folder without __init__.py (see setup.py)
        assert not [n for n in files if n.startswith("tests/") or "/tests/" in n or "conftest" in n], kind
    assert {n for n in names["tree"] if ".dist-info/" not in n} == {n for n in names["sdist"] if ".dist-info/" not in n}


CHECK = r"""
import os, sys
nnunetv2_dir_expected, code_root, trainers_dir, mode = sys.argv[1:5]
inside = lambda path: os.path.realpath(path).startswith(os.path.realpath(code_root) + os.sep)

# the installed .pth ran at startup and set the variable nnU-Net reads; nothing else did
import nnunetv2_lorkd, nnunetv2_lorkd_trainers
ext = os.path.join(trainers_dir, "nnunet_ext")
assert os.environ["nnUNet_extTrainer"].split(os.pathsep) == [ext], os.environ["nnUNet_extTrainer"]
assert inside(nnunetv2_lorkd.__file__) and inside(nnunetv2_lorkd_trainers.__file__), (nnunetv2_lorkd.__file__,)
assert os.path.dirname(os.path.realpath(nnunetv2_lorkd_trainers.__file__)) == os.path.realpath(trainers_dir)
# setuptools' editable finder serves our packages in the editable install, and only there
finders = [f for f in sys.meta_path if "editable" in str(getattr(f, "__module__", "")).lower()]
assert bool(finders) == (mode == "editable"), (mode, sys.meta_path)
assert bool([m for m in sys.modules if "editable" in m]) == (mode == "editable"), mode

import nnunetv2
nnunetv2_dir = os.path.dirname(nnunetv2.__file__)
assert os.path.realpath(nnunetv2_dir) == os.path.realpath(nnunetv2_dir_expected), nnunetv2_dir
def snapshot():
    return {os.path.relpath(os.path.join(d, f), nnunetv2_dir) for d, _, fs in os.walk(nnunetv2_dir)
            if "__pycache__" not in d for f in fs}
before = snapshot()

import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

# training (nnUNetv2_train, also with --c): nnU-Net's own lookup and constructor
trainer = get_trainer_from_args("DATASET_ID", "3d_fullres", 0, "nnUNetTrainerLoRKD_5epochs", device=torch.device("cpu"))
variant = type(trainer)
base = recursive_find_trainer_class_by_name("nnUNetTrainerLoRKD")
home = sys.modules["nnunetv2_lorkd_trainers.lorkd"]
assert base.__module__ == variant.__module__ == "nnunetv2_lorkd_trainers.lorkd", (base.__module__, variant.__module__)
assert home.nnUNetTrainerLoRKD is base and home.nnUNetTrainerLoRKD_5epochs is variant and issubclass(variant, base)
assert trainer.num_epochs == 5
copies = [n for n, m in list(sys.modules.items())
          if getattr(m, "__file__", None) and os.path.realpath(m.__file__) == os.path.realpath(home.__file__)]
assert copies == ["nnunetv2_lorkd_trainers.lorkd"], copies  # one module object for the file, under its real name
assert not [n for n in sys.modules if n.endswith("_shim")], [n for n in sys.modules if n.endswith("_shim")]
ours = {n: m.__file__ for n, m in list(sys.modules.items())
        if n.split(".")[0] in ("nnunetv2_lorkd", "nnunetv2_lorkd_trainers") and getattr(m, "__file__", None)}
assert ours and all(inside(f) for f in ours.values()), ours

# prediction (nnUNetv2_predict): the predictor resolves the checkpoint's trainer_name with the same lookup
import json
import nnunetv2.inference.predict_from_raw_data as predict_module
folder = os.path.join(os.environ["nnUNet_results"], "wheel_model")
os.makedirs(os.path.join(folder, "fold_0"))
with open(os.path.join(folder, "plans.json"), "w") as f:
    json.dump(trainer.plans_manager.plans, f)
with open(os.path.join(folder, "dataset.json"), "w") as f:
    json.dump(trainer.dataset_json, f)
net = variant.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                         trainer.label_manager.num_segmentation_heads, False)
torch.save({"network_weights": net.state_dict(), "trainer_name": variant.__name__,
            "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
           os.path.join(folder, "fold_0", "checkpoint_final.pth"))
found = []
lookup = predict_module.recursive_find_trainer_class_by_name
predict_module.recursive_find_trainer_class_by_name = lambda name: found.append(lookup(name)) or found[-1]
predictor = predict_module.nnUNetPredictor(device=torch.device("cpu"), verbose=False)
predictor.initialize_from_trained_model_folder(folder, (0,), "checkpoint_final.pth")
assert found == [variant], found
from nnunetv2_lorkd.experts import expert_layers
assert expert_layers(predictor.network), "the predictor built a network without experts"

after = snapshot()
assert after == before, sorted(after ^ before)
assert not [f for f in after if "lorkd" in f.lower()]
print("DISCOVERY OK", mode, variant.__module__, len(ours), "modules of ours, all from", code_root)
"""


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_zero_config_discovery(build_root: Path, wheels: dict[str, Path], mode: str):
    import nnunetv2

    nnunetv2_dir = Path(nnunetv2.__file__).parent
    nnunetv2_before = _package_files(nnunetv2_dir)
    root = build_root / mode
    venv = root / "venv"
    env = _clean_env(root)
    work = root / "work"
    work.mkdir(parents=True)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env).strip()
    )
    # install before the heavy dependencies are visible, so pip sees nothing of the running environment
    wheel = wheels["tree" if mode == "wheel" else "editable"]
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--no-cache-dir",
          str(wheel)], work, env)  # fmt: skip
    assert (site / PTH).is_file() and (venv / "bin" / "lorkd-merge").is_file()
    heavy = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_lorkd_test_heavy_dependencies.pth").write_text("".join(f"{p}\n" for p in heavy))
    # where our modules must come from: the wheel's files, or the source copy the editable wheel points to
    code_root = site if mode == "wheel" else build_root / "src_editable"
    trainers_dir = code_root / ("nnunetv2_lorkd_trainers" if mode == "wheel" else "trainers")

    # a small merged dataset with plans (no preprocessing needed), built with the installed lorkd-merge
    for region in ("abdomen", "pelvis"):
        write_region_dataset(env["nnUNet_raw"], region, num_cases=3)
    _run([str(venv / "bin" / "lorkd-merge"), "-i", "901", "abdomen", "-i", "902", "pelvis", "-d", str(MERGED_ID),
          "-n", "WheelMerged", "--folds", "2"], work, env)  # fmt: skip
    _run([str(python), "-I", "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
          "-d", str(MERGED_ID), "-c", "3d_fullres", "--no_pp", "-npfp", "1"], work, env)  # fmt: skip

    check = CHECK.replace("DATASET_ID", str(MERGED_ID))
    out = _run([str(python), "-I", "-c", check, str(nnunetv2_dir), str(code_root), str(trainers_dir), mode], work, env)
    assert f"DISCOVERY OK {mode} nnunetv2_lorkd_trainers.lorkd" in out
    # nothing was installed or copied into the shared nnunetv2 package, and the new venv holds no nnunetv2
    assert _package_files(nnunetv2_dir) == nnunetv2_before
    assert not (site / "nnunetv2").exists()
