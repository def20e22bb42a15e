"""Trainer subclasses that change only the training schedule, named as nnU-Net names its own.

nnU-Net takes a training length only from the trainer's class name (``-tr nnUNetTrainer_5epochs``), so every
length is its own subclass. One factory builds them all, for the LoRKD, MTL, SAT-style and demo trainers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# the training lengths nnU-Net offers for nnUNetTrainer
LENGTHS = (1, 5, 10, 20, 50, 100, 250, 500, 2000, 4000)


def length_name(base_name: str, epochs: int) -> str:
    """``<base>_1epoch`` / ``<base>_<n>epochs``, nnU-Net's spelling."""
    return f"{base_name}_{epochs}epoch{'s' if epochs != 1 else ''}"


def schedule_variant(
    base: type,
    name: str,
    module: str,
    doc: str,
    *,
    epochs: int,
    iterations: int | None = None,
    val_iterations: int | None = None,
    overrides: dict[str, Callable] | None = None,
) -> type:
    """A subclass of ``base`` called ``name`` (defined in ``module``, where nnU-Net's class search finds it)
    that trains for ``epochs`` epochs and, when given, that many training / validation iterations per epoch."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations

    namespace = {"__init__": __init__, **(overrides or {})}
    return type(name, (base,), {**namespace, "__module__": module, "__qualname__": name, "__doc__": doc})


def smoke_variant(base: type, module: str) -> type:
    """``<base>_smoke``: one tiny epoch (10 training, 5 validation iterations) for smoke tests and CI."""
    doc = "One tiny epoch (10 training, 5 validation iterations): for smoke tests and CI."
    return schedule_variant(base, f"{base.__name__}_smoke", module, doc, epochs=1, iterations=10, val_iterations=5)


def length_variant(base: type, epochs: int, module: str) -> type:
    """``<base>_<n>epochs`` with nnU-Net's default iterations per epoch."""
    return schedule_variant(
        base, length_name(base.__name__, epochs), module, f"{base.__name__} for {epochs} epochs.", epochs=epochs
    )


def length_variants(base: type, module: str) -> dict[str, type]:
    """Every ``<base>_<n>epochs`` of :data:`LENGTHS` by name, for a module to publish with
    ``globals().update(...)`` and list in ``__all__`` (where nnU-Net's class search finds them through the shims)."""
    return {length_name(base.__name__, n): length_variant(base, n, module) for n in LENGTHS}
