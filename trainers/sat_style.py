"""nnUNetTrainerSATStyle: a SAT-style universal model trained inside nnU-Net on a merged multi-region dataset.

The plans' U-Net gives per-pixel embeddings; each class is prompted by its dataset.json label name (a frozen
sentence encoder embeds the name once, at training start, and the embeddings are stored in the checkpoint);
a small MLP turns each name embedding into a query, and the class logit map is the scaled cosine of query and
embedding, each class starting at its foreground prior (see ``_init_class_bias`` and docs/teachers.md). Classes
are independent sigmoids trained with Dice + BCE over the classes annotated in each sample (partial labels,
regions from the dataset.json ``lorkd`` section). The output keeps nnU-Net's layout (zero background channel
+ class logits), so ``nnUNetv2_predict -tr nnUNetTrainerSATStyle`` writes a normal label map. It serves as
the frozen teacher for LoRKD's distillation (``nnunetv2_lorkd.teachers.load_teacher``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_lorkd_trainers._variants import LENGTHS, length_name, length_variant, smoke_variant
from torch import autocast, nn

from nnunetv2_lorkd.experts import unwrap_network
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss
from nnunetv2_lorkd.nnunet.runtime import (
    ROUTED_DATASET_FOR,
    OutputRestriction,
    balanced_loaders,
    case_hook,
    region_balanced_probabilities,
    summarize_validation_by_region,
)
from nnunetv2_lorkd.pretrained import (
    PretrainedReport,
    load_pretrained_into,
    read_source_checkpoint,
    register_pretrained_loader,
)
from nnunetv2_lorkd.regions import RegionMap
from nnunetv2_lorkd.sat import (
    DEFAULT_TEXT_ENCODER,
    MaskedSigmoidDiceBCELoss,
    PromptedUNet,
    SATConfig,
    build_prompted_network,
    class_prompt,
    embed_texts,
    foreground_label_names,
    foreground_priors,
    subsample_evenly,
    text_dim,
)
from nnunetv2_lorkd.splits import splits_for_cases

REGION_DICE_KEY = "lorkd_region_dice"


__all__ = [
    "nnUNetTrainerSATStyle",
    "nnUNetTrainerSATStyle_learnedEmbeddings",
    "nnUNetTrainerSATStyle_smoke",
    *(length_name("nnUNetTrainerSATStyle", n) for n in LENGTHS),
]


class nnUNetTrainerSATStyle(nnUNetTrainer):
    # None: learn one embedding per class instead of embedding its name (nnUNetTrainerSATStyle_learnedEmbeddings)
    sat_text_encoder: str | None = DEFAULT_TEXT_ENCODER
    sat_learned_embedding_dim: int = 64
    sat_embedding_dim: int = 32  # per-pixel embedding / query dimension (SAT-Nano: 64)
    sat_query_hidden_dim: int = 256
    # training cases per region read at initialisation to estimate the class foreground priors (bounded cost)
    sat_prior_cases_per_region: int = 16
    # "balanced": every region gets the same share of samples; "cases": nnU-Net's uniform over cases
    lorkd_region_sampling: str = "balanced"

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise RuntimeError(
                f"{type(self).__name__} needs plain integer labels without an ignore label: every class is its own "
                "sigmoid, and which classes a case annotates comes from the dataset.json 'lorkd' section (see "
                "lorkd-merge)"
            )
        self.region_map = RegionMap.from_dataset_json(dataset_json)
        names = foreground_label_names(dataset_json)
        encoder = self.sat_text_encoder
        self.sat_config = SATConfig(
            class_names=names,
            prompts=tuple(class_prompt(n) for n in names),
            text_encoder=encoder,
            text_dim=self.sat_learned_embedding_dim if encoder is None else text_dim(encoder),
            embedding_dim=self.sat_embedding_dim,
            query_hidden_dim=self.sat_query_hidden_dim,
        )
        self.sat_config.store_in(plans, configuration, self.configuration_manager.configuration)
        num_classes = self.label_manager.num_segmentation_heads
        self.region_class_mask = torch.tensor(self.region_map.class_mask(num_classes), dtype=torch.bool)
        self.logger.local_logger.my_fantastic_logging.setdefault(REGION_DICE_KEY, [])

    # ------------------------------------------------------------------------------------------- network
    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """The plans' U-Net as per-pixel embedder plus the class-prompt head, laid out by the plans' lorkd_sat."""
        return build_prompted_network(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )

    def initialize(self) -> None:
        super().initialize()
        config = self.sat_config
        if config.learned_embeddings:
            source = f"learned class embeddings ({config.text_dim}-d)"
        else:
            embeddings = embed_texts(config.prompts, config.text_encoder)
            self._prompted_network().prompt.set_class_embeddings(embeddings)
            source = f"text encoder {config.text_encoder} ({config.text_dim}-d, frozen, stored in the checkpoint)"
        self.print_to_log_file(
            f"SAT-style model: {config.num_classes} classes {list(config.prompts)}, {source}, "
            f"per-pixel embedding {config.embedding_dim}-d, region sampling '{self.lorkd_region_sampling}'",
            also_print_to_console=False,
        )
        self._init_class_bias()
        register_pretrained_loader(self.network, self.load_pretrained_weights)  # nnU-Net's -pretrained_weights

    def load_pretrained_weights(self, fname: str) -> PretrainedReport:
        """-pretrained_weights: the U-Net body from any nnU-Net checkpoint of these plans (vanilla, MTL, LoRKD's W0,
        SAT-style); its seg layers (embeddings here, classes there) and the prompt head stay fresh."""
        if not self.was_initialized:
            self.initialize()
        source = read_source_checkpoint(fname, class_names=False)
        report = load_pretrained_into(self.network, source, None, body_prefix="unet.")
        self.print_to_log_file(report.summary())
        return report

    def _init_class_bias(self) -> None:
        """Start class k at sigmoid = its foreground prior (fraction of class-k voxels in the training cases annotated
        for k) instead of 0.5 everywhere. Runs in initialize(), so a checkpoint being resumed or pretrained weights
        loaded afterwards replace it."""
        start = time.perf_counter()
        dataset_tr, _ = self.get_tr_and_val_datasets()
        by_region: dict[int, list[str]] = {}
        for case in dataset_tr.identifiers:
            by_region.setdefault(self.region_map.region_of_case(case), []).append(case)
        cases = [
            (case, region)
            for region, members in sorted(by_region.items())
            for case in subsample_evenly(members, self.sat_prior_cases_per_region)
        ]

        def segmentations():
            for case, region in cases:
                yield np.asarray(dataset_tr.load_case(case)[1][:]), self.region_map.label_values(region)

        config = self.sat_config
        priors = foreground_priors(segmentations(), config.num_classes)
        self._prompted_network().prompt.init_class_bias(priors.priors)
        rows = zip(config.class_names, priors.priors, priors.measured, strict=True)
        measured = ", ".join(f"{name} {prior:.4g}" for name, prior, was_measured in rows if was_measured)
        self.print_to_log_file(
            f"SAT-style model: class bias = logit(foreground prior) from {priors.num_cases} training cases "
            f"(at most {self.sat_prior_cases_per_region} per region, {time.perf_counter() - start:.1f} s): {measured}",
            also_print_to_console=False,
        )
        if priors.fallback_classes:
            names = [config.class_names[k] for k in priors.fallback_classes]
            self.print_to_log_file(
                f"SAT-style model: no training case of this fold annotates {names}; their bias starts at the fixed "
                f"fallback prior logit({priors.priors[priors.fallback_classes[0]]:g})",
                also_print_to_console=True,
            )

    def _prompted_network(self) -> PromptedUNet:
        net = unwrap_network(self.network)
        if not isinstance(net, PromptedUNet):
            raise RuntimeError(f"expected a PromptedUNet, the network is {type(net).__name__}")
        return net

    def _build_loss(self) -> nn.Module:
        loss = MaskedSigmoidDiceBCELoss(batch_dice=self.configuration_manager.batch_dice)
        if not self.enable_deep_supervision:
            return DeepSupervisionPartialLoss(loss)
        weights = np.array([1 / (2**i) for i in range(len(self._get_deep_supervision_scales()))])
        weights[-1] = 1e-6 if self.is_ddp else 0  # DDP needs the lowest head in the graph
        return DeepSupervisionPartialLoss(loss, (weights / weights.sum()).tolist())

    # ------------------------------------------------------------------------------------------- data
    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.lorkd_region_sampling == "balanced":
            dataset_tr.lorkd_sampling_probabilities = region_balanced_probabilities(
                dataset_tr.identifiers, self.region_map
            )
        elif self.lorkd_region_sampling != "cases":
            raise ValueError(f"lorkd_region_sampling must be 'balanced' or 'cases', got {self.lorkd_region_sampling!r}")
        return dataset_tr, dataset_val

    def do_split(self):
        """Without a splits_final.json (lorkd-merge writes one), create a region-stratified one instead of
        nnU-Net's region-blind default."""
        splits_file = os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and not os.path.isfile(splits_file):
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            cases = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
            save_json(splits_for_cases(self.region_map, cases), splits_file)
            self.print_to_log_file(f"Created a region-stratified 5-fold split: {splits_file}")
        return super().do_split()

    def get_dataloaders(self):
        with balanced_loaders():
            return super().get_dataloaders()

    def _class_mask(self, case_ids: list[str]) -> torch.Tensor:
        return self.region_class_mask[self.region_map.region_ids(case_ids)].to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, batch: dict) -> dict:
        self.loss.set_class_mask(self._class_mask(batch["keys"]))
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        """Validation loss plus pseudo-Dice over each sample's annotated classes: the label map is the argmax over
        background and those classes (what the final validation predicts), each class counted only on samples
        annotated for it."""
        class_mask = self._class_mask(batch["keys"])
        self.loss.set_class_mask(class_mask)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device)
        )
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        spatial = [1] * (output.ndim - 2)
        logits = output.float().masked_fill(~class_mask.view(*class_mask.shape, *spatial), float("-inf"))
        onehot = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=list(range(2, output.ndim)))
        annotated = class_mask.float()
        stats = [(s * annotated).sum(0)[1:].detach().cpu().numpy() for s in (tp, fp, fn)]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": stats[0], "fp_hard": stats[1], "fn_hard": stats[2]}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        with np.errstate(invalid="ignore", divide="ignore"):  # classes not validated this epoch are NaN
            super().on_validation_epoch_end(val_outputs)
        dice = np.array(self.logger.get_value("dice_per_class_or_region", step=-1), dtype=float)
        per_region = []
        for region in range(self.region_map.num_regions):
            values = dice[np.array(self.region_map.label_values(region)) - 1]
            per_region.append(float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"))
        self.logger.log(REGION_DICE_KEY, per_region, self.current_epoch)
        self.print_to_log_file(
            "Pseudo dice per region: "
            + ", ".join(f"{n} {d:.4f}" for n, d in zip(self.region_map.names, per_region, strict=True))
        )

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's, plus resuming a run from before the cosine head (prompt.head_version 1): the network loads with
        the old formula (see ClassPromptHead), and its optimiser state, which lacks prompt.logit_scale, gets that
        parameter inserted at its place in the parameter order, with no momentum yet."""
        if not self.was_initialized:
            self.initialize()
        optimizer = self.optimizer
        own_load = optimizer.load_state_dict

        def load_state_dict(state: dict) -> None:
            names = [n for n, _ in self._prompted_network().named_parameters()]
            groups = state.get("param_groups", [])
            if self._prompted_network().prompt.legacy and len(groups) == 1 and len(optimizer.param_groups) == 1:
                stored = list(groups[0]["params"])
                if len(stored) == len(names) - 1:  # ids map to parameters by position: give logit_scale a new id
                    at = names.index("prompt.logit_scale")
                    params = [*stored[:at], max(stored, default=-1) + 1, *stored[at:]]
                    state = {**state, "param_groups": [{**groups[0], "params": params}]}
            own_load(state)

        optimizer.load_state_dict = load_state_dict
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            del optimizer.load_state_dict
        self.logger.local_logger.my_fantastic_logging.setdefault(REGION_DICE_KEY, [])

    # ------------------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation with every case predicted over its annotated classes only (unannotated classes may
        really be present in a case, and its reference cannot score them); then a per-region Dice summary."""
        restriction = OutputRestriction(self.network)
        num_classes = self.label_manager.num_segmentation_heads

        def on_case(case_id: str) -> None:
            region = self.region_map.region_of_case(case_id)
            restriction.set_allowed(self.region_map.channels(region), num_classes, self.device)

        base_dataset_class = self.dataset_class
        self.dataset_class = ROUTED_DATASET_FOR.get(base_dataset_class, base_dataset_class)
        if self.dataset_class is base_dataset_class:
            raise RuntimeError(
                f"{type(self).__name__} cannot restrict validation cases of dataset class {base_dataset_class}"
            )
        try:
            with case_hook(on_case):
                super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = base_dataset_class
            restriction.remove()
        if self.local_rank == 0:
            self._summarize_by_region()

    def _summarize_by_region(self) -> None:
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if not os.path.isfile(summary_file):
            return
        per_region = summarize_validation_by_region(summary_file, self.region_map, self.dataset_json["file_ending"])
        with open(os.path.join(self.output_folder, "validation", "summary_lorkd_regions.json"), "w") as f:
            json.dump(per_region, f, indent=2)
        for name, values in per_region.items():
            self.print_to_log_file(
                f"Final validation, region {name}: mean Dice {values['mean_dice']:.4f} "
                f"over {values['num_cases']} cases",
                also_print_to_console=True,
            )


class nnUNetTrainerSATStyle_learnedEmbeddings(nnUNetTrainerSATStyle):
    """Ablation without a text model: one learned embedding per class instead of its embedded name."""

    sat_text_encoder = None


nnUNetTrainerSATStyle_smoke = smoke_variant(nnUNetTrainerSATStyle, __name__)


def _length_variant(epochs: int) -> type[nnUNetTrainerSATStyle]:
    return length_variant(nnUNetTrainerSATStyle, epochs, __name__)


# the same training lengths nnU-Net offers for nnUNetTrainer
nnUNetTrainerSATStyle_1epoch = _length_variant(1)
nnUNetTrainerSATStyle_5epochs = _length_variant(5)
nnUNetTrainerSATStyle_10epochs = _length_variant(10)
nnUNetTrainerSATStyle_20epochs = _length_variant(20)
nnUNetTrainerSATStyle_50epochs = _length_variant(50)
nnUNetTrainerSATStyle_100epochs = _length_variant(100)
nnUNetTrainerSATStyle_250epochs = _length_variant(250)
nnUNetTrainerSATStyle_500epochs = _length_variant(500)
nnUNetTrainerSATStyle_2000epochs = _length_variant(2000)
nnUNetTrainerSATStyle_4000epochs = _length_variant(4000)
