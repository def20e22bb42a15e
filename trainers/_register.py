"""Zero-config trainer discovery for nnU-Net 2.8 (`nnUNetv2_train ... -tr nnUNetTrainerLoRKD`).

nnU-Net finds trainers outside its package only through the folders in ``nnUNet_extTrainer``. It imports
every module of such a folder under a top-level name and then drops it from ``sys.modules``, so the folder
must hold nothing but a uniquely named shim that re-exports our classes (which keep their real module, one
copy each). The ``nnunetv2_lorkd_trainers.pth`` file installed next to the packages calls :func:`register`
at interpreter start, appending that folder to ``nnUNet_extTrainer`` (a user's own folders are kept).
This module must stay cheap to import: no torch, no nnU-Net.
"""

from __future__ import annotations

import os

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_folder() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def register() -> None:
    folder = ext_trainer_folder()
    parts = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ[ENV_VAR] = os.pathsep.join([*parts, folder])


if __name__ == "__main__":  # `python -m nnunetv2_lorkd_trainers._register` prints the folder
    print(ext_trainer_folder())
