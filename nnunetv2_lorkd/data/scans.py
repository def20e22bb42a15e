"""The regions of the real multi-region benchmark: which scan, which crop, which labels, which slab pattern.

- abdomen: TotalSegmentator's example CT (3 mm), slices z 60-111, with its `total` fast predictions.
- pelvis: the same CT, slices z 0-58 (z 59 belongs to neither region), with its `total` fast predictions.
- cardiovascular: TotalSegmentator's aorta-report CT angiography (1.5 mm) inside the aorta crop box: heart,
  pulmonary artery, aorta and arch vessels (TotalSegmentator predictions).
- thorax: 3D Slicer's CTChest (slicerio; 3.05 x 3.05 x 10 mm): lungs, ribs, spine (a rough hand-made or
  semi-automatic Slicer segmentation).
- brain (optional): Colin27 T1 (mricron-data, 1 mm) with the AAL atlas regrouped into 11 structures.

The two thorax scans have disjoint label sets (the CTA has no lung labels, the chest CT no heart label), and
every case of a LoRKD region must be annotated for all of its region's classes (inside a region, an
unlabelled organ would be taught as background), so they are two regions: ``cardiovascular`` and ``thorax``.

Slab layouts are given in mm along z (inferior -> superior); they are chosen so that each listed structure
reaches both the training and the test slabs (a class that does not is dropped by the builder, with a
message). Every layout separates test from training slabs by a gap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .sources import MRICRON, SLICERIO, TOTALSEGMENTATOR, Archive, SourceError
from .volumes import LabelledVolume, VolumeError, crop_index, onto_grid, read_lps, same_grid

TS_LABELS_NOTE = (
    "TotalSegmentator labels are that model's predictions (TotalSegmentator 2.18.0's regression-test reference "
    "outputs for its example scans), not manual annotations: scores against them measure agreement with "
    "TotalSegmentator."
)
SLICER_LABELS_NOTE = (
    "3D Slicer CTChest labels: a rough, 'in progress' segmentation made by hand or semi-automatically in Slicer "
    "(slicerio sample data), not a curated reference."
)
AAL_LABELS_NOTE = (
    "Brain labels: the AAL atlas, drawn on this very brain (Colin27), regrouped into 11 structures; one averaged "
    "MRI of one person."
)
HU_RANGE = (-1024.0, 3071.0)  # CT clipped to this (removes the -3024 outside-the-field-of-view fill value)

Pattern = tuple[tuple[str, float], ...]
REST = 1000.0  # a last run this long takes whatever is left of the volume
# Layouts in mm along z, from the region's lowest slice up. They were set by hand from the z extents of the
# labels (at 3 mm) so that every class lies in both splits, e.g. the abdomen's test slab crosses the
# gallbladder, pancreas and portal vein, which span only 12-19 slices; gaps are one slice (3 mm; 10 mm on the
# chest CT) or more.
ABDOMEN_LAYOUT: Pattern = (("train", 87), ("gap", 3), ("test", 24), ("gap", 3), ("train", 24), ("gap", 3),
                           ("test", REST))  # fmt: skip
PELVIS_LAYOUT: Pattern = (("test", 9), ("gap", 3), ("train", 66), ("gap", 3), ("test", 24), ("gap", 3),
                          ("train", REST))  # fmt: skip
CARDIO_LAYOUT: Pattern = (("train", 72), ("gap", 3), ("test", 30), ("gap", 3), ("train", 45), ("gap", 3),
                          ("test", 24), ("gap", 3), ("train", 27), ("gap", 3), ("test", 15), ("gap", 3),
                          ("train", REST))  # fmt: skip
THORAX_LAYOUT: Pattern = (("train", 70), ("gap", 10), ("test", 40), ("gap", 10), ("train", 70), ("gap", 10),
                          ("test", 40), ("gap", 10), ("train", REST))  # fmt: skip
BRAIN_LAYOUT: Pattern = (("test", 15), ("gap", 3), ("train", 48), ("gap", 3), ("test", 12), ("gap", 3),
                         ("train", 54), ("gap", 3), ("test", 18), ("gap", 3), ("train", REST))  # fmt: skip


@dataclass(frozen=True)
class RegionSpec:
    """One region of the benchmark and how to cut it out of its source."""

    name: str
    modality: str  # "CT" or "MR"
    archive: Archive
    load: Callable[[Mapping[str, Path]], LabelledVolume]
    pattern: Pattern
    labels_note: str
    source: str  # one line for reports: scan and file names
    optional: bool = False


# --------------------------------------------------------------------------------------------- helpers
def _class_map(files: Mapping[str, Path]) -> dict[int, str]:
    from nnunetv2_lorkd.classification.organmnist import read_class_map

    return read_class_map(files["map_to_binary.py"])


def _volume(scan_id: str, image: sitk.Image, labels: np.ndarray, names: tuple[str, ...], ct: bool) -> LabelledVolume:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if ct:
        array = np.clip(array, *HU_RANGE)
    return LabelledVolume(
        scan_id,
        array,
        labels.astype(np.uint8),
        names,
        tuple(float(s) for s in image.GetSpacing()),
        tuple(float(o) for o in image.GetOrigin()),
        tuple(float(d) for d in image.GetDirection()),
    )


def _ts_example(files: Mapping[str, Path], classes: tuple[str, ...], z0: int, z1: int) -> LabelledVolume:
    """TotalSegmentator's example CT, slices [z0, z1), labels `classes` from the fast 'force split' map."""
    image = read_lps(str(files["example_ct.nii.gz"]))
    seg = read_lps(str(files["example_seg_fast_force_split.nii.gz"]), sitk.sitkUInt8)
    if not same_grid(image, seg):
        raise VolumeError("example_seg_fast_force_split.nii.gz is not on the grid of example_ct.nii.gz")
    ids = {name: value for value, name in _class_map(files).items()}
    unknown = [c for c in classes if c not in ids]
    if unknown:
        raise SourceError(f"TotalSegmentator class_map['total'] has no class(es) {unknown}")
    size = image.GetSize()
    image = crop_index(image, (0, 0, z0), (size[0], size[1], z1 - z0))
    seg_array = sitk.GetArrayFromImage(crop_index(seg, (0, 0, z0), (size[0], size[1], z1 - z0)))
    labels = np.zeros(seg_array.shape, np.uint8)
    for index, name in enumerate(classes, start=1):
        labels[seg_array == ids[name]] = index
    return _volume("ts_example_ct", image, labels, classes, ct=True)


ABDOMEN_CLASSES = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "pancreas",
    "gallbladder",
    "duodenum",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
)
PELVIS_CLASSES = (
    "urinary_bladder",
    "prostate",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
    "sacrum",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "iliopsoas_left",
    "iliopsoas_right",
)
# the example CT has 112 slices (3 mm); pelvis below, abdomen above, one slice between them belongs to neither
PELVIS_Z = (0, 59)
ABDOMEN_Z = (60, 112)


def load_abdomen(files: Mapping[str, Path]) -> LabelledVolume:
    return _ts_example(files, ABDOMEN_CLASSES, *ABDOMEN_Z)


def load_pelvis(files: Mapping[str, Path]) -> LabelledVolume:
    return _ts_example(files, PELVIS_CLASSES, *PELVIS_Z)


# later entries win where masks overlap (the vessels are drawn over the heart)
CARDIO_MASKS = (
    ("heart", "pulmonary_report/heart.nii.gz"),
    ("pulmonary_artery", "pulmonary_report/pulmonary_artery.nii.gz"),
    ("aorta", "aorta_report/aorta.nii.gz"),
    ("brachiocephalic_trunk", "aorta_report/brachiocephalic_trunk.nii.gz"),
    ("subclavian_artery_left", "aorta_report/subclavian_artery_left.nii.gz"),
    ("common_carotid_artery_left", "aorta_report/common_carotid_artery_left.nii.gz"),
)


def load_cardiovascular(files: Mapping[str, Path]) -> LabelledVolume:
    """The CTA inside TotalSegmentator's aorta crop box, with the heart mask (full grid) and the masks of the
    two crops (aorta crop, pulmonary crop) carried back onto it by world position.

    The crops are whole-voxel shifts of the full scan; to make sure the masks land where they were drawn, each
    crop's CT must equal the full CT at the mapped position (mean |difference| below 2 HU; the crops were
    written after a resampling step, so values differ by rounding only).
    """
    full = read_lps(str(files["aorta_report/example_ct.nii.gz"]))
    box = read_lps(str(files["aorta_report/ct_cropped.nii.gz"]))
    start = full.TransformPhysicalPointToIndex(box.GetOrigin())
    reference = crop_index(full, start, box.GetSize())
    for crop_name in ("aorta_report/ct_cropped.nii.gz", "pulmonary_report/ct_cropped.nii.gz"):
        crop = read_lps(str(files[crop_name]))
        crop_start = full.TransformPhysicalPointToIndex(crop.GetOrigin())
        same_place = crop_index(full, crop_start, crop.GetSize())
        diff = np.abs(sitk.GetArrayViewFromImage(same_place) - sitk.GetArrayViewFromImage(crop)).mean()
        if not diff < 2.0:
            raise VolumeError(f"{crop_name} does not match the full CTA at its position (mean |diff| {diff:.1f} HU)")
    labels = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    names = tuple(name for name, _ in CARDIO_MASKS)
    for index, (_name, key) in enumerate(CARDIO_MASKS, start=1):
        mask = read_lps(str(files[key]), sitk.sitkUInt8)
        labels[onto_grid(mask, reference, key) > 0] = index
    return _volume("ts_aorta_cta", reference, labels, names, ct=True)


CHEST_SEGMENTS = {  # Slicer segment name -> our class name
    "ribs": "ribs",
    "cervical vertebral column": "cervical_spine",
    "thoracic vertebral column": "thoracic_spine",
    "lumbar vertebral column": "lumbar_spine",
    "right lung": "lung_right",
    "left lung": "lung_left",
}  # the 7th segment, "tissue" (all other soft tissue), is left as background


def load_thorax(files: Mapping[str, Path]) -> LabelledVolume:
    image = read_lps(str(files["CTChest4.nrrd"]))
    seg = read_lps(str(files["Segmentation.seg.nrrd"]), sitk.sitkUInt8)
    if not same_grid(image, seg):
        raise VolumeError("Segmentation.seg.nrrd is not on the grid of CTChest4.nrrd")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(files["Segmentation.seg.nrrd"]))
    reader.ReadImageInformation()
    segments: dict[str, int] = {}
    i = 0
    while reader.HasMetaDataKey(f"Segment{i}_Name"):
        segments[reader.GetMetaData(f"Segment{i}_Name")] = int(reader.GetMetaData(f"Segment{i}_LabelValue"))
        i += 1
    missing = [s for s in CHEST_SEGMENTS if s not in segments]
    if missing:
        raise SourceError(f"Segmentation.seg.nrrd has no segment(s) {missing}; found {sorted(segments)}")
    seg_array = sitk.GetArrayFromImage(seg)
    labels = np.zeros(seg_array.shape, np.uint8)
    for index, name in enumerate(CHEST_SEGMENTS, start=1):
        labels[seg_array == segments[name]] = index
    return _volume("slicer_ctchest", image, labels, tuple(CHEST_SEGMENTS.values()), ct=True)


BRAIN_GROUPS = (  # our class -> AAL codes [lo, hi] (AAL's code ranges group its 116 regions by lobe)
    ("frontal_lobe", (2000, 2999)),
    ("insula_cingulate", (3000, 4099)),
    ("hippocampus_amygdala", (4100, 4299)),  # with the parahippocampal gyrus
    ("occipital_lobe", (5000, 5999)),
    ("parietal_lobe", (6000, 6999)),
    ("caudate", (7000, 7009)),
    ("lentiform_nucleus", (7010, 7029)),  # putamen + pallidum
    ("thalamus", (7100, 7199)),
    ("temporal_lobe", (8000, 8999)),
    ("cerebellum", (9000, 9099)),
    ("vermis", (9100, 9199)),
)


def load_brain(files: Mapping[str, Path]) -> LabelledVolume:
    image = read_lps(str(files["ch2.nii.gz"]))
    atlas = read_lps(str(files["aal.nii.gz"]), sitk.sitkUInt8)
    if not same_grid(image, atlas):
        raise VolumeError("aal.nii.gz is not on the grid of ch2.nii.gz")
    codes: dict[int, int] = {}
    for line in Path(files["aal.nii.txt"]).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            codes[int(parts[0])] = int(parts[2])
    atlas_array = sitk.GetArrayFromImage(atlas)
    labels = np.zeros(atlas_array.shape, np.uint8)
    for index, (_, (lo, hi)) in enumerate(BRAIN_GROUPS, start=1):
        for value, code in codes.items():
            if lo <= code <= hi:
                labels[atlas_array == value] = index
    grouped = {v for v, c in codes.items() if any(lo <= c <= hi for _, (lo, hi) in BRAIN_GROUPS)}
    if grouped != set(codes):
        raise SourceError(f"AAL regions {sorted(set(codes) - grouped)} fall in no brain group")
    return _volume("colin27", image, labels, tuple(n for n, _ in BRAIN_GROUPS), ct=False)


REGIONS: dict[str, RegionSpec] = {
    "abdomen": RegionSpec(
        "abdomen",
        "CT",
        TOTALSEGMENTATOR.subset(["example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "map_to_binary.py"]),
        load_abdomen,
        ABDOMEN_LAYOUT,
        TS_LABELS_NOTE,
        "TotalSegmentator 2.18.0 example_ct.nii.gz (native CT, 3 mm) slices z 60-111 + "
        "example_seg_fast_force_split.nii.gz",
    ),
    "pelvis": RegionSpec(
        "pelvis",
        "CT",
        TOTALSEGMENTATOR.subset(["example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "map_to_binary.py"]),
        load_pelvis,
        PELVIS_LAYOUT,
        TS_LABELS_NOTE,
        "TotalSegmentator 2.18.0 example_ct.nii.gz (native CT, 3 mm) slices z 0-58 + "
        "example_seg_fast_force_split.nii.gz",
    ),
    "cardiovascular": RegionSpec(
        "cardiovascular",
        "CT",
        TOTALSEGMENTATOR.subset(
            ["aorta_report/example_ct.nii.gz", "aorta_report/ct_cropped.nii.gz", "pulmonary_report/ct_cropped.nii.gz"]
            + [key for _, key in CARDIO_MASKS]
        ),
        load_cardiovascular,
        CARDIO_LAYOUT,
        TS_LABELS_NOTE,
        "TotalSegmentator 2.18.0 aorta_report/example_ct.nii.gz (CT angiography, 1.5 mm), aorta crop box, with "
        "pulmonary_report heart/pulmonary_artery and aorta_report aorta/arch-vessel masks",
    ),
    "thorax": RegionSpec(
        "thorax",
        "CT",
        SLICERIO,
        load_thorax,
        THORAX_LAYOUT,
        SLICER_LABELS_NOTE,
        "slicerio 1.4.0 CTChest4.nrrd (3D Slicer CTChest, 4x downsampled: 3.05 x 3.05 x 10 mm) + Segmentation.seg.nrrd",
    ),
    "brain": RegionSpec(
        "brain",
        "MR",
        MRICRON,
        load_brain,
        BRAIN_LAYOUT,
        AAL_LABELS_NOTE,
        "mricron-data ch2.nii.gz (Colin27 T1, 1 mm) + aal.nii.gz (AAL atlas on the same grid)",
        optional=True,
    ),
}
DEFAULT_REGIONS = ("abdomen", "pelvis", "cardiovascular", "thorax")
