"""RadImageNet-style input: a folder of image files plus one CSV that says what each file is.

CSV layout (header required; extra columns are ignored)::

    filename,label,task,split
    ct_abdomen/liver/0001.png,liver,ct_abdomen,train
    mr_knee/acl/0413.png,acl_tear,mr_knee,test

- ``filename``: path relative to the image root (default: the CSV's folder), or absolute.
- ``label``: class *name*. Class ids of a task are its class names in sorted order, so they do not depend
  on row order and are stored with the model.
- ``task``: task name (one label set per task, like RadImageNet's modality/anatomy groups).
- ``split``: ``train``, ``val`` or ``test``.

Images are decoded with Pillow, kept grey when every image of a task is grey (RGB otherwise) and resized to
a square ``image_size``. Everything is loaded into memory, which suits sets up to a few 100k small images.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from .data import SPLITS, DatasetFormatError, SplitArrays, TaskData, resize_uint8

CSV_COLUMNS = ("filename", "label", "task", "split")


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DatasetFormatError(f"{csv_path}: file not found; give the path of the dataset CSV")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise DatasetFormatError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; the header must contain "
                    f"{','.join(CSV_COLUMNS)} (found: {','.join(header) or 'no header'})"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{csv_path}: not UTF-8 text ({exc}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise DatasetFormatError(f"{csv_path}: malformed CSV ({exc})") from None
    if not rows:
        raise DatasetFormatError(f"{csv_path}: no data rows; add one row per image")
    for line, row in enumerate(rows, start=2):
        empty = [c for c in CSV_COLUMNS if not row.get(c)]
        if empty:
            raise DatasetFormatError(
                f"{csv_path}: line {line} has an empty {', '.join(empty)}; every row needs all four"
            )
        if row["split"] not in SPLITS:
            raise DatasetFormatError(
                f"{csv_path}: line {line} has split '{row['split']}'; use one of {', '.join(SPLITS)}"
            )
    return rows


def _load_image(path: Path, csv_path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I", "F"):
                raise DatasetFormatError(
                    f"{csv_path}: image {path} is {mode} (16-bit/float); convert it to 8-bit grey or RGB first"
                )
            grey = mode in ("L", "1", "LA") or (mode == "P" and _palette_is_grey(im))
            arr = np.array(im.convert("L" if grey else "RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetFormatError(f"{csv_path}: cannot read image {path} ({exc})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _palette_is_grey(im) -> bool:
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def load_radimagenet_csv(
    csv_path: str | Path, image_root: str | Path | None = None, image_size: int = 28
) -> list[TaskData]:
    """All tasks of a RadImageNet-style CSV, one TaskData per ``task`` value, in order of first appearance."""
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    rows = _read_rows(csv_path)
    missing = [r["filename"] for r in rows if not (root / r["filename"]).is_file()]
    if missing:
        raise DatasetFormatError(
            f"{csv_path}: {len(missing)} listed image file(s) not found under {root} (first: "
            f"{', '.join(missing[:3])}); fix the paths or pass the right image root (--image-root)"
        )
    by_task: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    tasks = []
    for name, task_rows in by_task.items():
        classes = tuple(sorted({r["label"] for r in task_rows}))
        train_classes = {r["label"] for r in task_rows if r["split"] == "train"}
        if not train_classes:
            raise DatasetFormatError(f"{csv_path}: task '{name}' has no 'train' rows; every task needs training images")
        unseen = sorted(set(classes) - train_classes)
        if unseen:
            raise DatasetFormatError(
                f"{csv_path}: task '{name}' has class(es) {', '.join(unseen)} only outside 'train'; "
                "every class "
                "needs training images"
            )
        if len(classes) < 2:
            raise DatasetFormatError(
                f"{csv_path}: task '{name}' has a single class '{classes[0]}'; it needs at least 2"
            )
        images = [_load_image(root / r["filename"], csv_path) for r in task_rows]
        channels = 3 if any(im.shape[2] == 3 for im in images) else 1
        resized = [
            resize_uint8((np.repeat(im, 3, axis=2) if im.shape[2] < channels else im)[None], image_size)[0]
            for im in images
        ]
        index = {c: i for i, c in enumerate(classes)}
        splits = {}
        for split in SPLITS:
            sel = [i for i, r in enumerate(task_rows) if r["split"] == split]
            imgs = (
                np.stack([resized[i] for i in sel])
                if sel
                else np.zeros((0, image_size, image_size, channels), np.uint8)
            )
            labels = np.asarray([index[task_rows[i]["label"]] for i in sel], dtype=np.int64)
            splits[split] = SplitArrays(imgs, labels)
        tasks.append(TaskData(name, classes, splits, str(csv_path)))
    return tasks
