"""Re-exports the MTL baseline trainers for nnU-Net's `nnUNet_extTrainer` search (see ../_register.py).

The classes keep their home module, so nnU-Net and our own code see the same class objects.
"""

from nnunetv2_lorkd_trainers.mtl import *  # noqa: F403
