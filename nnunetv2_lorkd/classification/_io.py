"""Atomic file writes: a crash or a bad input never leaves a half-written output behind.

Every writer goes through :func:`atomic_path`, which yields a temporary name in the target's folder (same
file system, so the final ``os.replace`` is atomic) and removes it again if the write fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def save_torch(target: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def save_npz(target: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez_compressed to a temporary name (it must end in .npz, or numpy appends it), then rename."""
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(target)
