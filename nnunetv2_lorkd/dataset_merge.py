"""``lorkd-merge``: combine nnU-Net v2 raw datasets into one multi-region raw dataset for LoRKD.

LoRKD trains one network with one expert per region on a single nnU-Net dataset id. This tool builds that
dataset from per-region datasets (or from one dataset whose labels are split into region subsets):

- ``labels`` is the union label space: background 0, then every region's structures numbered consecutively in
  the order the inputs are given (within one input, by its original label value); a structure name that occurs
  in several inputs gets one value. An ``ignore`` label of any input becomes the union's ``ignore`` (max + 1).
- images are not copied: the nnU-Net ``dataset`` key points at the original image files (absolute paths).
  Label files are rewritten into ``labelsTr/`` only where their values change (remapped to the union values,
  labels outside the case's region set to 0, geometry copied); otherwise the original label file is used.
- the ``lorkd`` section (see :mod:`nnunetv2_lorkd.regions`) lists the regions in command-line order (= expert
  index), each with its label names, the region of every case and its source (``case_sources``:
  ``DatasetXXX_Input/<case>``, or the input's own record of it).
- a region-stratified ``splits_final.json`` (:mod:`nnunetv2_lorkd.folds`) is written to
  ``$nnUNet_preprocessed/DatasetXXX_NAME/`` when that variable is set, and always as
  ``splits_final.json`` into the raw dataset folder. Cases with the same source (split mode: ``c0_abdomen``
  and ``c0_pelvis``) are one group there: they are validated in the same fold and never split between the
  training and the validation set of a fold. Cases of different input datasets are different patients.

Case ids (deterministic):

1. a case keeps its id;
2. a dataset used for several regions (split mode) contributes each case once per region, as
   ``<case>_<region>``;
3. if that leaves two equal ids (or with ``--case-prefix always``) every case id becomes ``<region>_<case>``
   instead (also in split mode, without the suffix); a collision that remains is an error.

Everything is checked before anything is written; the dataset is built in a hidden temporary folder next to
the target and renamed into place at the end, so a failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import read_json, write_json
from .folds import stratified_splits_with_warnings
from .regions import Region, RegionMap, RegionMapError, parse_case_sources

_REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# endings whose label files SimpleITK can rewrite with their geometry (nnU-Net's .tif needs a spacing sidecar)
_REWRITABLE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".bmp")
SPLITS_COPY_NAME = "splits_final.json"


class MergeError(Exception):
    """A problem with the inputs or the target of a merge; the message says what is wrong and the fix."""


@dataclass(frozen=True)
class InputSpec:
    """One ``(dataset, region)`` input. ``labels=None`` means all foreground labels of the dataset."""

    dataset: str
    region: str | None
    labels: tuple[str, ...] | None = None


@dataclass
class MergeResult:
    folder: Path
    dataset_json: dict
    splits: list[dict[str, list[str]]]
    splits_files: list[Path]
    warnings: list[str] = field(default_factory=list)
    rewritten_labels: int = 0


@dataclass
class _Source:
    folder: Path
    dataset_json: dict
    labels: dict[str, int]  # foreground name -> value (no background, no ignore)
    ignore_value: int | None
    cases: dict[str, tuple[list[str], str]]  # case id -> (absolute image paths, absolute label path)
    recorded_sources: dict[str, str] = field(default_factory=dict)  # the input's own lorkd.case_sources

    @property
    def name(self) -> str:
        return self.folder.name

    def source_of(self, case: str) -> str:
        """``DATASET/CASE`` of the image behind ``case``: the input's own record (an input that was itself
        merged), else this dataset and case."""
        return self.recorded_sources.get(case, f"{self.name}/{case}")


@dataclass
class _Part:
    spec: InputSpec
    source: _Source
    region: str
    label_names: tuple[str, ...]  # ascending original value


# -------------------------------------------------------------------------------------------- input parsing
def parse_region_spec(text: str, where: str) -> tuple[str, tuple[str, ...] | None]:
    """``REGION`` or ``REGION:LABEL,LABEL`` / ``REGION=LABEL,LABEL`` -> (region, labels or None)."""
    name, *rest = re.split(r"[:=]", text, maxsplit=1)
    name = name.strip()
    if not _REGION_NAME.match(name):
        raise MergeError(
            f"{where}: region name {name!r} is not valid; use letters, digits, '_' and '-' only (the region "
            "name names the expert and can become part of case ids)"
        )
    if not rest:
        return name, None
    labels = tuple(dict.fromkeys(s.strip() for s in rest[0].split(",") if s.strip()))
    if not labels:
        raise MergeError(
            f"{where}: region '{name}' lists no labels; write {name}=LABEL[,LABEL...], or give just '{name}' "
            "to use all labels of the dataset"
        )
    return name, labels


def _specs_from_args(inputs: Sequence[Sequence[str]], regions: Sequence[str]) -> list[InputSpec]:
    specs: list[InputSpec] = []
    bare = [i for i, values in enumerate(inputs) if len(values) == 1]
    for values in inputs:
        if len(values) > 2:
            raise MergeError(
                f"-i {' '.join(values)}: -i takes a dataset and optionally one REGION[:LABELS]; repeat -i "
                "for more regions"
            )
    if regions and len(bare) != 1:
        raise MergeError(
            "--region splits exactly one input given as plain `-i DATASET` (without a region), but "
            f"{len(bare)} such inputs were given; write the other inputs as `-i DATASET REGION`"
        )
    for values in inputs:
        if len(values) == 2:
            region, labels = parse_region_spec(values[1], f"-i {values[0]} {values[1]}")
            specs.append(InputSpec(values[0], region, labels))
        elif regions:
            for text in regions:
                region, labels = parse_region_spec(text, f"--region {text}")
                specs.append(InputSpec(values[0], region, labels))
        else:
            specs.append(InputSpec(values[0], None))
    return specs


# -------------------------------------------------------------------------------------------- nnU-Net paths
def _raw_root() -> Path:
    from nnunetv2.paths import nnUNet_raw

    try:
        return Path(nnUNet_raw.require())
    except RuntimeError:
        raise MergeError(
            "nnUNet_raw is not set; lorkd-merge reads the input datasets from it and writes the merged "
            "dataset there: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
            "documentation/setting_up_paths.md)"
        ) from None


def _preprocessed_root() -> Path | None:
    from nnunetv2.paths import nnUNet_preprocessed

    return Path(nnUNet_preprocessed.get()) if nnUNet_preprocessed.is_set() else None


def _results_root() -> Path | None:
    from nnunetv2.paths import nnUNet_results

    return Path(nnUNet_results.get()) if nnUNet_results.is_set() else None


def _datasets_with_id(root: Path | None, dataset_id: int) -> list[Path]:
    """Folders ``DatasetXXX_*`` with that id under ``root`` (nnU-Net's naming, ``Dataset%03d_NAME``)."""
    if root is None or not root.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def _available(raw: Path) -> str:
    names = (
        sorted(p.name for p in raw.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
        if raw.is_dir()
        else []
    )
    if not names:
        return "there are no datasets there"
    return "available: " + ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")


def _resolve_dataset(token: str, raw: Path) -> Path:
    """A dataset given as a folder, a name under nnUNet_raw (``Dataset501_Abdomen``) or an id (``501``)."""
    path = Path(token).expanduser()
    if path.is_dir():
        folder = path
    elif (raw / token).is_dir():
        folder = raw / token
    elif token.isdigit():
        found = _datasets_with_id(raw, int(token))
        if not found:
            raise MergeError(
                f"input dataset '{token}' not found: no Dataset{int(token):03d}_* folder under "
                f"nnUNet_raw={raw} ({_available(raw)}); give an existing id, name or folder"
            )
        if len(found) > 1:
            raise MergeError(
                f"input dataset id {token} is ambiguous under nnUNet_raw={raw}: {[p.name for p in found]}; "
                "give the full dataset name instead"
            )
        folder = found[0]
    else:
        raise MergeError(
            f"input dataset '{token}' not found: it is neither a folder nor a dataset name or id under "
            f"nnUNet_raw={raw} ({_available(raw)}); give an existing id, name or folder"
        )
    folder = folder.resolve()
    if not (folder / "dataset.json").is_file():
        raise MergeError(
            f"input dataset {folder} has no dataset.json; point -i at an nnU-Net v2 raw dataset folder"
        )
    return folder


# ------------------------------------------------------------------------------------------- loading inputs
def _load_json(path: Path) -> dict:
    return read_json(path, MergeError, reject_duplicate_keys=True)


def _check_labels(name: str, labels: object) -> tuple[dict[str, int], int | None]:
    if not isinstance(labels, dict) or not labels:
        raise MergeError(f"{name}/dataset.json has no 'labels' mapping; add one (name -> integer value)")
    by_value: dict[int, str] = {}
    foreground: dict[str, int] = {}
    ignore_value = None
    for label, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise MergeError(
                f"{name}/dataset.json: label '{label}' is {value}, an nnU-Net region-based label; "
                "lorkd-merge does not support region-based labels: give the dataset plain integer labels "
                "(LoRKD regions are defined by lorkd-merge's REGION arguments)"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MergeError(
                f"{name}/dataset.json: label '{label}' has value {value!r}; label values must be "
                "integers >= 0"
            )
        if value in by_value:
            raise MergeError(
                f"{name}/dataset.json: label value {value} has two names, '{by_value[value]}' and '{label}'; "
                f"give every value exactly one name in the 'labels' of {name}/dataset.json"
            )
        by_value[value] = label
        if label == "ignore":
            ignore_value = value
        elif value != 0:
            if label == "background":
                raise MergeError(
                    f"{name}/dataset.json: 'background' has value {value}; background must be 0, rename the "
                    "label"
                )
            foreground[label] = value
    return dict(sorted(foreground.items(), key=lambda kv: kv[1])), ignore_value


def _find_cases(folder: Path, dataset_json: dict, file_ending: str, num_channels: int) -> dict:
    """case id -> (image paths, label path), found as nnU-Net does (``dataset`` key or imagesTr/labelsTr)."""
    cases: dict[str, tuple[list[str], str]] = {}
    if "dataset" in dataset_json:
        entries = dataset_json["dataset"]
        if not isinstance(entries, dict):
            raise MergeError(f"{folder.name}/dataset.json: 'dataset' must map case ids to images and label")

        def resolve(p: str) -> str:
            p = os.path.expandvars(p)
            return os.path.abspath(p if os.path.isabs(p) else folder / p)

        for case, entry in entries.items():
            try:
                cases[case] = ([resolve(i) for i in entry["images"]], resolve(entry["label"]))
            except (KeyError, TypeError):
                raise MergeError(
                    f"{folder.name}/dataset.json: dataset entry '{case}' needs 'images' (a list) and 'label'"
                ) from None
    else:
        images_dir = folder / "imagesTr"
        if not images_dir.is_dir():
            raise MergeError(
                f"{folder} has neither imagesTr/ nor a 'dataset' key in dataset.json; it has no cases"
            )
        pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
        channels: dict[str, dict[int, str]] = {}
        for fname in sorted(os.listdir(images_dir)):
            m = pattern.match(fname)
            if m:
                channels.setdefault(m.group(1), {})[int(m.group(2))] = str((images_dir / fname).resolve())
        for case, by_channel in channels.items():
            if sorted(by_channel) != list(range(num_channels)):
                raise MergeError(
                    f"{folder.name}: case '{case}' has image channels {sorted(by_channel)} but channel_names "
                    f"declares {num_channels}; add the missing {case}_XXXX{file_ending} files"
                )
            label = folder / "labelsTr" / f"{case}{file_ending}"
            cases[case] = ([by_channel[c] for c in range(num_channels)], str(label.resolve()))
    if not cases:
        raise MergeError(
            f"input dataset {folder.name} has no training cases; check imagesTr/ or its 'dataset' key"
        )
    missing = [p for images, label in cases.values() for p in [*images, label] if not os.path.isfile(p)]
    if missing:
        raise MergeError(
            f"input dataset {folder.name}: {len(missing)} image/label file(s) are missing, e.g. "
            f"{missing[:3]}; fix the dataset (nnUNetv2_plan_and_preprocess --verify_dataset_integrity helps)"
        )
    for case, (images, _) in cases.items():
        if len(images) != num_channels:
            raise MergeError(
                f"{folder.name}: case '{case}' has {len(images)} image(s) but channel_names declares "
                f"{num_channels}"
            )
    return dict(sorted(cases.items()))


def _load_source(folder: Path) -> _Source:
    dataset_json = _load_json(folder / "dataset.json")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dataset_json:
            raise MergeError(
                f"{folder.name}/dataset.json has no '{key}'; it is not a valid nnU-Net v2 dataset.json"
            )
    if not isinstance(dataset_json["channel_names"], dict) or not dataset_json["channel_names"]:
        raise MergeError(
            f"{folder.name}/dataset.json: 'channel_names' must map channel indices to names, "
            'e.g. {"0": "CT"}'
        )
    if "regions_class_order" in dataset_json:
        raise MergeError(
            f"{folder.name}/dataset.json has 'regions_class_order', i.e. nnU-Net region-based labels, which "
            "lorkd-merge does not support: give the dataset plain integer labels"
        )
    labels, ignore_value = _check_labels(folder.name, dataset_json["labels"])
    cases = _find_cases(folder, dataset_json, dataset_json["file_ending"], len(dataset_json["channel_names"]))
    section = dataset_json.get("lorkd")
    recorded: dict[str, str] = {}
    if isinstance(section, dict) and "case_sources" in section:
        try:
            recorded = parse_case_sources(section["case_sources"], f"{folder.name}/dataset.json", cases)
        except RegionMapError as e:
            raise MergeError(f"{e}; fix or remove lorkd.case_sources of that input") from None
    return _Source(folder, dataset_json, labels, ignore_value, cases, recorded)


# ------------------------------------------------------------------------------------------ label rewriting
def _remap_label_file(src: str, dst: str, mapping: dict[int, int], dtype_name: str, dataset: str) -> None:
    """Write ``src`` with values replaced by ``mapping`` (other values are an error), geometry unchanged."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(src)
    except RuntimeError as e:
        raise MergeError(
            f"cannot read label file {src} ({str(e).strip().splitlines()[-1]}); fix or replace it"
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MergeError(
            f"label file {src} has {image.GetNumberOfComponentsPerPixel()} components; expected 1"
        )
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise MergeError(f"label file {src} has non-integer values; label files must hold integer labels")
        array = array.astype(np.int64)
    low, high = int(array.min()), int(array.max())
    lut = np.full(max(high, max(mapping)) + 1, -1, dtype=np.int32)
    for old, new in mapping.items():
        lut[old] = new
    if low < 0:
        bad = sorted({int(v) for v in np.unique(array[array < 0])})
        raise MergeError(
            f"label file {src} contains value(s) {bad} that {dataset}/dataset.json does not define; fix the "
            "label file or add the labels to dataset.json"
        )
    remapped = lut[array]
    if (remapped < 0).any():
        bad = sorted({int(v) for v in np.unique(array[remapped < 0])})
        raise MergeError(
            f"label file {src} contains value(s) {bad} that {dataset}/dataset.json does not define; fix the "
            "label file or add the labels to dataset.json"
        )
    out = sitk.GetImageFromArray(remapped.astype(dtype_name), isVector=False)
    out.CopyInformation(image)
    sitk.WriteImage(out, dst, useCompression=True)


def _run_jobs(jobs: list[tuple[str, str, dict[int, int], str, str]], num_processes: int) -> None:
    if num_processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            _remap_label_file(*job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold torch/OpenMP threads, which do not survive fork reliably
    with ProcessPoolExecutor(
        min(num_processes, len(jobs)), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for future in [pool.submit(_remap_label_file, *job) for job in jobs]:
            future.result()


# ------------------------------------------------------------------------------------------------ the merge
def _check_target(raw: Path, dataset_id: int, name: str, overwrite: bool, input_folders: list[Path]) -> Path:
    if not 1 <= dataset_id <= 999:
        raise MergeError(f"output dataset id {dataset_id} is out of range; nnU-Net ids are 1..999")
    if not _DATASET_NAME.match(name):
        raise MergeError(
            f"output name {name!r} is not valid; use letters, digits, '_' and '-' (e.g. LoRKDMerged)"
        )
    target = raw / f"Dataset{dataset_id:03d}_{name}"
    for folder in input_folders:
        if folder.name.startswith(f"Dataset{dataset_id:03d}_"):
            raise MergeError(
                f"output id {dataset_id} is the id of input dataset {folder.name}; choose another -d for the "
                "merge"
            )
    existing = _datasets_with_id(raw, dataset_id)
    if existing and not overwrite:
        raise MergeError(
            f"dataset id {dataset_id} already exists under nnUNet_raw: {[p.name for p in existing]}; choose "
            "another -d, or pass --overwrite to replace it"
        )
    others = [p for p in existing if p.name != target.name]
    for root in (_preprocessed_root(), _results_root()):
        others += [p for p in _datasets_with_id(root, dataset_id) if p.name != target.name]
    if others:
        raise MergeError(
            f"dataset id {dataset_id} is used by another dataset name: {[str(p) for p in others]}; nnU-Net "
            "needs one name per id: choose another -d (or -n), or delete those folders yourself "
            f"(--overwrite only replaces {target.name})"
        )
    return target


def _case_ids(parts: list[_Part], case_prefix: str) -> list[dict[str, str]]:
    """Per part: original case id -> merged case id (rule in the module docstring)."""
    uses = Counter(p.source.folder for p in parts)

    def assign(prefix: bool) -> list[dict[str, str]]:
        out = []
        for p in parts:
            if prefix:
                out.append({c: f"{p.region}_{c}" for c in p.source.cases})
            elif uses[p.source.folder] > 1:
                out.append({c: f"{c}_{p.region}" for c in p.source.cases})
            else:
                out.append({c: c for c in p.source.cases})
        return out

    def duplicates(ids: list[dict[str, str]]) -> list[str]:
        return sorted(k for k, n in Counter(v for m in ids for v in m.values()).items() if n > 1)

    ids = assign(case_prefix == "always")
    if case_prefix == "auto" and duplicates(ids):
        ids = assign(True)
    dupes = duplicates(ids)
    if dupes:
        raise MergeError(
            f"case ids {dupes[:5]} would occur twice in the merged dataset even with region prefixes; rename "
            "the regions (or the cases) so that '<region>_<case>' is unique"
        )
    return ids


def merge_datasets(
    specs: Sequence[InputSpec],
    dataset_id: int,
    name: str,
    *,
    overwrite: bool = False,
    num_folds: int = 5,
    seed: int = 12345,
    case_prefix: str = "auto",
    num_processes: int = 1,
) -> MergeResult:
    """Build ``$nnUNet_raw/DatasetXXX_NAME`` from ``specs`` (region order = expert index); see the module doc.

    Raises :class:`MergeError` for every input or target problem, before anything is written.
    """
    if case_prefix not in ("auto", "always"):
        raise MergeError(f"case_prefix must be 'auto' or 'always', got {case_prefix!r}")
    if not specs:
        raise MergeError("no inputs: give at least one `-i DATASET REGION`")
    raw = _raw_root()

    # regions: named, unique
    seen: dict[str, InputSpec] = {}
    for spec in specs:
        if spec.region is None:
            raise MergeError(
                f"input '{spec.dataset}' has no region, so its cases would be in no region: give one with "
                f"`-i {spec.dataset} REGION`, or split it with `--region REGION=LABEL,...`"
            )
        if spec.region in seen:
            raise MergeError(
                f"region '{spec.region}' is given twice (for '{seen[spec.region].dataset}' and "
                f"'{spec.dataset}'); every region is one expert and needs a unique name"
            )
        seen[spec.region] = spec

    # inputs: resolved, loaded once per folder, labels checked
    sources: dict[Path, _Source] = {}
    parts: list[_Part] = []
    for spec in specs:
        folder = _resolve_dataset(spec.dataset, raw)
        if folder not in sources:
            sources[folder] = _load_source(folder)
        source = sources[folder]
        if spec.labels is None:
            names = tuple(source.labels)
            if not names:
                raise MergeError(
                    f"input dataset {source.name} has no foreground labels; nothing to learn from it"
                )
        else:
            unknown = [n for n in spec.labels if n not in source.labels]
            if unknown:
                raise MergeError(
                    f"region '{spec.region}': {source.name} has no label(s) {unknown}; valid labels are "
                    f"{list(source.labels)}"
                )
            names = tuple(sorted(spec.labels, key=source.labels.__getitem__))
        parts.append(_Part(spec, source, spec.region, names))

    first = parts[0].source
    for part in parts[1:]:
        other = part.source
        for key, what in (("channel_names", "channel names"), ("file_ending", "file endings")):
            a, b = first.dataset_json[key], other.dataset_json[key]
            if key == "channel_names":
                a, b = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
            if a != b:
                raise MergeError(
                    f"{what} differ: {first.name} has {a!r} but {other.name} has {b!r}; all inputs must have "
                    f"the same {what} (convert the datasets, or fix a misnamed entry in dataset.json)"
                )
        a = first.dataset_json.get("overwrite_image_reader_writer")
        b = other.dataset_json.get("overwrite_image_reader_writer")
        if a != b:
            raise MergeError(
                f"overwrite_image_reader_writer differs: {first.name} has {a!r} but {other.name} has {b!r}; "
                "make them equal so one reader reads all inputs"
            )
    file_ending = first.dataset_json["file_ending"]
    channel_names = first.dataset_json["channel_names"]

    target = _check_target(raw, dataset_id, name, overwrite, list(sources))

    # union label space and per-part value mappings
    union: dict[str, int] = {"background": 0}
    for part in parts:
        for label in part.label_names:
            union.setdefault(label, len(union))
    if any(p.source.ignore_value is not None for p in parts):
        union["ignore"] = len(union)
    dtype_name = "uint8" if max(union.values()) <= 255 else "uint16"
    mappings: list[dict[int, int]] = []
    for part in parts:
        mapping = {0: 0}
        for label, value in part.source.labels.items():
            mapping[value] = union[label] if label in part.label_names else 0
        if part.source.ignore_value is not None:
            mapping[part.source.ignore_value] = union["ignore"]
        mappings.append(mapping)
    warnings: list[str] = []
    for source in sources.values():
        used = {label for p in parts if p.source is source for label in p.label_names}
        dropped = [label for label in source.labels if label not in used]
        if dropped:
            warnings.append(
                f"labels {dropped} of {source.name} are in no region and are set to 0 (background)"
            )

    # case ids, region map, splits
    id_maps = _case_ids(parts, case_prefix)
    regions = tuple(
        Region(p.region, p.label_names, tuple(union[label] for label in p.label_names)) for p in parts
    )
    case_regions = {new: index for index, ids in enumerate(id_maps) for new in ids.values()}
    # the image behind every merged case: split mode's <case>_<region> copies share their source case, so the
    # splits keep them in one fold (one patient is never trained on and validated on in the same fold)
    case_sources = {
        new: part.source.source_of(old) for part, ids in zip(parts, id_maps, strict=True) for old, new in ids.items()
    }
    region_map = RegionMap(
        regions, case_regions, {k: v for k, v in union.items() if k != "ignore"}, case_sources
    )
    try:
        splits, split_warnings = stratified_splits_with_warnings(case_regions, num_folds, seed, case_sources)
    except ValueError as e:
        raise MergeError(f"cannot build the cross-validation splits: {e}") from None
    names_by_index = {i: r.name for i, r in enumerate(regions)}
    for message in split_warnings:
        # the splitter speaks in region indices; name them for the user
        warnings.append(
            re.sub(r"^region (\d+)", lambda m: f"region '{names_by_index[int(m.group(1))]}'", message)
        )

    # dataset entries and the label files to write
    entries: dict[str, dict] = {}
    jobs: list[tuple[str, str, dict[int, int], str, str]] = []
    for part, ids, mapping in zip(parts, id_maps, mappings, strict=True):
        identity = all(old == new for old, new in mapping.items())
        if not identity and file_ending not in _REWRITABLE_ENDINGS:
            raise MergeError(
                f"the labels of {part.source.name} must be remapped, but lorkd-merge can only rewrite label "
                f"files ending in {', '.join(_REWRITABLE_ENDINGS)} (this dataset uses {file_ending}); "
                "convert it first"
            )
        for case, (images, label) in part.source.cases.items():
            new_id = ids[case]
            if identity:
                label_entry = label
            else:
                label_entry = f"labelsTr/{new_id}{file_ending}"
                jobs.append((label, label_entry, mapping, dtype_name, part.source.name))
            entries[new_id] = {"images": list(images), "label": label_entry}

    dataset_json = {
        "name": target.name,
        "description": "multi-region dataset built by lorkd-merge from "
        + ", ".join(f"{p.source.name} ({p.region})" for p in parts),
        "channel_names": channel_names,
        "labels": union,
        "numTraining": len(entries),
        "file_ending": file_ending,
    }
    if first.dataset_json.get("overwrite_image_reader_writer") is not None:
        dataset_json["overwrite_image_reader_writer"] = first.dataset_json["overwrite_image_reader_writer"]
    dataset_json["dataset"] = dict(sorted(entries.items()))
    dataset_json["lorkd"] = region_map.to_json()
    dataset_json["lorkd_merge"] = {
        "inputs": [
            {
                "dataset": str(p.source.folder),
                "region": p.region,
                "label_values": {label: [p.source.labels[label], union[label]] for label in p.label_names},
            }
            for p in parts
        ],
        "case_prefix": case_prefix,
        "num_folds": num_folds,
        "seed": seed,
    }

    # check the result the way training will read it
    try:
        check = RegionMap.from_dataset_json(dataset_json, source=f"{target.name}/dataset.json")
    except RegionMapError as e:
        raise MergeError(f"internal error, the lorkd section does not load: {e}") from None
    unassigned = sorted(set(entries) - set(check.case_regions))
    if unassigned:
        raise MergeError(
            f"cases {unassigned[:5]} are in no region; this is a bug in lorkd-merge, please report it"
        )

    return _write(
        target,
        dataset_json,
        jobs,
        splits,
        warnings,
        overwrite=overwrite,
        num_processes=num_processes,
    )


def _write(
    target: Path,
    dataset_json: dict,
    jobs: list[tuple[str, str, dict[int, int], str, str]],
    splits: list[dict[str, list[str]]],
    warnings: list[str],
    *,
    overwrite: bool,
    num_processes: int,
) -> MergeResult:
    """Build in a hidden folder next to ``target``, then rename it into place; on failure remove our files."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.lorkd-merge-{token}"
    backup = target.parent / f".{target.name}.lorkd-merge-old-{token}"
    preprocessed = _preprocessed_root()
    pre_dir = preprocessed / target.name if preprocessed is not None else None
    pre_tmp = pre_dir / f".splits_final.json.lorkd-merge-{token}" if pre_dir is not None else None
    created_pre_dir = False
    renamed = False
    try:
        tmp.mkdir()
        (tmp / "labelsTr").mkdir()
        _run_jobs([(src, str(tmp / rel), *rest) for src, rel, *rest in jobs], num_processes)
        write_json(tmp / "dataset.json", dataset_json)
        write_json(tmp / SPLITS_COPY_NAME, splits)
        if pre_dir is not None and pre_tmp is not None:
            created_pre_dir = not pre_dir.exists()
            if not created_pre_dir and any(p.name != "splits_final.json" for p in pre_dir.iterdir()):
                warnings.append(
                    f"{pre_dir} already holds preprocessed data, which may be from an earlier dataset; rerun "
                    "nnUNetv2_plan_and_preprocess before training"
                )
            pre_dir.mkdir(parents=True, exist_ok=True)
            write_json(pre_tmp, splits)
        if target.exists():
            if not overwrite:  # appeared while we were working
                raise MergeError(
                    f"{target} appeared while merging; run again (with --overwrite to replace it)"
                )
            target.rename(backup)
        tmp.rename(target)
        renamed = True
        if pre_dir is not None and pre_tmp is not None:
            os.replace(pre_tmp, pre_dir / "splits_final.json")
    except BaseException:
        if not renamed:
            shutil.rmtree(tmp, ignore_errors=True)
            if backup.exists() and not target.exists():
                backup.rename(target)
        if pre_tmp is not None and pre_tmp.exists():
            pre_tmp.unlink()
        if created_pre_dir and pre_dir is not None and pre_dir.is_dir() and not any(pre_dir.iterdir()):
            pre_dir.rmdir()
        raise
    if backup.exists():
        shutil.rmtree(backup, ignore_errors=True)

    splits_files = [target / SPLITS_COPY_NAME]
    if pre_dir is not None:
        splits_files.insert(0, pre_dir / "splits_final.json")
    return MergeResult(target, dataset_json, splits, splits_files, warnings, rewritten_labels=len(jobs))


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorkd-merge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Combine nnU-Net v2 raw datasets into one multi-region raw dataset for LoRKD: union label space, "
            "a\n'dataset' key pointing at the original images (nothing is copied), label files remapped "
            "where\nneeded, the 'lorkd' region section (region order = expert index) and region-stratified "
            "splits."
        ),
        epilog=(
            "examples:\n  one dataset per region:\n    lorkd-merge -i Dataset501_Abdomen abdomen -i 502 "
            "pelvis -d 600 -n LoRKDMerged\n  one dataset split into regions by label (each case appears once "
            "per region as <case>_<region>):\n    lorkd-merge -i 503 --region abdomen=liver,spleen --region "
            "pelvis=urinary_bladder,femur_left \\\n                -d 601 -n LoRKDSplit\n\ncase ids: kept; "
            "<case>_<region> for a dataset used for several regions; if ids would collide (or\nwith "
            "--case-prefix always) every id becomes <region>_<case>.\nneeds nnUNet_raw; with "
            "nnUNet_preprocessed set, splits_final.json is written there as well."
        ),
    )
    parser.add_argument(
        "-i",
        "--input",
        dest="inputs",
        action="append",
        nargs="+",
        required=True,
        metavar=("DATASET", "REGION[:LABELS]"),
        help="an input dataset (id, DatasetXXX_Name under $nnUNet_raw, or a folder) and its region name, "
        "optionally with a comma-separated subset of its labels (REGION:liver,spleen); repeat per region, in "
        "expert order. Without REGION, the dataset is split by the --region options",
    )
    parser.add_argument(
        "--region",
        dest="regions",
        action="append",
        default=[],
        metavar="REGION=LABEL[,LABEL...]",
        help="split the one input given without a region: a region and the labels of that dataset it covers; "
        "repeat per region (in expert order)",
    )
    parser.add_argument(
        "-d", "--dataset-id", type=int, required=True, help="id of the merged dataset (1..999)"
    )
    parser.add_argument("-n", "--name", required=True, help="name of the merged dataset: DatasetXXX_NAME")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME (same id and name)"
    )
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default: 5)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the split shuffle (default: 12345)")
    parser.add_argument(
        "--case-prefix",
        choices=("auto", "always"),
        default="auto",
        help="auto: prefix case ids with '<region>_' only if ids would collide; always: prefix every case id "
        "(default: auto)",
    )
    parser.add_argument(
        "-np",
        "--num-processes",
        type=int,
        default=int(os.environ.get("nnUNet_def_n_proc", 8)),  # noqa: SIM112 (nnU-Net's name)
        help="processes for rewriting label files (default: $nnUNet_def_n_proc or 8, like nnU-Net)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lorkd-merge``; returns 0 on success and 2 on a usage or input error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        specs = _specs_from_args(args.inputs, args.regions)
        result = merge_datasets(
            specs,
            args.dataset_id,
            args.name,
            overwrite=args.overwrite,
            num_folds=args.folds,
            seed=args.seed,
            case_prefix=args.case_prefix,
            num_processes=args.num_processes,
        )
    except MergeError as e:
        print(f"lorkd-merge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: nothing was left behind, but it is not a usage error
        print(f"lorkd-merge: error: {e}", file=sys.stderr)
        return 1

    dj = result.dataset_json
    region_map = RegionMap.from_dataset_json(dj)
    print(
        f"wrote {result.folder} ({dj['numTraining']} cases, {result.rewritten_labels} label files remapped)"
    )
    for i, region in enumerate(region_map.regions):
        labels = ", ".join(f"{n}={v}" for n, v in zip(region.label_names, region.label_values, strict=True))
        print(f"  expert {i}: {region.name}: {len(region_map.cases_of(i))} cases, labels {labels}")
    for path in result.splits_files:
        print(f"splits ({len(result.splits)} folds): {path}")
    if _preprocessed_root() is None:
        print(
            f"nnUNet_preprocessed is not set: copy {result.folder / SPLITS_COPY_NAME} to "
            f"$nnUNet_preprocessed/{result.folder.name}/splits_final.json before training"
        )
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres --verify_dataset_integrity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
