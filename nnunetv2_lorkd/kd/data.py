"""Training batches that carry the cached teacher soft labels, augmented together with the patch.

The soft labels of a case are cropped with the same bounding box as image and segmentation and handed to
nnU-Net's augmentation pipeline as ``regression_target``: batchgeneratorsv2 moves that key through exactly
the spatial transforms (SpatialTransform resamples it like the image, bilinearly, zero outside the case,
i.e. background; MirrorTransform flips it; the pseudo-2D conversions reshape it), while intensity transforms
touch only ``image`` and the segmentation-only transforms (label removal, deep-supervision downsampling)
only ``segmentation``. Deep supervision of the soft labels is done in the loss (area averaging of the target
distribution to each output), so the batch carries them at full patch resolution only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from threadpoolctl import threadpool_limits

from nnunetv2_lorkd.kd.cache import SoftLabelCache
from nnunetv2_lorkd.nnunet.runtime import RegionBalancedDataLoader

SOFT_LABEL_KEY = "lorkd_teacher_probs"


class CachedSoftLabels:
    """What a training dataset needs to serve soft labels: the cache and the channel count of the batch."""

    def __init__(self, cache: SoftLabelCache, max_classes: int, case_classes: Mapping[str, int]):
        self.cache = cache
        self.max_classes = int(max_classes)
        self.case_classes = dict(case_classes)


class KDDataLoader(RegionBalancedDataLoader):
    """nnU-Net's (region-balanced) training loader; when its dataset carries ``lorkd_soft_labels`` every batch
    also holds ``batch[SOFT_LABEL_KEY]``: (B, max_classes, *patch) float32 teacher probabilities. A trainer that
    distils from cached soft labels builds it through its ``_data_loader_class`` hook (trainers/lorkd.py)."""

    def __init__(self, data, *args, **kwargs):
        super().__init__(data, *args, **kwargs)
        self.soft_labels: CachedSoftLabels | None = getattr(data, "lorkd_soft_labels", None)

    def generate_train_batch(self) -> dict:
        if self.soft_labels is None:
            return super().generate_train_batch()
        keys = self.get_indices()
        images, segs, softs = [], None, []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, seg_prev, properties = self._data.load_case(key)
                lbs, ubs = self.get_bbox(data.shape[1:], self.get_do_oversample(j), properties["class_locations"])
                bbox = [[lo, hi] for lo, hi in zip(lbs, ubs, strict=True)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                labels = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if seg_prev is not None:
                    previous = crop_and_pad_nd(seg_prev, bbox, -1, cast_cropped_to=np.int16)
                    labels = torch.cat((labels, torch.from_numpy(previous).to(torch.int16)[None]), 0)
                soft = self.soft_labels.cache.crop(key, bbox)
                expected = self.soft_labels.case_classes.get(key)
                if soft.shape[0] != expected:
                    raise RuntimeError(
                        f"cached soft labels of '{key}' have {soft.shape[0]} channels, its region has {expected} "
                        "classes; rerun `lorkd-kd cache`"
                    )
                if self.patch_size_was_2d:
                    image, labels, soft = image[:, 0], labels[:, 0], soft[:, 0]
                if self.transforms is not None:
                    out = self.transforms(image=image, segmentation=labels, regression_target=soft)
                    image, labels, soft = out["image"], out["segmentation"], out["regression_target"]
                images.append(image)
                softs.append(soft)
                if isinstance(labels, list):  # deep supervision: one target per output
                    segs = [[] for _ in labels] if segs is None else segs
                    for level, target in enumerate(labels):
                        segs[level].append(target)
                else:
                    segs = [] if segs is None else segs
                    segs.append(labels)
            target = [torch.stack(level) for level in segs] if isinstance(segs[0], list) else torch.stack(segs)
            probs = torch.zeros((len(keys), self.soft_labels.max_classes, *softs[0].shape[1:]), dtype=torch.float32)
            for j, soft in enumerate(softs):
                probs[j, : soft.shape[0]] = soft
        return {"data": torch.stack(images), "target": target, "keys": keys, SOFT_LABEL_KEY: probs}
