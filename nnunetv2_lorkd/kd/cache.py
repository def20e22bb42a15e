"""The teacher's soft labels, computed once per preprocessed case and stored compactly.

Layout (a sibling of nnU-Net's data folder, which must hold nothing but nnU-Net's own files)::

    $nnUNet_preprocessed/DatasetXXX_NAME/lorkd_kd_cache/<plans>_<configuration>/   (= the data identifier)
        manifest.json        teacher identity, dtype, per-case region/classes/shape/source-data fingerprint
        <case>.b2nd          (K_region, *case shape) teacher probabilities, uint8 (p * 255) or float16

Each case holds only its region's classes, in the layout's order (ascending label value). The probabilities
come from a Gaussian-weighted sliding window over the whole preprocessed case with the configuration's patch
size (2D configurations: slice by slice), so the training loader can crop any patch from them and augment it
together with the image.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2, nnUNetDatasetNumpy

from nnunetv2_lorkd.files import atomic_path, write_json
from nnunetv2_lorkd.kd.config import TeacherRef
from nnunetv2_lorkd.kd.layout import RegionClassLayout
from nnunetv2_lorkd.kd.teacher_inference import _inference, check_probabilities
from nnunetv2_lorkd.teachers import Teacher

CACHE_ROOT = "lorkd_kd_cache"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DTYPES = ("uint8", "float16")
# quantisation error bound of a stored probability, per dtype (uint8: rounding to 1/255; float16: 11-bit mantissa)
QUANTISATION_ERROR = {"uint8": 0.5 / 255, "float16": 2.0**-11}


class KDCacheError(RuntimeError):
    """The soft-label cache is missing, incomplete or stale."""


def cache_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder, CACHE_ROOT, data_identifier)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_identity(ref: TeacherRef) -> dict:
    """What makes two teachers the same for the cache: where they come from and their exact weights."""
    path = ref.checkpoint_path
    if not os.path.isfile(path):
        raise KDCacheError(f"teacher checkpoint {path} does not exist")
    return {
        "model_folder": os.path.abspath(ref.model_folder),
        "fold": ref.fold,
        "checkpoint": ref.checkpoint,
        "checkpoint_sha256": sha256_of(path),
    }


def source_file(preprocessed_folder: str, case: str) -> str:
    """The preprocessed image file of a case (blosc2 or numpy dataset)."""
    for ending in (".b2nd", ".npz"):
        path = os.path.join(preprocessed_folder, case + ending)
        if os.path.isfile(path):
            return path
    raise KDCacheError(f"no preprocessed data for case '{case}' in {preprocessed_folder}")


def file_fingerprint(path: str) -> dict:
    stat = os.stat(path)
    return {"name": os.path.basename(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def dataset_class_of(preprocessed_folder: str) -> type:
    names = os.listdir(preprocessed_folder)
    if any(n.endswith(".b2nd") for n in names):
        return nnUNetDatasetBlosc2
    if any(n.endswith(".npz") for n in names):
        return nnUNetDatasetNumpy
    raise KDCacheError(
        f"{preprocessed_folder} holds no preprocessed cases (.b2nd or .npz); run nnU-Net's preprocessing"
    )


# ------------------------------------------------------------------------------------------ sliding window
def sliding_window_probabilities(
    teacher: Teacher,
    image: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    patch_size: Sequence[int],
    step_size: float = 0.5,
    batch_size: int = 2,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """Teacher probabilities (K, *spatial) over a whole preprocessed case (C, *spatial), float32 on the CPU.

    Tiles of ``patch_size`` overlap by ``1 - step_size`` and are blended with nnU-Net's Gaussian weights. A 2D
    patch size on a 3D case runs the teacher slice by slice.
    """
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    spatial = tuple(x.shape[1:])
    two_d = len(patch_size) == len(spatial) - 1
    if not two_d and len(patch_size) != len(spatial):
        raise ValueError(f"patch size {tuple(patch_size)} does not fit a case of spatial shape {spatial}")
    tile = (1, *patch_size) if two_d else tuple(int(p) for p in patch_size)
    padded, slicer = pad_nd_image(x, tile, "constant", {"value": 0}, True)
    steps = compute_steps_for_sliding_window(tuple(padded.shape[1:]), tile, step_size)
    gaussian = compute_gaussian(
        tuple(int(p) for p in patch_size),
        sigma_scale=1.0 / 8,
        value_scaling_factor=10,
        dtype=torch.float32,
        device=device,
    )
    if two_d:
        gaussian = gaussian[None]
    k = len(class_names)
    numel = int(np.prod(padded.shape[1:]))
    # accumulate on the GPU when the accumulators take under 4 GiB, else on the CPU (and say so)
    acc_device = device if device.type != "cuda" or 4 * numel * (k + 1) < 4 * 1024**3 else torch.device("cpu")
    if acc_device != device:
        print(f"  (case of {numel:,} voxels x {k} classes: sliding-window sums kept on the CPU, not on {device})")
    acc = torch.zeros((k, *padded.shape[1:]), dtype=torch.float32, device=acc_device)
    weight = torch.zeros(tuple(padded.shape[1:]), dtype=torch.float32, device=acc_device)
    g = gaussian.to(acc_device)
    tiles = [tuple(slice(s, s + t) for s, t in zip(starts, tile, strict=True)) for starts in itertools.product(*steps)]
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first : first + batch_size]
        batch = torch.stack([padded[(slice(None), *sl)] for sl in chunk]).to(device)
        if two_d:
            batch = batch[:, :, 0]
        with _inference(device):
            probs = teacher.probabilities(batch, list(class_names))
        expected = (len(chunk), k, *batch.shape[2:])
        if tuple(probs.shape) != expected:
            raise ValueError(f"teacher returned shape {tuple(probs.shape)} for a tile batch; expected {expected}")
        probs = probs.float().to(acc_device)
        if two_d:
            probs = probs[:, :, None]
        for p, sl in zip(probs, chunk, strict=True):
            acc[(slice(None), *sl)] += p * g
            weight[sl] += g
    out = (acc / weight)[(slice(None), *slicer[1:])]
    return out.clamp_(0.0, 1.0).cpu()


# ------------------------------------------------------------------------------------------ storage
def encode(probs: torch.Tensor, dtype: str) -> np.ndarray:
    arr = probs.numpy()
    if dtype == "uint8":
        return np.rint(arr * 255.0).astype(np.uint8)
    if dtype == "float16":
        return arr.astype(np.float16)
    raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")


def decode(arr: np.ndarray) -> np.ndarray:
    """Stored soft labels -> float32 probabilities."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)
    return arr.astype(np.float32)


def write_case_file(folder: str, case: str, encoded: np.ndarray, patch_size: Sequence[int]) -> str:
    """One case's soft labels as blosc2, chunked for patch-sized reads; written to a temp name, then renamed."""
    if encoded.ndim != 4:
        raise ValueError(f"soft labels must be (K, z, y, x) like nnU-Net's preprocessed cases, got {encoded.shape}")
    blocks, chunks = comp_blosc2_params(encoded.shape, tuple(patch_size), bytes_per_pixel=encoded.itemsize)
    final = os.path.join(folder, case + ".b2nd")
    with atomic_path(final, suffix=".b2nd") as tmp:
        tmp.unlink()  # blosc2 creates the file itself
        blosc2.asarray(
            np.ascontiguousarray(encoded),
            urlpath=str(tmp),
            chunks=chunks,
            blocks=blocks,
            cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 2},
        )
    return final


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    write_json(os.path.join(folder, MANIFEST), manifest)


@dataclass(frozen=True)
class CaseJob:
    case: str
    region: int
    class_names: tuple[str, ...]
    source: str


def _case_entry(job: CaseJob, region_name: str, shape: Sequence[int]) -> dict:
    return {
        "region": region_name,
        "classes": list(job.class_names),
        "shape": [int(s) for s in shape],
        "source": file_fingerprint(job.source),
    }


def _entry_is_fresh(entry: Mapping | None, job: CaseJob, region_name: str, folder: str) -> bool:
    return (
        entry is not None
        and entry.get("region") == region_name
        and entry.get("classes") == list(job.class_names)
        and entry.get("source") == file_fingerprint(job.source)
        and os.path.isfile(os.path.join(folder, job.case + ".b2nd"))
    )


# ------------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class CacheSpec:
    """What the cache is computed with; every field is recorded in the manifest."""

    preprocessed_folder: str  # nnU-Net's data folder of the configuration
    folder: str  # the cache folder
    patch_size: tuple[int, ...]
    dtype: str = "uint8"
    step_size: float = 0.5
    batch_size: int = 2


def _compute_one(teacher: Teacher, spec: CacheSpec, job: CaseJob, device: torch.device) -> tuple[str, list[int], float]:
    start = time.perf_counter()
    dataset = dataset_class_of(spec.preprocessed_folder)(spec.preprocessed_folder, [job.case])
    data, _, _, _ = dataset.load_case(job.case)
    image = np.asarray(data[:], dtype=np.float32)
    probs = sliding_window_probabilities(
        teacher, image, job.class_names, spec.patch_size, spec.step_size, spec.batch_size, device
    )
    check_probabilities(probs, f"case {job.case}")
    write_case_file(spec.folder, job.case, encode(probs, spec.dtype), spec.patch_size)
    return job.case, list(image.shape[1:]), time.perf_counter() - start


_worker_state: dict = {}


def _worker_init(teacher_factory: Callable[[torch.device], Teacher], device: str, threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    _worker_state["device"] = torch.device(device)
    _worker_state["teacher"] = teacher_factory(_worker_state["device"])


def _worker_run(spec: CacheSpec, job: CaseJob) -> tuple[str, list[int], float]:
    return _compute_one(_worker_state["teacher"], spec, job, _worker_state["device"])


def build_cache(
    spec: CacheSpec,
    teacher_id: dict,
    teacher_exclusive: bool,
    jobs: Sequence[CaseJob],
    region_names: Sequence[str],
    teacher_factory: Callable[[torch.device], Teacher],
    device: torch.device,
    num_processes: int = 1,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Compute the soft labels of every job's case (skipping fresh ones unless ``overwrite``); returns the manifest.

    ``teacher_factory(device)`` loads the teacher; with ``num_processes > 1`` every worker process calls it once
    (so it must be picklable: a module-level function or a functools.partial of one).
    """
    os.makedirs(spec.folder, exist_ok=True)
    header = {
        "version": MANIFEST_VERSION,
        "teacher": teacher_id,
        "teacher_exclusive": bool(teacher_exclusive),
        "dtype": spec.dtype,
        "patch_size": list(spec.patch_size),
        "step_size": spec.step_size,
    }
    previous = read_manifest(spec.folder)
    keep_previous = previous is not None and not overwrite and all(previous.get(k) == v for k, v in header.items())
    manifest = {**header, "cases": dict(previous["cases"]) if keep_previous else {}}
    todo = [
        job
        for job in jobs
        if not _entry_is_fresh(manifest["cases"].get(job.case), job, region_names[job.region], spec.folder)
    ]
    log(f"KD cache {spec.folder}: {len(jobs) - len(todo)} of {len(jobs)} cases up to date, computing {len(todo)}")
    by_case = {job.case: job for job in todo}
    started = time.perf_counter()

    def record(case: str, shape: list[int], seconds: float, done: int) -> None:
        job = by_case[case]
        manifest["cases"][case] = _case_entry(job, region_names[job.region], shape)
        write_manifest(spec.folder, manifest)
        elapsed = time.perf_counter() - started
        left = elapsed / done * (len(todo) - done)
        log(f"  [{done}/{len(todo)}] {case} ({region_names[job.region]}, {len(job.class_names)} classes, "
            f"shape {shape}): {seconds:.1f} s, about {left:.0f} s left")  # fmt: skip

    if num_processes <= 1 or len(todo) <= 1:
        teacher = teacher_factory(device) if todo else None
        for done, job in enumerate(todo, 1):
            record(*_compute_one(teacher, spec, job, device), done)  # type: ignore[arg-type]
    else:
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            num_processes,
            mp_context=context,
            initializer=_worker_init,
            initargs=(teacher_factory, str(device), threads),
        ) as pool:
            futures = [pool.submit(_worker_run, spec, job) for job in todo]
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                record(*future.result(), done)
    wanted = {job.case for job in jobs}
    stale = [c for c in manifest["cases"] if c not in wanted]
    for case in stale:  # cases no longer in the preprocessed data
        del manifest["cases"][case]
        path = os.path.join(spec.folder, case + ".b2nd")
        if os.path.isfile(path):
            os.remove(path)
    write_manifest(spec.folder, manifest)
    return manifest


# ------------------------------------------------------------------------------------------ checking
def verify_cache(
    folder: str,
    teacher_id: dict,
    layout: RegionClassLayout,
    case_regions: Mapping[str, int],
    preprocessed_folder: str,
    fix_command: str,
) -> dict:
    """Raise one KDCacheError naming what is missing or stale (and the command that fixes it); else the manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise KDCacheError(f"KD mode is 'cached' but there is no soft-label cache in {folder}. Run `{fix_command}`.")
    if manifest.get("teacher") != teacher_id:
        raise KDCacheError(
            f"the soft-label cache in {folder} was computed with another teacher ({manifest.get('teacher')}) than "
            f"the one lorkd_kd.json names ({teacher_id}). Run `{fix_command}`."
        )
    problems = []
    for case, region in sorted(case_regions.items()):
        entry = manifest["cases"].get(case)
        names = list(layout.class_names[region])
        if entry is None or not os.path.isfile(os.path.join(folder, case + ".b2nd")):
            problems.append(f"{case}: missing")
        elif entry.get("classes") != names or entry.get("region") != layout.region_names[region]:
            problems.append(f"{case}: computed for {entry.get('region')} {entry.get('classes')}, needs {names}")
        elif entry.get("source") != file_fingerprint(source_file(preprocessed_folder, case)):
            problems.append(f"{case}: the preprocessed data changed after the cache was computed")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise KDCacheError(f"the soft-label cache in {folder} is stale or incomplete ({shown}). Run `{fix_command}`.")
    return manifest


class SoftLabelCache:
    """Reads patches of cached soft labels; holds only paths, so data-augmentation workers can pickle it."""

    def __init__(self, folder: str):
        self.folder = folder
        self._mmap = {} if os.name == "nt" else {"mmap_mode": "r"}

    def open(self, case: str) -> blosc2.NDArray:
        return blosc2.open(
            urlpath=os.path.join(self.folder, case + ".b2nd"), mode="r", dparams={"nthreads": 1}, **self._mmap
        )

    def crop(self, case: str, bbox: Sequence[Sequence[int]]) -> torch.Tensor:
        """(K_region, *bbox size) float32 probabilities; outside the case they are 0 (background)."""
        patch = crop_and_pad_nd(self.open(case), [list(b) for b in bbox], 0)
        return torch.from_numpy(decode(np.asarray(patch)))
