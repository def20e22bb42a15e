"""Labelled volumes: reading, orienting, cropping and resampling an image together with its label map.

All volumes are kept in SimpleITK's LPS orientation (array axes z, y, x with z running inferior -> superior),
so "slabs along z" means the same thing for every scan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk


class VolumeError(ValueError):
    """Two volumes that should share a grid do not, or a resampling request cannot be met."""


@dataclass(frozen=True)
class LabelledVolume:
    """One scan (or a crop of it) with its label map on the same grid.

    ``labels`` holds 0 (background) and 1..K for ``class_names[0..K-1]``. ``scan_id`` names the physical
    scan, so parts of different regions cut from one scan can be checked for overlap.
    """

    scan_id: str
    image: np.ndarray  # (z, y, x) float32
    labels: np.ndarray  # (z, y, x) uint8
    class_names: tuple[str, ...]
    spacing: tuple[float, float, float]  # (x, y, z) mm, SimpleITK order
    origin: tuple[float, float, float]  # physical position of voxel (0, 0, 0), LPS mm
    direction: tuple[float, ...]  # 9 values, LPS: identity after orienting

    def __post_init__(self) -> None:
        if self.image.shape != self.labels.shape:
            raise VolumeError(f"{self.scan_id}: image {self.image.shape} and labels {self.labels.shape} differ")
        if self.labels.size and int(self.labels.max()) > len(self.class_names):
            raise VolumeError(f"{self.scan_id}: label value {int(self.labels.max())} has no class name")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def z_extent_mm(self, z0: int = 0, z1: int | None = None) -> tuple[float, float]:
        """Physical [bottom, top] (mm, along superior) covered by slices z0..z1-1, voxel edges included."""
        z1 = self.shape[0] if z1 is None else z1
        sz = self.spacing[2]
        return (self.origin[2] + (z0 - 0.5) * sz, self.origin[2] + (z1 - 0.5) * sz)

    def slab(self, z0: int, z1: int) -> LabelledVolume:
        """Slices z0..z1-1 as a volume of their own (the origin moves up with z0)."""
        origin = (self.origin[0], self.origin[1], self.origin[2] + z0 * self.spacing[2])
        return replace(self, image=self.image[z0:z1].copy(), labels=self.labels[z0:z1].copy(), origin=origin)

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        image = sitk.GetImageFromArray(self.image.astype(np.float32))
        labels = sitk.GetImageFromArray(self.labels.astype(np.uint8))
        for item in (image, labels):
            item.SetSpacing(self.spacing)
            item.SetOrigin(self.origin)
            item.SetDirection(self.direction)
        return image, labels


def read_lps(path: str, pixel: int = sitk.sitkFloat32) -> sitk.Image:
    """A NIfTI/NRRD file as a SimpleITK image reoriented to LPS (array z, y, x; z inferior -> superior)."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(path), pixel), "LPS")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction, np.eye(3), atol=1e-4):
        raise VolumeError(f"{path}: the image axes are oblique ({direction.round(3).tolist()}); not supported")
    return image


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def onto_grid(mask: sitk.Image, reference: sitk.Image, what: str) -> np.ndarray:
    """A label image carried onto `reference`'s grid by world position (nearest neighbour, no interpolation).

    Used for TotalSegmentator's cropped masks: their grid is the full scan's grid shifted by whole voxels, so
    nearest-neighbour lookup is an exact copy. Anything else (other spacing, a shift of a fraction of a voxel,
    labels falling outside the reference) is refused.
    """
    if not np.allclose(mask.GetSpacing(), reference.GetSpacing(), atol=1e-3) or not np.allclose(
        mask.GetDirection(), reference.GetDirection(), atol=1e-4
    ):
        raise VolumeError(f"{what}: its spacing/direction differ from the reference grid; resample it first")
    shift = (np.array(mask.GetOrigin()) - np.array(reference.GetOrigin())) / np.array(reference.GetSpacing())
    if not np.allclose(shift, np.round(shift), atol=1e-3):
        raise VolumeError(f"{what}: its grid is shifted by {shift.round(3).tolist()} voxels, not whole voxels")
    mapped = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
    before = int((sitk.GetArrayViewFromImage(mask) > 0).sum())
    after = int((sitk.GetArrayViewFromImage(mapped) > 0).sum())
    if after != before:
        raise VolumeError(f"{what}: {before - after} of its {before} labelled voxels fall outside the reference grid")
    return sitk.GetArrayFromImage(mapped)


def crop_index(image: sitk.Image, start_xyz: tuple[int, int, int], size_xyz: tuple[int, int, int]) -> sitk.Image:
    """The sub-image [start, start + size) (x, y, z index order), geometry kept."""
    if any(s < 0 or s + n > full for s, n, full in zip(start_xyz, size_xyz, image.GetSize(), strict=True)):
        raise VolumeError(f"crop {start_xyz}+{size_xyz} leaves the image of size {image.GetSize()}")
    return sitk.RegionOfInterest(image, [int(n) for n in size_xyz], [int(s) for s in start_xyz])


def target_spacing(spacing: tuple[float, ...], coarsest: float) -> tuple[float, ...]:
    """Axes finer than `coarsest` mm are brought to it; coarser axes stay (we never upsample). 0 = native."""
    if coarsest <= 0:
        return tuple(spacing)
    return tuple(max(float(s), coarsest) for s in spacing)


def _block_factors(old: tuple[float, ...], new: tuple[float, ...]) -> tuple[int, ...] | None:
    factors = [n / o for o, n in zip(old, new, strict=True)]
    if all(abs(f - round(f)) < 1e-3 * f for f in factors):
        return tuple(round(f) for f in factors)
    return None


def resample(volume: LabelledVolume, coarsest: float) -> LabelledVolume:
    """Bring the volume to :func:`target_spacing`.

    Integer factors (1.5 -> 3 mm, 1 -> 3 mm): every new voxel is the mean of its block of source voxels and
    its label is the most frequent label in the block (ties: the lower label value); the block grid starts at
    the first source voxel and a remainder of fewer than `factor` slices at the far edge is dropped.
    Other factors: linear interpolation of the image and of each class's indicator, label = argmax
    (background wins only where it is the largest), as nnU-Net resamples segmentations.
    """
    new_spacing = target_spacing(volume.spacing, coarsest)
    if np.allclose(new_spacing, volume.spacing):
        return volume
    factors = _block_factors(volume.spacing, new_spacing)
    old_origin = np.array(volume.origin)
    old_spacing = np.array(volume.spacing)
    if factors is not None:
        fx, fy, fz = factors
        z, y, x = (s // f * f for s, f in zip(volume.shape, (fz, fy, fx), strict=True))
        if min(z, y, x) == 0:
            raise VolumeError(f"{volume.scan_id}: {volume.shape} is smaller than one {factors} block")
        blocks = (z // fz, fz, y // fy, fy, x // fx, fx)
        image = volume.image[:z, :y, :x].reshape(blocks).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
        num = len(volume.class_names) + 1
        onehot = np.zeros((num, z // fz, y // fy, x // fx), dtype=np.int32)
        cut = volume.labels[:z, :y, :x].reshape(blocks)
        for value in range(num):
            onehot[value] = (cut == value).sum(axis=(1, 3, 5))
        labels = onehot.argmax(0).astype(np.uint8)
        # the centre of block 0 sits (f - 1) / 2 source voxels past the first source voxel
        origin = old_origin + (np.array(factors) - 1) / 2 * old_spacing
        return LabelledVolume(
            volume.scan_id,
            image,
            labels,
            volume.class_names,
            tuple(float(s) for s in new_spacing),
            tuple(float(o) for o in origin),
            volume.direction,
        )
    image, label_image = volume.to_sitk()
    extent = np.array(volume.shape[::-1]) * old_spacing
    new_size = [max(1, round(e / s)) for e, s in zip(extent, new_spacing, strict=True)]
    origin = old_origin - old_spacing / 2 + np.array(new_spacing) / 2
    reference = sitk.Image(new_size, sitk.sitkFloat32)
    reference.SetSpacing(new_spacing)
    reference.SetOrigin(tuple(origin))
    reference.SetDirection(volume.direction)
    moved = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, float(volume.image.min()))
    scores = []
    for value in range(len(volume.class_names) + 1):
        indicator = sitk.Cast(label_image == value, sitk.sitkFloat32)
        scores.append(
            sitk.GetArrayFromImage(sitk.Resample(indicator, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
        )
    labels = np.stack(scores).argmax(0).astype(np.uint8)
    return LabelledVolume(
        volume.scan_id,
        sitk.GetArrayFromImage(moved),
        labels,
        volume.class_names,
        tuple(float(s) for s in new_spacing),
        tuple(float(o) for o in origin),
        volume.direction,
    )
