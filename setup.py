"""Packaging details pyproject.toml cannot express: the trainers/ folder is installed as the package
``nnunetv2_lorkd_trainers``, and ``nnunetv2_lorkd_trainers.pth`` goes next to the packages (wheel and
editable installs) so nnU-Net finds our trainers with no environment variable set by hand."""

import os

from setuptools import find_packages, setup
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


setup(
    packages=[*find_packages(include=["nnunetv2_lorkd", "nnunetv2_lorkd.*"]), "nnunetv2_lorkd_trainers"],
    # nnunet_ext/ is a plain folder of shim modules for nnU-Net's search, shipped as data, not a package
    package_dir={"nnunetv2_lorkd_trainers": "trainers"},
    package_data={"nnunetv2_lorkd_trainers": ["nnunet_ext/*.py", PTH]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
