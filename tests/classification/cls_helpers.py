"""Shared helpers of the classification tests (not a conftest.py: tests/conftest.py owns that module name)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nnunetv2_lorkd.classification.models import MultiTaskClassifier, make_config
from nnunetv2_lorkd.experts import expert_layers

TINY_ARCH = {"widths": [4, 8], "blocks": [1, 1]}


def class_images(rng: np.random.Generator, labels: np.ndarray, size: int = 12, rgb: bool = False) -> np.ndarray:
    """Learnable synthetic images: class c is a bright bar at row ~c (plus noise), uint8 like MedMNIST."""
    n = len(labels)
    x = rng.integers(0, 60, size=(n, size, size), dtype=np.int64)
    for i, c in enumerate(labels):
        row = int(c) * 2 % (size - 2)
        x[i, row : row + 2, 2 : size - 2] += 180
    x = np.clip(x, 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=3) if rgb else x


def write_npz(
    path: Path,
    num_classes: int,
    n: tuple[int, int, int] = (24, 8, 8),
    size: int = 12,
    rgb: bool = False,
    seed: int = 0,
    **overrides: np.ndarray,
) -> Path:
    """A valid MedMNIST-format file (grey (N,H,W) or RGB (N,H,W,3), labels (N,1)); overrides replace keys."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        labels = np.arange(count) % num_classes
        arrays[f"{split}_images"] = class_images(rng, labels, size, rgb)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def tiny_model(
    class_counts: tuple[int, ...] = (3, 2, 4),
    experts: bool = True,
    in_channels: int = 1,
    size: int = 12,
    arch: dict | None = None,
) -> MultiTaskClassifier:
    specs = [(f"task{i}", [str(c) for c in range(k)]) for i, k in enumerate(class_counts)]
    config = make_config(specs, in_channels, size, "student", {"rank": 2, "alpha": 8.0} if experts else None)
    config["arch"].update(arch or TINY_ARCH)
    return MultiTaskClassifier(config)


def randomize(model: MultiTaskClassifier, seed: int = 0) -> MultiTaskClassifier:
    """Fresh experts are zero and fresh BatchNorm statistics trivial; equality tests need neither."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in expert_layers(model.backbone):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine two threads per
    process thrash (a 3 s test took 20 s); one thread keeps the suite's time stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
