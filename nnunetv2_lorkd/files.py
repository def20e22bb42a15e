"""File writes that never leave a half-written output behind, and JSON reads that fail with one clear message.

Every writer goes through :func:`atomic_path`, which yields a temporary name in the target's folder (same
file system, so the final ``os.replace`` is atomic) and removes it again if the write fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only if the block succeeds.

    `suffix` is appended to the temporary name, for writers that insist on an extension (``.npz``, ``.png``).
    """
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
    return write_text(target, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def save_torch(target: str | os.PathLike, obj: Any) -> Path:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def save_npz(target: str | os.PathLike, arrays: dict) -> Path:
    """np.savez_compressed to a temporary name (it must end in .npz, or numpy appends it), then rename."""
    import numpy as np

    with atomic_path(target, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(target)


def save_figure(fig: Any, target: str | os.PathLike, dpi: int) -> Path:
    """Write a matplotlib figure as PNG through a temporary file and close it: no half-written chart."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(target, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(target)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"key(s) {dupes} appear twice in the same JSON object; keep one of them")
    return dict(pairs)


def read_json(
    path: str | os.PathLike,
    error: Callable[[str], Exception],
    *,
    missing_hint: str = "",
    reject_duplicate_keys: bool = False,
) -> Any:
    """Read a JSON file or raise ``error(message)`` naming the file, what is wrong and (when missing) the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys if reject_duplicate_keys else None)
    except FileNotFoundError:
        raise error(f"{path} does not exist" + (f"; {missing_hint}" if missing_hint else "")) from None
    except ValueError as exc:  # JSONDecodeError and duplicate keys
        raise error(f"{path} is not valid JSON ({exc}); fix or rewrite the file") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc}") from None
