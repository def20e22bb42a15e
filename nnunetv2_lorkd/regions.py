"""The one place that defines regions: their names (order = expert index), labels, and cases.

The definition lives in the ``lorkd`` section of an nnU-Net ``dataset.json``, which nnU-Net copies verbatim
from raw to preprocessed to results, so training, validation, fusion and prediction all read the same map::

    "lorkd": {
        "version": 1,
        "regions": [{"name": "abdomen", "labels": ["liver", "spleen"]},
                    {"name": "pelvis",  "labels": ["urinary_bladder", "femur_left"]}],
        "case_regions": {"abd_000": "abdomen", "pel_000": "pelvis"},
        "case_sources": {"abd_000": "Dataset501_Abdomen/abd_000", "pel_000": "Dataset502_Pelvis/pel_000"}
    }

Labels are given by name and resolved against the dataset's ``labels`` (the union label space).

``case_sources`` (optional, written by ``lorkd-merge``) names the patient image behind each case as
``DATASET/CASE``. When one dataset is split into regions, its case ``c0`` becomes ``c0_abdomen`` and
``c0_pelvis`` with the same source ``DatasetXXX_Name/c0``: cross-validation splits keep cases of one source in
the same fold, and the distillation fold check recognises the patient across datasets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SCHEMA_VERSION = 1


class RegionMapError(ValueError):
    """The lorkd section of a dataset.json is missing or inconsistent."""


@dataclass(frozen=True)
class Region:
    name: str
    label_names: tuple[str, ...]
    label_values: tuple[int, ...]


@dataclass(frozen=True)
class RegionMap:
    regions: tuple[Region, ...]
    case_regions: Mapping[str, int]
    all_labels: Mapping[str, int]  # the union label space, background included
    case_sources: Mapping[str, str] = field(default_factory=dict)  # case -> "DATASET/CASE" of its image

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping, source: str = "dataset.json") -> RegionMap:
        section = dataset_json.get("lorkd")
        if section is None:
            raise RegionMapError(
                f"{source} has no 'lorkd' section, so there is no region for any case. Build the dataset "
                "with `lorkd-merge`, or add the section by hand: its format is in the docstring of the "
                "nnunetv2_lorkd.regions module, and README.md ('Using it with nnU-Net') describes it."
            )
        if section.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise RegionMapError(f"{source}: lorkd.version {section.get('version')} is not supported (expected 1)")
        labels = dataset_json.get("labels", {})
        plain_labels: dict[str, int] = {}
        for name, value in labels.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise RegionMapError(
                    f"{source}: label '{name}' is {value!r}; LoRKD needs plain integer labels, not nnU-Net regions"
                )
            if name != "ignore":
                plain_labels[name] = value
        raw_regions = section.get("regions")
        if not raw_regions:
            raise RegionMapError(f"{source}: lorkd.regions is empty; list at least one region")
        regions = []
        seen: set[str] = set()
        for i, entry in enumerate(raw_regions):
            name = entry.get("name")
            if not name or not isinstance(name, str):
                raise RegionMapError(f"{source}: lorkd.regions[{i}] has no name")
            if name in seen:
                raise RegionMapError(f"{source}: region '{name}' is defined twice in lorkd.regions")
            seen.add(name)
            names = tuple(entry.get("labels", ()))
            if not names:
                raise RegionMapError(f"{source}: region '{name}' has no labels")
            unknown = [n for n in names if n not in plain_labels or plain_labels[n] == 0]
            if unknown:
                raise RegionMapError(
                    f"{source}: region '{name}' names labels {unknown} that are not foreground labels of the "
                    f"dataset (known: {sorted(n for n, v in plain_labels.items() if v != 0)})"
                )
            regions.append(Region(name, names, tuple(plain_labels[n] for n in names)))
        index = {r.name: i for i, r in enumerate(regions)}
        case_regions: dict[str, int] = {}
        for case, region in section.get("case_regions", {}).items():
            if region not in index:
                raise RegionMapError(
                    f"{source}: case '{case}' is assigned to unknown region '{region}' (regions: {list(index)})"
                )
            case_regions[case] = index[region]
        case_sources = parse_case_sources(section.get("case_sources", {}), source, case_regions)
        return cls(tuple(regions), case_regions, plain_labels, case_sources)

    def to_json(self) -> dict:
        data = {
            "version": SCHEMA_VERSION,
            "regions": [{"name": r.name, "labels": list(r.label_names)} for r in self.regions],
            "case_regions": {case: self.regions[i].name for case, i in sorted(self.case_regions.items())},
        }
        if self.case_sources:
            data["case_sources"] = dict(sorted(self.case_sources.items()))
        return data

    # ------------------------------------------------------------------------------------------- queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    @property
    def num_regions(self) -> int:
        return len(self.regions)

    def region_index(self, name_or_index: str | int) -> int:
        if isinstance(name_or_index, int) and not isinstance(name_or_index, bool):
            if 0 <= name_or_index < self.num_regions:
                return name_or_index
        elif name_or_index in self.names:
            return self.names.index(name_or_index)
        raise RegionMapError(f"unknown region {name_or_index!r}; valid regions: {', '.join(self.names)}")

    def region_of_case(self, case_id: str) -> int:
        try:
            return self.case_regions[case_id]
        except KeyError:
            raise RegionMapError(
                f"case '{case_id}' has no region in dataset.json lorkd.case_regions; every training case needs one"
            ) from None

    def region_ids(self, case_ids: Iterable[str]) -> list[int]:
        return [self.region_of_case(c) for c in case_ids]

    def source_of(self, case_id: str, dataset_name: str) -> str:
        """The ``DATASET/CASE`` patient key of a case of dataset ``dataset_name``: its recorded source, or the case
        itself where none is recorded (a case without a record is its own patient)."""
        return self.case_sources.get(case_id, f"{dataset_name}/{case_id}")

    def cases_of(self, region: int) -> list[str]:
        return sorted(c for c, r in self.case_regions.items() if r == region)

    def label_values(self, region: int) -> tuple[int, ...]:
        return self.regions[region].label_values

    def channels(self, region: int) -> list[int]:
        """Output channels of a region in the union label space: background first, then ascending labels
        (the order fused seg heads are sliced in and region dataset.json labels are numbered in)."""
        return [0, *sorted(self.label_values(region))]

    def class_mask(self, num_classes: int) -> list[list[bool]]:
        """Per region, which output channels (background = 0 included) it supervises."""
        masks = []
        for region in self.regions:
            row = [False] * num_classes
            row[0] = True
            for v in region.label_values:
                row[v] = True
            masks.append(row)
        return masks


def region_labels_for_dataset_json(region: Region) -> dict[str, int]:
    """The `labels` of a single-region dataset.json: background plus the region's labels renumbered 1..K
    in their union order (the order seg-head channels are sliced in)."""
    ordered = sorted(zip(region.label_values, region.label_names, strict=True))
    return {"background": 0, **{name: i + 1 for i, (_, name) in enumerate(ordered)}}


def parse_case_sources(raw: object, source: str, case_regions: Mapping[str, object] | None = None) -> dict[str, str]:
    """Validate a ``lorkd.case_sources`` section: case id -> ``DATASET/CASE``. With ``case_regions``, every case
    named must have a region (a record for an unknown case is a typo that would silently group nothing)."""
    if not isinstance(raw, Mapping):
        raise RegionMapError(f"{source}: lorkd.case_sources must map case ids to 'DATASET/CASE' strings")
    out: dict[str, str] = {}
    for case, key in raw.items():
        if not isinstance(key, str) or not is_source_key(key):
            raise RegionMapError(
                f"{source}: lorkd.case_sources['{case}'] is {key!r}; it must be 'DATASET/CASE' (the dataset and "
                "case the image comes from), e.g. 'Dataset501_Abdomen/case_0001'"
            )
        out[str(case)] = key
    if case_regions is not None:
        unknown = sorted(set(out) - set(case_regions))
        if unknown:
            raise RegionMapError(
                f"{source}: lorkd.case_sources names {len(unknown)} case(s) without a region in "
                f"lorkd.case_regions, e.g. {unknown[:5]}; remove them or add them to case_regions"
            )
    return out


def is_source_key(key: str) -> bool:
    """True for a ``DATASET/CASE`` key (two non-empty parts)."""
    dataset, sep, case = key.partition("/")
    return bool(sep and dataset.strip() and case.strip())
