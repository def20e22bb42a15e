"""Packaging that pyproject.toml cannot express, and this project's PEP 517/660 build backend.

The trainers/ folder is installed as the package ``nnunetv2_lorkd_trainers``, and ``nnunetv2_lorkd_trainers.pth``
must land at the root of site-packages, in wheel and editable installs alike, so that nnU-Net finds our trainers with
no environment variable set by hand (trainers/_register.py).

setuptools has no supported way to put an extra file at the root of an editable wheel. Measured with setuptools
84.2.1: a build_py that declares the .pth through get_outputs/get_output_mapping (the contract setuptools documents
for editable installs) gets no root .pth into the editable wheel in any mode: lenient and compat ignore those
outputs, strict links the file into build/__editable__.*/, a plain sys.path entry whose .pth files Python never
reads. Hatchling 1.32.4 force-includes files into editable wheels, but refuses an editable build when `sources`
renames a folder (trainers -> nnunetv2_lorkd_trainers). The hook used before, overriding the private
editable_wheel._select_strategy, worked but could break with any setuptools release.

So pyproject.toml names this file as the in-tree build backend (PEP 517 backend-path): every hook is
setuptools.build_meta's, and build_wheel/build_editable add the .pth, with its RECORD line, to the finished wheel.
That relies only on the PEP 517/660 hooks and the wheel format, hence no upper bound on setuptools. Measured with
setuptools 77.0.3, 80.9.0 and 84.2.1: both wheels carry the .pth with a valid RECORD, and installed in a fresh venv
they set nnUNet_extTrainer (tests/test_install_wheel.py checks this with the environment's setuptools). setuptools
runs this file as __main__ to read the setup() call below; frontends import it as the module `setup` for the hooks.
"""

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _setuptools_backend
from setuptools import find_namespace_packages, setup

PTH = "nnunetv2_lorkd_trainers.pth"
PTH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers", PTH)

get_requires_for_build_sdist = _setuptools_backend.get_requires_for_build_sdist
get_requires_for_build_wheel = _setuptools_backend.get_requires_for_build_wheel
get_requires_for_build_editable = _setuptools_backend.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _setuptools_backend.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools_backend.prepare_metadata_for_build_editable
build_sdist = _setuptools_backend.build_sdist


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools_backend.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools_backend.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name


def _add_pth(wheel: str) -> None:
    """Rewrites the wheel with the .pth at its root (installers put root files into site-packages) and lists it in
    RECORD, which a wheel must do for every file it holds; the .dist-info entries stay last."""
    with open(PTH_SOURCE, "rb") as f:
        data = f.read()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rewritten = f"{wheel}.tmp"
    with zipfile.ZipFile(wheel) as src:
        entries = src.infolist()
        if PTH in src.namelist():
            return
        with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as dst:
            (record,) = [e for e in entries if e.filename.endswith(".dist-info/RECORD")]
            pth = zipfile.ZipInfo(PTH, date_time=record.date_time)  # the build's own timestamp (SOURCE_DATE_EPOCH)
            pth.external_attr = 0o644 << 16
            dst.writestr(pth, data, zipfile.ZIP_DEFLATED)
            for entry in entries:
                content = src.read(entry)
                if entry is record:
                    content = content.rstrip(b"\r\n") + f"\n{PTH},sha256={digest},{len(data)}\n".encode()
                dst.writestr(entry, content)
    os.replace(rewritten, wheel)


if __name__ == "__main__":
    # Namespace discovery: a subpackage folder without __init__.py (nnunetv2_lorkd/nnunet/ has none) is still
    # shipped; find_packages() would silently leave it out of the wheel while an editable install still worked.
    library_packages = find_namespace_packages(
        include=["nnunetv2_lorkd", "nnunetv2_lorkd.*"], exclude=["*.__pycache__"]
    )
    setup(
        # nnunet_ext/ holds only the shim modules nnU-Net's search imports by file (see trainers/_register.py); it is
        # listed so that setuptools ships it as code. The .pth also goes inside the package: that puts it in sdists,
        # whose wheels build_wheel above completes in turn.
        packages=[*library_packages, "nnunetv2_lorkd_trainers", "nnunetv2_lorkd_trainers.nnunet_ext"],
        package_dir={"nnunetv2_lorkd_trainers": "trainers"},
        package_data={"nnunetv2_lorkd_trainers": [PTH]},
    )
