"""Which teacher classes each region distils, and where they sit in the student's output.

A sample of region t is distilled over background + region t's classes only. The teacher is asked for those
classes by name; its K_t probabilities travel (online or from the cache) as the first K_t of ``max_classes``
channels, the rest zero. :class:`RegionClassLayout` maps those channels back to the student's union output
channels (``RegionMap.channels``: background first, then ascending label values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nnunetv2_lorkd.regions import RegionMap


@dataclass(frozen=True)
class RegionClassLayout:
    region_names: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]  # per region, in ascending label-value order
    channels: tuple[tuple[int, ...], ...]  # per region: union output channels, background (0) first

    @classmethod
    def from_region_map(cls, region_map: RegionMap) -> RegionClassLayout:
        names, channels = [], []
        for t, region in enumerate(region_map.regions):
            ordered = sorted(zip(region.label_values, region.label_names, strict=True))
            names.append(tuple(n for _, n in ordered))
            channels.append(tuple(region_map.channels(t)))
        return cls(region_map.names, tuple(names), tuple(channels))

    @property
    def max_classes(self) -> int:
        return max(len(n) for n in self.class_names)

    @property
    def all_class_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for names in self.class_names:
            seen.update(dict.fromkeys(names))
        return tuple(seen)

    def num_classes(self, region: int) -> int:
        return len(self.class_names[region])

    def index_and_valid(self, region_ids: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + max_classes) union-channel index per sample (padding points at channel 0) and its validity."""
        width = 1 + self.max_classes
        index = torch.zeros((len(region_ids), width), dtype=torch.long)
        valid = torch.zeros((len(region_ids), width), dtype=torch.bool)
        for b, t in enumerate(region_ids):
            ch = self.channels[t]
            index[b, : len(ch)] = torch.tensor(ch)
            valid[b, : len(ch)] = True
        return index.to(device), valid.to(device)
