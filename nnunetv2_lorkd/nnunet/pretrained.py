"""Start a LoRKD, MTL or SAT-style training from any trained nnU-Net model of the same plans
(``nnUNetv2_train D C F -tr nnUNetTrainerLoRKD -pretrained_weights MODEL/fold_0/checkpoint_final.pth``).

LoRKD's knowledge decomposition starts from a trained network, but nnU-Net's own loader cannot give it one: it
demands every key of the network in the checkpoint (the expert factors are in no vanilla checkpoint) and never
transfers the segmentation heads. What transfers here:

* everything of the plain network must be in the checkpoint with the same shape. For LoRKD that is the shared
  weight W0 of every expert layer, which keeps the replaced conv's own ``weight``/``bias`` names (the reason
  ``fuse_expert`` yields vanilla keys), so vanilla keys address W0 directly; the expert factors are told
  apart by identity (``expert_layers``), not by name;
* the segmentation heads row by row, matched by class name (the dataset.json labels of source and student):
  a region specialist initialises the merged student's heads of its own classes, the other rows stay as
  initialised;
* the experts stay fresh (B_t = 0), so the loaded network computes what the source computed, for every region.

A SAT-style checkpoint (``PromptedUNet``: ``unet.*`` plus ``prompt.*``) gives its U-Net body only: its seg layers
output per-pixel embeddings, not classes.

nnU-Net calls a module-level function with nothing but the network (``run_training.maybe_load_checkpoint``), so
:func:`register_pretrained_loader` swaps that function for one that hands the networks our trainers registered
to their trainer and every other network to nnU-Net's original, unchanged. nnU-Net is imported only there.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nnunetv2_lorkd.experts import expert_layers, unmerge_experts, unwrap_network
from nnunetv2_lorkd.fuse import SEG_HEAD_KEY, FuseError, load_checkpoint

SAT_BODY_PREFIX = "unet."
SAT_PROMPT_PREFIX = "prompt."
_SHOWN = 5  # how many offending keys an error names


class PretrainedWeightsError(RuntimeError):
    """A -pretrained_weights checkpoint that cannot initialise this network, with what to do about it."""


# ------------------------------------------------------------------------------------------- class names
def class_names_by_channel(dataset_json: Mapping, source: str) -> tuple[str, ...]:
    """The class of each softmax output channel (channel = label value, background at 0) from dataset.json
    labels: the only link between the heads of two datasets whose label values differ."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise PretrainedWeightsError(f"{source} has no 'labels'; the classes of its segmentation heads are unknown")
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":  # nnU-Net's ignore label has no output channel
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise PretrainedWeightsError(
                f"{source}: label '{name}' is {value!r}, an nnU-Net region: its heads are not one channel per "
                "class, so they cannot be matched by class name. Initialise from a model trained with plain "
                "integer labels"
            )
        if value in by_value:
            raise PretrainedWeightsError(f"{source}: labels '{by_value[value]}' and '{name}' share the value {value}")
        by_value[value] = name
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise PretrainedWeightsError(f"{source}: label values must be 0..K without gaps, got {values}")
    return tuple(by_value[v] for v in values)


# ---------------------------------------------------------------------------------------------- source
@dataclass(frozen=True)
class SourceCheckpoint:
    """The part of an nnU-Net checkpoint that can initialise another network."""

    path: str
    trainer_name: str
    weights: dict[str, torch.Tensor]  # keys of a plain nnU-Net U-Net (a SAT-style model's 'unet.' removed)
    prompted: bool  # a SAT-style model: its heads output embeddings, not classes, and are not in `weights`
    class_names: tuple[str, ...] | None  # per head channel; None when not asked for, or `prompted`
    class_names_from: str
    unusable: tuple[str, ...]  # tensors no plain U-Net has (the SAT-style prompt head and embedding heads)


def read_source_checkpoint(path: str, class_names: bool = True) -> SourceCheckpoint:
    """Read a checkpoint written by nnUNetv2_train (weights_only=True) and, unless `class_names` is False (a
    network without class heads), the class names of its heads."""
    try:
        checkpoint = load_checkpoint(path)
    except FuseError as error:
        raise PretrainedWeightsError(f"-pretrained_weights: {error}") from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, Mapping) or not weights:
        raise PretrainedWeightsError(
            f"{path} has no 'network_weights'; pass a checkpoint written by nnUNetv2_train "
            "(MODEL/fold_X/checkpoint_final.pth)"
        )
    trainer_name = str(checkpoint.get("trainer_name", "unknown trainer"))
    prompted = any(k.startswith(SAT_PROMPT_PREFIX) for k in weights) and all(
        k.startswith((SAT_BODY_PREFIX, SAT_PROMPT_PREFIX)) for k in weights
    )
    if prompted:
        body, unusable = {}, []
        for key, value in weights.items():
            name = key[len(SAT_BODY_PREFIX) :]
            if key.startswith(SAT_BODY_PREFIX) and not SEG_HEAD_KEY.search(name):
                body[name] = value
            else:
                unusable.append(key)
        return SourceCheckpoint(path, trainer_name, body, True, None, "", tuple(unusable))
    names, where = _source_class_names(path, checkpoint) if class_names else (None, "")
    return SourceCheckpoint(path, trainer_name, dict(weights), False, names, where, ())


def _source_class_names(path: str, checkpoint: dict) -> tuple[tuple[str, ...], str]:
    """From the dataset.json the trainer stored in the checkpoint, else from the model folder's (lorkd-fuse
    checkpoints store none)."""
    init_args = checkpoint.get("init_args")
    stored = init_args.get("dataset_json") if isinstance(init_args, Mapping) else None
    if isinstance(stored, Mapping):
        return class_names_by_channel(stored, f"the dataset.json stored in {path}"), "the checkpoint's dataset.json"
    folder_json = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "dataset.json")
    if not os.path.isfile(folder_json):
        raise PretrainedWeightsError(
            f"{path} stores no dataset.json and there is none at {folder_json}, so the classes of its heads are "
            "unknown; keep the checkpoint inside its nnU-Net model folder (MODEL/fold_X/checkpoint_final.pth next "
            "to MODEL/dataset.json)"
        )
    try:
        with open(folder_json) as f:
            dataset_json = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise PretrainedWeightsError(f"cannot read {folder_json} ({error})") from None
    return class_names_by_channel(dataset_json, folder_json), folder_json


# -------------------------------------------------------------------------------------------- transfer
@dataclass(frozen=True)
class PretrainedReport:
    """What a transfer loaded, for the training log."""

    source: str
    trainer_name: str
    backbone_tensors: int
    matched_classes: tuple[str, ...]
    fresh_classes: tuple[str, ...]
    class_names_from: str
    heads_note: str | None  # why no head was matched by class, when none could be
    expert_layers: int
    unused: tuple[str, ...]

    def summary(self) -> str:
        lines = [
            f"Pretrained weights from {self.source} ({self.trainer_name}): "
            f"{self.backbone_tensors} tensors loaded into the backbone"
        ]
        if self.heads_note is not None:
            lines.append(self.heads_note)
        else:
            fresh = f"; fresh heads for classes {list(self.fresh_classes)}" if self.fresh_classes else ""
            lines.append(
                f"heads matched by class name for classes {list(self.matched_classes)} "
                f"(source classes from {self.class_names_from}){fresh}"
            )
        if self.expert_layers:
            lines.append(
                f"experts fresh (B_t = 0 in {self.expert_layers} expert layers): every region starts out computing "
                "exactly the loaded network"
            )
        else:
            lines.append("no experts in this network")
        if self.unused:
            shown = ", ".join(self.unused[:_SHOWN]) + (", ..." if len(self.unused) > _SHOWN else "")
            lines.append(f"{len(self.unused)} checkpoint tensors not used ({shown})")
        return "; ".join(lines)


def load_pretrained_into(
    network: nn.Module,
    source: SourceCheckpoint,
    class_names: Sequence[str] | None,
    *,
    body_prefix: str = "",
) -> PretrainedReport:
    """Copy the source's plain-network tensors and class-matched head rows into `network`, in place; its experts
    become fresh (B_t = 0).

    `class_names` names the network's head channels (None: its heads output embeddings, as a SAT-style network's,
    and stay fresh). `body_prefix` is where the plain U-Net sits in the network's state_dict (``"unet."`` for a
    SAT-style network); tensors outside it stay fresh. Nothing is changed when the architectures do not match.
    """
    net = unwrap_network(network)
    layers = expert_layers(net)
    expert_ids = {id(p) for layer in layers for p in (*layer.lora_A, *layer.lora_B)}
    backbone: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    reported: set[int] = set()  # a tensor registered under two names (U-Net aliases) is reported once

    def problem(into: list[str], text: str, target: torch.Tensor) -> None:
        if id(target) not in reported:
            reported.add(id(target))
            into.append(text)

    for key, target in net.state_dict(keep_vars=True).items():
        if id(target) in expert_ids or not key.startswith(body_prefix):
            continue
        name = key[len(body_prefix) :]
        value = source.weights.get(name)
        is_head = SEG_HEAD_KEY.search(name) is not None
        if is_head and (class_names is None or source.prompted):
            continue
        if value is None:
            problem(missing, name, target)
        elif value.shape[int(is_head) :] != target.shape[int(is_head) :]:  # head rows are classes, matched below
            problem(mismatched, f"{name} (checkpoint {tuple(value.shape)}, network {tuple(target.shape)})", target)
        elif is_head:
            heads[name] = (target, value)
        else:
            backbone[name] = (target, value)
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors of the network are not in it (first: {missing[:_SHOWN]})")
        if mismatched:
            problems.append(f"{len(mismatched)} tensors have another shape (first: {mismatched[:_SHOWN]})")
        raise PretrainedWeightsError(
            f"-pretrained_weights {source.path} does not fit this network: {'; '.join(problems)}. The checkpoint "
            "must come from a model of the same architecture: train it with the same plans and configuration (for "
            "another dataset, copy the plans over with nnUNetv2_move_plans_between_datasets first)"
        )

    pairs: list[tuple[int, int]] = []
    heads_note = None
    fresh: tuple[str, ...] = ()
    if source.prompted:
        heads_note = (
            "heads fresh: the SAT-style source's seg layers output per-pixel embeddings, not classes, so only its "
            "U-Net body was loaded"
        )
    elif class_names is None:
        heads_note = (
            "heads fresh: this network's seg layers output per-pixel embeddings, not classes, so only its U-Net body "
            "was loaded"
        )
    else:
        if source.class_names is None:
            raise ValueError("read the source with class_names=True to match heads by class name")
        for target, value in heads.values():
            for what, rows, names in (("network", target.shape[0], class_names),
                                      ("checkpoint", value.shape[0], source.class_names)):  # fmt: skip
                if rows != len(names):
                    raise PretrainedWeightsError(
                        f"the {what}'s segmentation heads have {rows} channels but its dataset.json lists "
                        f"{len(names)} classes {list(names)}; the checkpoint and its dataset.json do not belong "
                        "together"
                    )
        # channel 0 is background on both sides whatever it is called; the others go by name
        source_channel = {n: c for c, n in enumerate(source.class_names) if c}
        pairs = [(0, 0)] + [(c, source_channel[n]) for c, n in enumerate(class_names) if c and n in source_channel]
        fresh = tuple(n for c, n in enumerate(class_names) if c and n not in source_channel)
    matched = tuple(class_names[c] for c, _ in pairs) if class_names is not None else ()

    unmerge_experts(net)  # a merged weight would be stale after W0 changes
    with torch.no_grad():
        for target, value in backbone.values():
            target.copy_(value)
        if pairs:
            rows = torch.tensor([c for c, _ in pairs])
            source_rows = torch.tensor([c for _, c in pairs])
            for target, value in heads.values():
                target.index_copy_(0, rows.to(target.device), value.index_select(0, source_rows).to(target))
        for layer in layers:
            for factor in layer.lora_B:
                factor.zero_()
    used = set(backbone) | (set(heads) if pairs else set())
    unused = (*source.unusable, *(k for k in source.weights if k not in used and not SEG_HEAD_KEY.search(k)))
    return PretrainedReport(
        source=source.path,
        trainer_name=source.trainer_name,
        backbone_tensors=len({id(target) for target, _ in backbone.values()}),
        matched_classes=matched,
        fresh_classes=fresh,
        class_names_from=source.class_names_from,
        heads_note=heads_note,
        expert_layers=len(layers),
        unused=tuple(unused),
    )


# ------------------------------------------------------------------------------------- the nnU-Net hook
_LOADERS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakMethod] = weakref.WeakKeyDictionary()


def register_pretrained_loader(network: nn.Module, loader: Callable[[str], object]) -> None:
    """Make nnU-Net's ``-pretrained_weights`` call ``loader(fname)`` (a trainer's bound method) for `network`
    instead of nnU-Net's loader, which demands the expert weights and drops the heads. Held weakly: a dead
    trainer or network unregisters itself."""
    if not hasattr(loader, "__self__"):
        raise TypeError("register_pretrained_loader needs a bound method (e.g. trainer.load_pretrained_weights)")
    _install_nnunet_hook()
    _LOADERS[unwrap_network(network)] = weakref.WeakMethod(loader)  # type: ignore[arg-type]


def _install_nnunet_hook() -> None:
    """Once per process, in the module that defines nnU-Net's function and the one that calls it."""
    import nnunetv2.run.load_pretrained_weights as defining_module
    import nnunetv2.run.run_training as calling_module

    for module in (defining_module, calling_module):
        current = module.load_pretrained_weights
        if not getattr(current, "_lorkd_dispatch", False):
            module.load_pretrained_weights = _dispatching(current)


def _dispatching(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_pretrained_weights(network: nn.Module, fname: str, verbose: bool = False) -> None:
        reference = _LOADERS.get(unwrap_network(network))
        loader = reference() if reference is not None else None
        if loader is None:
            return original(network, fname, verbose=verbose)
        loader(fname)
        return None

    load_pretrained_weights._lorkd_dispatch = True  # type: ignore[attr-defined]
    return load_pretrained_weights
