"""Packaging details pyproject.toml cannot express: the trainers/ folder is installed as the package
``nnunetv2_lorkd_trainers``, and ``nnunetv2_lorkd_trainers.pth`` goes next to the packages (wheel and
editable installs) so nnU-Net finds our trainers with no environment variable set by hand."""

import os

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "nnunetv2_lorkd_trainers.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("trainers", PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), os.path.join(self.build_lib, PTH): os.path.join("trainers", PTH)}


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel also carries our .pth file."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, wheel, files, mapping) -> None:
        self.inner(wheel, files, mapping)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers", PTH)) as f:
            wheel.writestr(PTH, f.read())

    def __enter__(self) -> "_StrategyWithPth":
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


# Namespace discovery: a subpackage folder without __init__.py (nnunetv2_lorkd/nnunet/ has none) is still
# shipped; find_packages() would silently leave it out of the wheel while an editable install still worked.
LIBRARY_PACKAGES = find_namespace_packages(include=["nnunetv2_lorkd", "nnunetv2_lorkd.*"], exclude=["*.__pycache__"])

setup(
    # nnunet_ext/ holds only the shim modules nnU-Net's search imports by file (see trainers/_register.py); it is
    # listed so that setuptools ships it as code (the trainers' .pth also goes inside the package for sdists)
    packages=[*LIBRARY_PACKAGES, "nnunetv2_lorkd_trainers", "nnunetv2_lorkd_trainers.nnunet_ext"],
    package_dir={"nnunetv2_lorkd_trainers": "trainers"},
    package_data={"nnunetv2_lorkd_trainers": [PTH]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
