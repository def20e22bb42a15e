"""Expert hyper-parameters of a LoRKD nnU-Net model and where they are stored.

The predictor rebuilds a network from ``plans.json`` alone (``build_network_architecture`` gets no
dataset.json), so the resolved configuration is written into the plans configuration under
``lorkd_experts``. Defaults come from trainer class attributes; a dataset may override them in its
dataset.json (``lorkd.experts``: rank, alpha, decoder_rank_factor, ranks per region name, fixed_scaling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import nn

from nnunetv2_lorkd.experts import add_experts
from nnunetv2_lorkd.regions import RegionMap, RegionMapError

PLANS_KEY = "lorkd_experts"
_DATASET_KEYS = {
    "rank",
    "alpha",
    "decoder_rank_factor",
    "ranks",
    "fixed_scaling",
    "include_transposed",
    "include_seg_heads",
}


@dataclass(frozen=True)
class ExpertConfig:
    region_names: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    decoder_rank_factor: int = 2
    ranks: tuple[int, ...] | None = None
    fixed_scaling: float | None = None
    include_transposed: bool = False
    include_seg_heads: bool = False

    @classmethod
    def resolve(cls, defaults: Mapping, region_map: RegionMap, dataset_json: Mapping) -> ExpertConfig:
        """Class-attribute defaults, overridden by dataset.json's ``lorkd.experts`` if present."""
        values = dict(defaults)
        overrides = dict(dataset_json.get("lorkd", {}).get("experts", {}))
        unknown = set(overrides) - _DATASET_KEYS
        if unknown:
            raise RegionMapError(
                f"dataset.json lorkd.experts has unknown keys {sorted(unknown)}; valid: {sorted(_DATASET_KEYS)}"
            )
        values.update(overrides)
        ranks = values.get("ranks")
        if isinstance(ranks, Mapping):  # per region name; unnamed regions keep `rank`
            bad = set(ranks) - set(region_map.names)
            if bad:
                raise RegionMapError(
                    f"lorkd.experts.ranks names unknown regions {sorted(bad)}; regions: {region_map.names}"
                )
            ranks = tuple(int(ranks.get(n, values.get("rank", cls.rank))) for n in region_map.names)
        elif ranks is not None:
            ranks = tuple(int(r) for r in ranks)
            if len(ranks) != region_map.num_regions:
                raise RegionMapError(
                    f"lorkd.experts.ranks has {len(ranks)} entries for {region_map.num_regions} regions"
                )
        values["ranks"] = ranks
        return cls(region_names=region_map.names, **{k: v for k, v in values.items() if k in _DATASET_KEYS})

    # ------------------------------------------------------------------------------------ plans storage
    def to_json(self) -> dict:
        data = asdict(self)
        data["region_names"] = list(self.region_names)
        data["ranks"] = None if self.ranks is None else list(self.ranks)
        return data

    @classmethod
    def from_configuration(cls, configuration: Mapping) -> ExpertConfig:
        data = configuration.get(PLANS_KEY)
        if data is None:
            raise RuntimeError(
                f"the plans configuration has no '{PLANS_KEY}' entry, so the expert layout is unknown. This model "
                "folder was not written by nnUNetTrainerLoRKD (or its plans.json was replaced)."
            )
        data = dict(data)
        data["region_names"] = tuple(data["region_names"])
        data["ranks"] = None if data.get("ranks") is None else tuple(data["ranks"])
        return cls(**data)

    def store_in(self, plans: dict, configuration_name: str, configuration: dict) -> None:
        """Write into the raw plans (saved as plans.json and in checkpoints) and the resolved configuration."""
        plans["configurations"][configuration_name][PLANS_KEY] = self.to_json()
        configuration[PLANS_KEY] = self.to_json()

    # --------------------------------------------------------------------------------------- network
    def apply(self, net: nn.Module) -> nn.Module:
        return add_experts(
            net,
            len(self.region_names),
            rank=self.rank,
            alpha=self.alpha,
            decoder_rank_factor=self.decoder_rank_factor,
            ranks=self.ranks,
            fixed_scaling=self.fixed_scaling,
            include_transposed=self.include_transposed,
            include_seg_heads=self.include_seg_heads,
            region_names=self.region_names,
        )
