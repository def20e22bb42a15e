"""The soft-label cache: sliding window, round trip through the training loader against the online teacher,
augmentation together with the patch (spatial only), and the staleness checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from kd_toy import (
    CASES,
    PATCH_2D,
    PATCH_3D,
    FakeTeacher,
    dataset_json,
    nnunet_env,
    teacher_folder,
    write_dataset,
)
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_lorkd.kd.cache import (
    QUANTISATION_ERROR,
    CacheSpec,
    CaseJob,
    KDCacheError,
    SoftLabelCache,
    build_cache,
    sliding_window_probabilities,
    source_file,
    teacher_identity,
    verify_cache,
)
from nnunetv2_lorkd.kd.config import TeacherRef
from nnunetv2_lorkd.kd.data import SOFT_LABEL_KEY, CachedSoftLabels, KDDataLoader
from nnunetv2_lorkd.kd.layout import RegionClassLayout
from nnunetv2_lorkd.kd.teacher_inference import batch_probabilities, freeze_teacher
from nnunetv2_lorkd.regions import RegionMap

CLASSES = ("liver", "spleen", "urinary_bladder")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    env = nnunet_env(monkeypatch, str(tmp_path))
    folder = write_dataset(env["nnUNet_preprocessed"])
    teacher = FakeTeacher(CLASSES)
    freeze_teacher(teacher)
    ref = TeacherRef(teacher_folder(str(tmp_path)))
    rmap = RegionMap.from_dataset_json(dataset_json())
    return folder, teacher, ref, rmap, RegionClassLayout.from_region_map(rmap)


def _build(folder, teacher, ref, rmap, layout, configuration="3d_fullres", dtype="uint8", **kwargs):
    identifier = "nnUNetPlans_3d_fullres" if configuration == "3d_fullres" else "nnUNetPlans_2d"
    data = os.path.join(folder, identifier)
    patch = PATCH_3D if configuration == "3d_fullres" else PATCH_2D
    spec = CacheSpec(data, os.path.join(folder, "lorkd_kd_cache", identifier), patch, dtype=dtype)
    jobs = [CaseJob(c, rmap.region_of_case(c), layout.class_names[rmap.region_of_case(c)], source_file(data, c))
            for c in sorted(CASES)]  # fmt: skip
    manifest = build_cache(spec, teacher_identity(ref), False, jobs, layout.region_names, lambda d: teacher,
                           torch.device("cpu"), log=lambda m: None, **kwargs)  # fmt: skip
    return spec, manifest


def test_sliding_window_equals_one_forward_for_a_pointwise_teacher():
    teacher = FakeTeacher(CLASSES, exclusive=True)
    freeze_teacher(teacher)
    image = torch.randn(1, 11, 21, 19)  # not a multiple of the patch: padding and overlapping tiles
    with torch.no_grad():
        whole = teacher.probabilities(image[None], ["spleen", "liver"])[0]
    for patch in ((8, 16, 16), (16, 16)):
        got = sliding_window_probabilities(teacher, image, ["spleen", "liver"], patch, 0.5, 3)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def _loader(folder, spec, layout, rmap, configuration, transforms):
    pm = PlansManager(os.path.join(folder, "nnUNetPlans.json"))
    cm = pm.get_configuration(configuration)
    dataset = nnUNetDatasetBlosc2(spec.preprocessed_folder, sorted(CASES))
    dataset.lorkd_soft_labels = CachedSoftLabels(
        SoftLabelCache(spec.folder),
        layout.max_classes,
        {c: layout.num_classes(rmap.region_of_case(c)) for c in CASES},
    )
    return KDDataLoader(dataset, 4, cm.patch_size, cm.patch_size, pm.get_label_manager(dataset_json()),
                        oversample_foreground_percent=0.5, transforms=transforms)  # fmt: skip


@pytest.mark.parametrize(
    ("configuration", "dtype"), [("3d_fullres", "uint8"), ("3d_fullres", "float16"), ("2d", "uint8")]
)
def test_cache_round_trip_equals_online_teacher_on_the_patch(toy, configuration, dtype):
    folder, teacher, ref, rmap, layout = toy
    spec, manifest = _build(folder, teacher, ref, rmap, layout, configuration, dtype)
    assert set(manifest["cases"]) == set(CASES)
    # unaugmented patches, and patches flipped by the augmentation: the cached labels follow the patch exactly
    for transforms in (None, MirrorTransform(allowed_axes=(0, 1, 2) if configuration == "3d_fullres" else (0, 1))):
        loader = _loader(folder, spec, layout, rmap, configuration, transforms)
        for _ in range(2):
            batch = loader.generate_train_batch()
            regions = rmap.region_ids(batch["keys"])
            online = batch_probabilities(teacher, batch["data"], regions, layout)
            cached = batch[SOFT_LABEL_KEY]
            assert cached.shape == online.shape == (4, 2, *batch["data"].shape[2:])
            # inside the case (the label is -1 where the patch was padded: there the cache says "background",
            # probability 0, like the segmentation does, while the online teacher sees zero-padding)
            inside = (batch["target"] >= 0).expand_as(cached)
            assert inside.float().mean() > 0.5
            # tolerance: storage quantisation, plus float32 blending in the sliding window
            assert float((cached - online).abs()[inside].max()) <= QUANTISATION_ERROR[dtype] + 1e-5
            assert not cached[~inside].any()
            for b, r in enumerate(regions):  # padding channels of a one-class region are zero
                assert not cached[b, layout.num_classes(r) :].any()


def test_training_transforms_move_soft_labels_spatially_only(toy):
    """nnU-Net's own training pipeline: intensity transforms never touch the soft labels (a constant stays that
    constant wherever the patch lies inside the case; only resampling at the border blends in background)."""
    transforms = nnUNetTrainer.get_training_transforms(
        PATCH_3D, (-0.5, 0.5), None, (0, 1, 2), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1, 2, 3], regions=None, ignore_label=None,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for i in range(25):
        torch.manual_seed(i)
        np.random.seed(i)
        image = torch.from_numpy(rng.normal(0, 1, (1, *PATCH_3D)).astype(np.float32))
        seg = torch.zeros((1, *PATCH_3D), dtype=torch.int16)
        soft = torch.full((2, *PATCH_3D), 0.75)
        out = transforms(image=image, segmentation=seg, regression_target=soft)
        values = out["regression_target"]
        assert values.shape == soft.shape
        assert float(values.max()) <= 0.75 + 1e-6 and float(values.min()) >= 0.0
        assert float((values == 0.75).float().mean()) > 0.2


def test_cache_is_incremental_and_verified(toy, tmp_path):
    folder, teacher, ref, rmap, layout = toy
    data = os.path.join(folder, "nnUNetPlans_3d_fullres")
    case_regions = {c: rmap.region_of_case(c) for c in CASES}
    cache_dir = os.path.join(folder, "lorkd_kd_cache", "nnUNetPlans_3d_fullres")
    with pytest.raises(KDCacheError, match=r"no soft-label cache.*Run `lorkd-kd cache -d 950 -c 3d_fullres`"):
        verify_cache(
            cache_dir, teacher_identity(ref), layout, case_regions, data, "lorkd-kd cache -d 950 -c 3d_fullres"
        )
    spec, _ = _build(folder, teacher, ref, rmap, layout)
    verify_cache(spec.folder, teacher_identity(ref), layout, case_regions, data, "fix")
    calls = teacher.calls
    _build(folder, teacher, ref, rmap, layout)  # everything fresh: no teacher call
    assert teacher.calls == calls

    # the preprocessed data of one case changes -> that case is stale, and only it is recomputed
    path = source_file(data, "pel_001")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(KDCacheError, match=r"pel_001: the preprocessed data changed.*Run `fix`"):
        verify_cache(spec.folder, teacher_identity(ref), layout, case_regions, data, "fix")
    _build(folder, teacher, ref, rmap, layout)
    assert teacher.calls > calls
    verify_cache(spec.folder, teacher_identity(ref), layout, case_regions, data, "fix")

    # another teacher (other weights) -> stale as a whole
    with open(ref.checkpoint_path, "wb") as f:
        f.write(b"fake teacher weights v2")
    with pytest.raises(KDCacheError, match="another teacher"):
        verify_cache(spec.folder, teacher_identity(ref), layout, case_regions, data, "fix")

    # a case missing from the cache
    _build(folder, teacher, ref, rmap, layout)
    os.remove(os.path.join(spec.folder, "abd_002.b2nd"))
    with pytest.raises(KDCacheError, match="abd_002: missing"):
        verify_cache(spec.folder, teacher_identity(ref), layout, case_regions, data, "fix")

    # the region definition changed (other classes for a region) -> stale
    _build(folder, teacher, ref, rmap, layout)
    changed = dataset_json()
    changed["lorkd"]["regions"][0]["labels"] = ["liver"]
    other = RegionClassLayout.from_region_map(RegionMap.from_dataset_json(changed))
    with pytest.raises(KDCacheError, match=r"abd_000: computed for abdomen \['liver', 'spleen'\], needs \['liver'\]"):
        verify_cache(spec.folder, teacher_identity(ref), other, case_regions, data, "fix")
