#!/usr/bin/env bash
# The main job. Until the real-data demo lands this runs the benchmark of the expert convolutions
# (GPU if one is visible, else CPU) and prints the measured ratios.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python -m nnunetv2_lorkd.bench "$@"
