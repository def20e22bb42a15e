"""Classification tasks in memory, and the MedMNIST ``.npz`` reader/writer.

A *task* is one label set (one MedMNIST file, one RadImageNet task). Every task keeps its own class ids
0..K-1; the multi-task batch carries a task id per sample, which picks both the expert and the head.
Images are stored as uint8 (N, H, W, C) exactly as MedMNIST ships them and only become float tensors per
batch, so even the larger MedMNIST sets fit in memory.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import save_npz

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))
LABEL_NAMES_KEY = "label_names"  # optional extra key (ours); MedMNIST readers ignore it

# Class counts of the MedMNIST 2D multi-class sets used by LoRKD, as the MedMNIST v2 paper gives them (Yang et
# al., Scientific Data 2023). Used to catch out-of-range labels in files without label names.
MEDMNIST_NUM_CLASSES = {
    "pathmnist": 9,
    "octmnist": 4,
    "organcmnist": 11,
    "bloodmnist": 8,
    "breastmnist": 2,
    "tissuemnist": 8,
    "dermamnist": 7,
    "organamnist": 11,
    "organsmnist": 11,
    "pneumoniamnist": 2,
}


class DatasetFormatError(ValueError):
    """A classification data file is malformed; the one-line message names the file, problem and fix."""


@dataclass(frozen=True)
class SplitArrays:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TaskData:
    """One task: its name, class names (index = label id) and the three splits."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, SplitArrays]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.splits["train"].images.shape[3])

    @property
    def image_hw(self) -> tuple[int, int]:
        shape = self.splits["train"].images.shape
        return int(shape[1]), int(shape[2])


def _fail(path: str | Path, problem: str) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: {problem}")


def _as_uint8_images(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[3] not in (1, 3) or arr.shape[1] < 4 or arr.shape[2] < 4:
        raise _fail(
            path,
            f"'{key}' has shape {tuple(arr.shape)}; expected (N, H, W) grey or (N, H, W, 3) RGB images "
            "with H, W >= 4 (MedMNIST layout)",
        )
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "iuf" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise _fail(path, f"'{key}' has dtype {arr.dtype} with values outside 0..255; store uint8 pixel values")
    if arr.dtype.kind == "f" and arr.size and not np.array_equal(arr, np.round(arr)):
        raise _fail(path, f"'{key}' holds fractional values; store uint8 pixel values 0..255")
    return arr.astype(np.uint8)


def _as_labels(arr: np.ndarray, n_images: int, path: Path, key: str) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise _fail(
            path,
            f"'{key}' has shape {tuple(arr.shape)}: multi-label tasks (one column per label, e.g. "
            "ChestMNIST) "
            "are not supported; give one class id per image, shape (N, 1)",
        )
    if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)):
        raise _fail(path, f"'{key}' has shape {tuple(arr.shape)}; expected (N, 1) class ids")
    arr = arr.reshape(-1)
    if arr.shape[0] != n_images:
        images_key = key.replace("_labels", "_images")
        raise _fail(
            path,
            f"'{images_key}' has {n_images} images but '{key}' has {arr.shape[0]} labels; "
            "every image needs exactly one label",
        )
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and arr.size and not np.array_equal(arr, np.round(arr))):
        raise _fail(path, f"'{key}' has dtype {arr.dtype}; labels must be integer class ids")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        bad = sorted({int(v) for v in arr[arr < 0]})[:5]
        raise _fail(path, f"'{key}' has negative label(s) {bad}; class ids must be 0..K-1")
    return arr


def _known_num_classes(stem: str) -> int | None:
    return MEDMNIST_NUM_CLASSES.get(re.sub(r"_\d+$", "", stem.lower()))


def load_medmnist_npz(path: str | Path, name: str | None = None) -> TaskData:
    """Read one MedMNIST-format file as one task, checking everything a training run would trip over later.

    The number of classes comes from the optional ``label_names`` key, else from the MedMNIST name of the
    file (e.g. ``organamnist_64.npz``), else from the largest label seen.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found; give the path of a MedMNIST-style .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _fail(path, f"not a readable .npz archive ({exc}); save it with numpy.savez[_compressed]") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _fail(path, "holds a single array, not an .npz archive with train/val/test images and labels")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise _fail(
                path,
                f"missing key(s) {', '.join(missing)}; a MedMNIST file has {', '.join(NPZ_KEYS)} (found: "
                f"{', '.join(archive.files) or 'nothing'})",
            )
        try:
            raw = {k: archive[k] for k in (*NPZ_KEYS, *([LABEL_NAMES_KEY] if LABEL_NAMES_KEY in archive.files else []))}
        except ValueError as exc:
            raise _fail(path, f"holds Python objects ({exc}); store plain numeric arrays") from None
    splits: dict[str, SplitArrays] = {}
    for split in SPLITS:
        images = _as_uint8_images(raw[f"{split}_images"], path, f"{split}_images")
        labels = _as_labels(raw[f"{split}_labels"], images.shape[0], path, f"{split}_labels")
        splits[split] = SplitArrays(images, labels)
    shapes = {s: a.images.shape[1:] for s, a in splits.items()}
    if len(set(shapes.values())) != 1:
        detail = ", ".join(f"{s} {tuple(v)}" for s, v in shapes.items())
        raise _fail(path, f"image shapes differ between splits ({detail}); all splits need one (H, W, C)")
    if len(splits["train"]) == 0:
        raise _fail(path, "train split is empty; a task needs training images")

    if LABEL_NAMES_KEY in raw:
        names_arr = raw[LABEL_NAMES_KEY]
        if names_arr.ndim != 1 or names_arr.dtype.kind != "U":
            raise _fail(
                path,
                f"'{LABEL_NAMES_KEY}' must be a 1-D array of strings, got {names_arr.dtype} {names_arr.shape}",
            )
        class_names = tuple(str(n) for n in names_arr)
        source_of_count = f"'{LABEL_NAMES_KEY}' lists {len(class_names)} classes"
    else:
        known = _known_num_classes(path.stem)
        observed = 1 + max(int(a.labels.max()) for a in splits.values() if len(a))
        count = known if known is not None else observed
        class_names = tuple(str(i) for i in range(count))
        source_of_count = f"{path.stem} has {count} classes in MedMNIST" if known is not None else ""
    k = len(class_names)
    for split, arrays in splits.items():
        if len(arrays) and int(arrays.labels.max()) >= k:
            bad = sorted({int(v) for v in arrays.labels[arrays.labels >= k]})[:5]
            raise _fail(path, f"'{split}_labels' has label(s) {bad} out of range 0..{k - 1} ({source_of_count})")
    if k < 2:
        raise _fail(path, f"only {k} class found; a classification task needs at least 2 classes")
    return TaskData(name or path.stem, class_names, splits, str(path))


def save_medmnist_npz(path: str | Path, task: TaskData) -> Path:
    """Write a task in MedMNIST layout (grey images as (N, H, W)), plus the optional ``label_names`` key."""
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        images = task.splits[split].images
        arrays[f"{split}_images"] = images[..., 0] if images.shape[3] == 1 else images
        arrays[f"{split}_labels"] = task.splits[split].labels.astype(np.int64).reshape(-1, 1)
    arrays[LABEL_NAMES_KEY] = np.asarray(task.class_names, dtype=np.str_)
    return save_npz(path, arrays)


def check_unique_names(tasks: Sequence[TaskData]) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise DatasetFormatError(
                f"{t.source}: task name '{t.name}' is also given by {seen[t.name]}; "
                "task names must be unique "
                "(rename one of the files)"
            )
        seen[t.name] = t.source


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size, size, C) with antialiased bilinear resampling."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = []
    for start in range(0, images.shape[0], 4096):
        x = torch.from_numpy(images[start : start + 4096]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    if not out:
        return np.zeros((0, size, size, images.shape[3]), np.uint8)
    return np.concatenate(out)


@dataclass(frozen=True)
class MultiTaskSplit:
    """All tasks' samples of one split, ready for batching: (N, C, S, S) uint8, labels and task ids."""

    images: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def common_geometry(tasks: Sequence[TaskData], image_size: int | None = None) -> tuple[int, int]:
    """(channels, image size) every task is brought to: RGB if any task is RGB; one square size."""
    channels = max(t.channels for t in tasks)
    if image_size is None:
        sizes = {t.image_hw for t in tasks}
        if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            detail = ", ".join(f"{t.name} {t.image_hw[0]}x{t.image_hw[1]}" for t in tasks)
            raise DatasetFormatError(
                f"tasks have different or non-square image sizes ({detail}); "
                "pass an image size (--image-size N) "
                "to resize them all to N x N"
            )
        image_size = next(iter(sizes))[0]
    return channels, int(image_size)


def assemble_split(
    tasks: Sequence[TaskData],
    split: str,
    channels: int,
    image_size: int,
    task_index: dict[str, int] | None = None,
) -> MultiTaskSplit:
    """Concatenate one split of several tasks; grey images are repeated to RGB when ``channels`` is 3."""
    images, labels, ids = [], [], []
    for i, task in enumerate(tasks):
        arrays = task.splits[split]
        x = resize_uint8(arrays.images, image_size)
        if x.shape[3] != channels:
            if x.shape[3] == 1:
                x = np.repeat(x, channels, axis=3)
            else:
                raise DatasetFormatError(
                    f"{task.source}: task '{task.name}' has RGB images but the model takes {channels} channel(s)"
                )
        images.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        labels.append(torch.from_numpy(arrays.labels))
        tid = task_index[task.name] if task_index is not None else i
        ids.append(torch.full((len(arrays),), tid, dtype=torch.long))
    return MultiTaskSplit(torch.cat(images), torch.cat(labels), torch.cat(ids))


def iterate_batches(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Index batches over n samples; shuffled batches mix tasks, which one routed forward handles."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from torch.split(order, batch_size)
