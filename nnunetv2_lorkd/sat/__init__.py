"""SAT-style universal segmentation inside nnU-Net: class-name prompts, per-pixel embeddings, one sigmoid per
class (see docs/teachers.md). The network and loss import nothing from nnU-Net; the text encoder is optional."""

from .loss import MaskedSigmoidDiceBCELoss
from .network import (
    HEAD_VERSION,
    PLANS_KEY,
    ClassPromptHead,
    PromptedUNet,
    SATConfig,
    SATConfigError,
    build_prompted_network,
    class_prompt,
    foreground_label_names,
)
from .priors import FALLBACK_PRIOR, PRIOR_RANGE, ForegroundPriors, foreground_priors, subsample_evenly
from .text import DEFAULT_TEXT_ENCODER, TextEncoderError, embed_texts, text_dim

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "FALLBACK_PRIOR",
    "HEAD_VERSION",
    "PLANS_KEY",
    "PRIOR_RANGE",
    "ClassPromptHead",
    "ForegroundPriors",
    "MaskedSigmoidDiceBCELoss",
    "PromptedUNet",
    "SATConfig",
    "SATConfigError",
    "TextEncoderError",
    "build_prompted_network",
    "class_prompt",
    "embed_texts",
    "foreground_label_names",
    "foreground_priors",
    "subsample_evenly",
    "text_dim",
]
