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

import time

import numpy as np
from nnunetv2_lorkd_trainers._variants import length_variants, smoke_variant
from nnunetv2_lorkd_trainers.region_aware import RegionAwareTrainer
from torch import nn

from nnunetv2_lorkd.experts import unwrap_network
from nnunetv2_lorkd.nnunet.pretrained import (
    PretrainedReport,
    load_pretrained_into,
    read_source_checkpoint,
    register_pretrained_loader,
)
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


class nnUNetTrainerSATStyle(RegionAwareTrainer):
    """The class-prompted network (hooks ``_configure_network``, ``build_network_architecture``) trained with
    independent sigmoids (``_partial_label_loss``); everything region-aware comes from RegionAwareTrainer."""

    # None: learn one embedding per class instead of embedding its name (nnUNetTrainerSATStyle_learnedEmbeddings)
    sat_text_encoder: str | None = DEFAULT_TEXT_ENCODER
    sat_learned_embedding_dim: int = 64
    sat_embedding_dim: int = 32  # per-pixel embedding / query dimension (SAT-Nano: 64)
    sat_query_hidden_dim: int = 256
    # training cases per region read at initialisation to estimate the class foreground priors (bounded cost)
    sat_prior_cases_per_region: int = 16

    # ------------------------------------------------------------------------------------------- network
    def _configure_network(self, plans: dict, configuration: str, dataset_json: dict) -> None:
        """The class prompts and head layout, recorded in the plans (the predictor rebuilds the network from them)."""
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

    # The plans' U-Net as per-pixel embedder plus the class-prompt head, laid out by the plans' lorkd_sat
    build_network_architecture = staticmethod(build_prompted_network)

    def initialize(self) -> None:
        super().initialize()
        config = self.sat_config
        if not config.learned_embeddings:  # the class names, embedded once by the frozen text encoder
            self._prompted_network().prompt.set_class_embeddings(embed_texts(config.prompts, config.text_encoder))
        self._init_class_bias()
        register_pretrained_loader(self.network, self.load_pretrained_weights)  # nnU-Net's -pretrained_weights

    def _describe_network(self) -> str:
        config = self.sat_config
        if config.learned_embeddings:
            source = f"learned class embeddings ({config.text_dim}-d)"
        else:
            source = f"text encoder {config.text_encoder} ({config.text_dim}-d, frozen, stored in the checkpoint)"
        return (
            f"SAT-style model: {config.num_classes} classes {list(config.prompts)}, {source}, "
            f"per-pixel embedding {config.embedding_dim}-d, region sampling '{self.lorkd_region_sampling}'"
        )

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

    def _partial_label_loss(self) -> nn.Module:
        return MaskedSigmoidDiceBCELoss(batch_dice=self.configuration_manager.batch_dice)

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


class nnUNetTrainerSATStyle_learnedEmbeddings(nnUNetTrainerSATStyle):
    """Ablation without a text model: one learned embedding per class instead of its embedded name."""

    sat_text_encoder = None


nnUNetTrainerSATStyle_smoke = smoke_variant(nnUNetTrainerSATStyle, __name__)

# the same training lengths nnU-Net offers for nnUNetTrainer: nnUNetTrainerSATStyle_1epoch ... _4000epochs
_LENGTH_VARIANTS = length_variants(nnUNetTrainerSATStyle, __name__)
globals().update(_LENGTH_VARIANTS)
__all__ = [
    "nnUNetTrainerSATStyle",
    "nnUNetTrainerSATStyle_learnedEmbeddings",
    "nnUNetTrainerSATStyle_smoke",
    *_LENGTH_VARIANTS,
]
