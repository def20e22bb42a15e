"""Build a real OrganMNIST-style benchmark (three tasks: axial, coronal, sagittal organ crops) from CT.

Source: the example CT of the TotalSegmentator 2.18.0 source distribution (PyPI, Apache-2.0) and its label
map ``example_seg_fast_force_split.nii.gz``. **Those labels are TotalSegmentator's own predictions** (kept
as regression-test references), not manual annotations; every output says so. OrganA/C/S-MNIST were made
the same way from manually labelled CT (crop organ boxes from axial/coronal/sagittal slices, the organ is
the label; MedMNIST v2, Yang et al., Scientific Data 2023).

Leakage-free split: the volume is first cut into z-slabs with the repeating pattern
``test 4 | gap 2 | val 2 | gap 2 | train 10 | gap 2`` slices (from the feet up; 3 mm slices, so every
gap is 6 mm), and every slice of every plane is taken from inside one slab's sub-volume. A coronal or
sagittal crop therefore only contains voxels of its own slab, and no voxel, organ part or slice of a test
crop is in any train crop. The price: coronal/sagittal crops are at most one slab tall (6-30 mm), padded
to a square. The pattern repeats so that organs that span only ~18 slices (femurs) reach every split;
validation gets the thinnest slabs because it only monitors training.

Download and cache (shared with ``lorkd-data``, see :mod:`nnunetv2_lorkd.data.sources`): ``pip download
--no-deps --no-binary :all: totalsegmentator==2.18.0`` into a temporary folder, sha256-check the sdist,
extract the three files needed and check their sha256, then keep only those (2.3 MB) in the cache
(``$LORKD_CACHE``, else ``$XDG_CACHE_HOME/nnunetv2_lorkd``, else ``~/.cache/nnunetv2_lorkd``), so later
runs work offline.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sources import (
    TOTALSEGMENTATOR,
    TS_FILES,
    TS_SDIST_NAME,
    TS_SDIST_SHA256,
    TS_VERSION,
    Archive,
    SourceError,
    SourceUnavailableError,  # noqa: F401  (re-exported: callers catch it from here)
    default_cache_dir,  # noqa: F401  (re-exported)
    fetch_archive_files,
    pip_downloader,
    sha256_file,
)
from ..files import write_json
from .data import SPLITS, SplitArrays, TaskData, save_medmnist_npz

SDIST_NAME = TS_SDIST_NAME
SDIST_SHA256 = TS_SDIST_SHA256
SOURCE_FILES: dict[str, tuple[str, str]] = {  # local name -> (member in the sdist, sha256)
    name: TS_FILES[name] for name in ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "map_to_binary.py")
}
LABELS_NOTE = (
    "Labels are TotalSegmentator 2.18.0 model predictions (the package's regression-test reference "
    "segmentation of its example CT), not manual annotations; one scan only, so results show that the "
    "pipeline works, not that they generalise."
)

# 11 classes present in the scan with enough slices in every split (pancreas and the lung bases span too
# few slices for the slab split; small_bowel takes pancreas' place; heart and lungs are not in the scan)
DEFAULT_CLASSES = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "small_bowel",
    "urinary_bladder",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
)
TASK_FILES = {"axial": "organa_ts", "coronal": "organc_ts", "sagittal": "organs_ts"}
DEFAULT_PATTERN: tuple[tuple[str, int], ...] = (
    ("test", 4),
    ("gap", 2),
    ("val", 2),
    ("gap", 2),
    ("train", 10),
    ("gap", 2),
)


def _pip_download(dest: Path) -> Path:
    return pip_downloader(f"totalsegmentator=={TS_VERSION}", SDIST_NAME, sdist=True)(dest)


def fetch_totalsegmentator_files(
    cache_dir: str | Path | None = None, downloader: Callable[[Path], Path] = _pip_download
) -> dict[str, Path]:
    """Paths of the three source files, downloading (once) and checking sha256 as needed.

    The shared cache of :mod:`nnunetv2_lorkd.data.sources` is used, so ``lorkd-data`` and this builder
    download the sdist at most once between them.
    """
    archive = Archive(
        key=TOTALSEGMENTATOR.key,
        description=TOTALSEGMENTATOR.description,
        files=SOURCE_FILES,
        sha256=SDIST_SHA256,
        downloader=downloader,
    )
    return fetch_archive_files(archive, cache_dir, downloader)


def locate_source_files(source_dir: str | Path) -> dict[str, Path]:
    """The three files in `source_dir`, either flat or at their paths inside an extracted sdist."""
    source_dir = Path(source_dir)
    found = {}
    for name, (member, _sha) in SOURCE_FILES.items():
        for candidate in (source_dir / name, source_dir / member, source_dir / member.split("/", 1)[1]):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            raise SourceError(f"{source_dir}: {name} not found (looked for it flat and at {member}); copy it there")
    return found


def read_class_map(path: str | Path, key: str = "total") -> dict[int, str]:
    """TotalSegmentator's ``class_map[key]`` read as a literal (the file is parsed, never executed)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            try:
                class_map = ast.literal_eval(node.value)
            except ValueError as exc:
                raise SourceError(f"{path}: class_map is not a plain literal ({exc})") from None
            if key not in class_map:
                raise SourceError(f"{path}: class_map has no '{key}' entry")
            return {int(k): str(v) for k, v in class_map[key].items()}
    raise SourceError(f"{path}: no `class_map = {{...}}` assignment found")


@dataclass(frozen=True)
class SlabLayout:
    """A repeating pattern of z-slabs (from slice 0 up); 'gap' slices belong to no split."""

    pattern: tuple[tuple[str, int], ...] = DEFAULT_PATTERN

    def __post_init__(self) -> None:
        names = {n for n, _ in self.pattern}
        if not set(SPLITS) <= names or not names <= {*SPLITS, "gap"} or any(k < 1 for _, k in self.pattern):
            raise ValueError(
                f"slab pattern {self.pattern} must name train, val and test (and optional gap), sizes >= 1"
            )

    def runs(self, depth: int) -> dict[str, list[tuple[int, int]]]:
        """Per split, the [z0, z1) slabs of a volume `depth` slices deep."""
        labels = [name for name, n in self.pattern for _ in range(n)]
        out: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
        z = 0
        while z < depth:
            name = labels[z % len(labels)]
            end = z
            while end < depth and labels[end % len(labels)] == name:
                end += 1
            if name != "gap":
                out[name].append((z, end))
            z = end
        return out


def _display(plane_slice: np.ndarray) -> np.ndarray:
    """RAS slice (first axis, second axis) -> radiological view: superior/anterior up, patient right left."""
    return plane_slice.T[::-1, ::-1]


def _plane_slices(ct: np.ndarray, seg: np.ndarray, plane: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    ct_view, seg_view = np.moveaxis(ct, axis, 0), np.moveaxis(seg, axis, 0)  # views: no copies per slice
    for image, labels in zip(ct_view, seg_view, strict=True):
        yield _display(image), _display(labels)


def square_crop(image: np.ndarray, mask: np.ndarray, margin: float, pad_value: float) -> np.ndarray:
    """The mask's bounding box plus `margin` (fraction of its longer side), made square; outside -> pad."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    side = int(max(r1 - r0 + 1, c1 - c0 + 1))
    side += 2 * max(1, round(margin * side))
    top = (r0 + r1 + 1 - side) // 2
    left = (c0 + c1 + 1 - side) // 2
    out = np.full((side, side), pad_value, dtype=np.float32)
    sr0, sc0 = max(top, 0), max(left, 0)
    sr1, sc1 = min(top + side, image.shape[0]), min(left + side, image.shape[1])
    out[sr0 - top : sr1 - top, sc0 - left : sc1 - left] = image[sr0:sr1, sc0:sc1]
    return out


def _to_uint8(crops: list[np.ndarray], size: int, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    out = np.empty((len(crops), size, size), dtype=np.uint8)
    for i, crop in enumerate(crops):
        x = torch.from_numpy((np.clip(crop, lo, hi) - lo) * (255.0 / (hi - lo)))[None, None]
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = y[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def load_volumes(ct_path: str | Path, seg_path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """CT (HU, float32) and label map (int), both reoriented to RAS; they must share one isotropic grid."""
    import nibabel as nib

    ct_img = nib.as_closest_canonical(nib.load(str(ct_path)))
    seg_img = nib.as_closest_canonical(nib.load(str(seg_path)))
    if ct_img.shape != seg_img.shape or not np.allclose(ct_img.affine, seg_img.affine, atol=1e-3):
        raise SourceError(
            f"{seg_path}: label map grid {seg_img.shape} does not match the CT {ct_img.shape} ({ct_path})"
        )
    spacing = tuple(float(s) for s in ct_img.header.get_zooms()[:3])
    if max(spacing) > 1.01 * min(spacing):
        raise SourceError(f"{ct_path}: spacing {spacing} is not isotropic; resample CT and labels to isotropic first")
    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    seg = np.asarray(seg_img.dataobj).astype(np.int32)
    return ct, seg, spacing


def extract_crops(
    ct: np.ndarray,
    seg: np.ndarray,
    class_ids: Sequence[int],
    layout: SlabLayout,
    min_pixels: int,
    margin: float,
    pad_value: float,
) -> dict[str, dict[str, tuple[list[np.ndarray], list[int]]]]:
    """plane -> split -> (HU crops, class index) for every (slice, class) with >= min_pixels of that class."""
    index_of = {label: i for i, label in enumerate(class_ids)}
    out: dict[str, dict[str, tuple[list[np.ndarray], list[int]]]] = {}
    runs = layout.runs(ct.shape[2])
    for plane in TASK_FILES:
        out[plane] = {}
        for split in SPLITS:
            crops: list[np.ndarray] = []
            labels: list[int] = []
            for z0, z1 in runs[split]:  # slices never leave their slab's sub-volume
                for image, labelmap in _plane_slices(ct[:, :, z0:z1], seg[:, :, z0:z1], plane):
                    present, counts = np.unique(labelmap, return_counts=True)
                    for label, count in zip(present.tolist(), counts.tolist(), strict=True):
                        if label in index_of and count >= min_pixels:
                            crops.append(square_crop(image, labelmap == label, margin, pad_value))
                            labels.append(index_of[label])
            out[plane][split] = (crops, labels)
    return out


def build_organmnist_style(
    out_dir: str | Path,
    *,
    sizes: Sequence[int] = (28,),
    source_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    layout: SlabLayout | None = None,
    min_pixels: int = 10,
    margin: float = 0.15,
    window: tuple[float, float] = (-160.0, 240.0),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write organ{a,c,s}_ts[_SIZE].npz (MedMNIST layout + label_names) and organmnist_ts_info.json.

    `source_dir` holds the three source files (not checksum-checked: a stand-in is allowed); without it they
    are fetched into the cache and checked. The abdominal window [-160, 240] HU maps to 0..255.
    """
    layout = layout or SlabLayout()
    if not sizes or any(int(s) < 8 for s in sizes):
        raise ValueError(f"sizes {list(sizes)}: give one or more image sizes >= 8 (e.g. 28 64)")
    files = locate_source_files(source_dir) if source_dir is not None else fetch_totalsegmentator_files(cache_dir)
    class_map = read_class_map(files["map_to_binary.py"])
    id_of = {name: cid for cid, name in class_map.items()}
    unknown = [c for c in classes if c not in id_of]
    if unknown:
        raise ValueError(f"unknown TotalSegmentator class(es) {', '.join(unknown)}; see class_map['total']")
    ct, seg, spacing = load_volumes(files["example_ct.nii.gz"], files["example_seg_fast_force_split.nii.gz"])
    class_ids = [id_of[c] for c in classes]
    absent = [c for c, cid in zip(classes, class_ids, strict=True) if not (seg == cid).any()]
    if absent:
        raise ValueError(f"class(es) {', '.join(absent)} do not occur in the label map; choose classes that do")
    crops = extract_crops(ct, seg, class_ids, layout, min_pixels, margin, pad_value=window[0])

    out_dir = Path(out_dir)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    empty: list[str] = []
    written: list[str] = []
    for plane, per_split in crops.items():
        counts[TASK_FILES[plane]] = {
            split: {c: int(np.sum(np.asarray(labels) == i)) for i, c in enumerate(classes)}
            for split, (_crops, labels) in per_split.items()
        }
        empty += [
            f"{TASK_FILES[plane]}/{split}/{c}"
            for split, per_class in counts[TASK_FILES[plane]].items()
            for c, n in per_class.items()
            if n == 0
        ]
        for size in sizes:
            splits = {
                split: SplitArrays(_to_uint8(c, int(size), window)[..., None], np.asarray(labels, dtype=np.int64))
                for split, (c, labels) in per_split.items()
            }
            name = TASK_FILES[plane] + ("" if int(size) == 28 else f"_{int(size)}")
            path = save_medmnist_npz(out_dir / f"{name}.npz", TaskData(name, tuple(classes), splits, "built"))
            written.append(str(path))
            log(f"wrote {path}: " + ", ".join(f"{s} {len(a)}" for s, a in splits.items()))
    if empty:
        log(f"warning: no crops for {len(empty)} (task/split/class): {', '.join(empty)}")
    info = {
        "labels_note": LABELS_NOTE,
        "source": {
            "package": f"totalsegmentator=={TS_VERSION} (PyPI sdist, Apache-2.0)",
            "files": {n: {"path": str(p), "sha256": sha256_file(p)} for n, p in files.items()},
        },
        "classes": [
            {"index": i, "name": c, "totalsegmentator_id": cid}
            for i, (c, cid) in enumerate(zip(classes, class_ids, strict=True))
        ],
        "volume_shape": list(ct.shape),
        "spacing_mm": list(spacing),
        "split": {
            "method": "repeating z-slab pattern on the RAS volume; each slice of each plane lies in one slab",
            "pattern_from_z0": [list(p) for p in layout.pattern],
            "slabs": {s: [list(r) for r in rs] for s, rs in layout.runs(ct.shape[2]).items()},
        },
        "crop": {
            "min_pixels": min_pixels,
            "margin": margin,
            "window_hu": list(window),
            "sizes": [int(s) for s in sizes],
        },
        "counts": counts,
        "empty": empty,
        "files": written,
    }
    write_json(out_dir / "organmnist_ts_info.json", info)
    return info
