#!/usr/bin/env bash
# The main job: the LoRKD demo on real public scans (`lorkd-demo`, see docs/demo.md): data -> SAT-style teacher ->
# LoRKD students with distillation -> fused region experts, scored on held-out test parts against the teacher, an
# MTL baseline and per-region nnU-Net specialists, with a report in ./lorkd_work/<preset>/report/.
# Preset: `gpu` (the benchmark) when torch sees a CUDA GPU, else `cpu` (2d, <= 25 min on 2 cores).
# Arguments go to lorkd-demo, e.g. `bash scripts/run_main.sh --preset cpu --work /tmp/demo`.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
case " $* " in
    *" --preset "* | *" --preset="*) ;;
    *)
        if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
            set -- --preset gpu "$@"
        else
            set -- --preset cpu "$@"
        fi
        ;;
esac
exec python -m nnunetv2_lorkd.demo.run "$@"
