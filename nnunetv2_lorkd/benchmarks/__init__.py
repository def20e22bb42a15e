"""The benchmarks of nnunetv2-lorkd: speed and accuracy measurements behind the numbers in docs/benchmarks.md.

Kept apart from the library so that nothing a user imports to train or predict pulls in benchmark code; only
the command-line entry points import from here (``lorkd-bench``, ``lorkd-bench-nnunet``, ``lorkd-classify
benchmark``, and the ``python -m nnunetv2_lorkd.benchmarks.<module>`` runs).

- :mod:`.common`: interleaved timing, ratio intervals, result tables, the machine and its load;
- :mod:`.experts`: expert convolutions against a plain conv, the official EKS scheme and a per-sample loop;
- :mod:`.nnunet`: nnUNetTrainerLoRKD against nnUNetTrainer, and fused against vanilla prediction;
- :mod:`.distillation`: the cost of online and cached distillation per training step;
- :mod:`.kd_ablation`: per-region Dice over KD weights;
- :mod:`.classification`: teacher, LoRKD, MTL and single-task students on the classification side module.
"""
