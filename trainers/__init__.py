"""nnU-Net-facing trainer classes of nnunetv2-lorkd (import them from the submodules, e.g.
``nnunetv2_lorkd_trainers.lorkd``). Kept import-free: ``_register`` runs at interpreter start."""
