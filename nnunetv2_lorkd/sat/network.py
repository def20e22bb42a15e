"""The SAT-style prompted segmentation network: an nnU-Net U-Net gives per-pixel embeddings, every class is
prompted by its name, and a class's logit map is the scaled cosine of its query with those embeddings.

Output layout (what nnU-Net sees): ``(B, 1 + K, *spatial)`` per deep-supervision scale, channel 0 a constant
zero "background" logit and channel k the logit of class k. With this layout nnU-Net's softmax + argmax picks
"the most confident class whose sigmoid is above 0.5, else background" (softmax is monotone in the logits and
sigmoid(l) > 0.5 exactly when l > 0), so the ordinary predictor writes a normal label map.

Imports nothing from nnU-Net: the U-Net is built by the caller (see :func:`build_prompted_network`, which
imports nnU-Net lazily) and known here only through its ``encoder``/``decoder`` attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

PLANS_KEY = "lorkd_sat"
SCHEMA_VERSION = 1
# prompt head formula stored in checkpoints as ``prompt.head_version``: 1 = <q, e> / sqrt(D) + b on the raw class
# embeddings (before issue 15), 2 = learned-scale cosine on centred class embeddings (ClassPromptHead)
HEAD_VERSION = 2
PIXEL_NORM_EPS = 1e-6


class SATConfigError(RuntimeError):
    """The plans carry no (or an unusable) SAT-style configuration."""


@dataclass(frozen=True)
class SATConfig:
    """Everything needed to rebuild the prompted network from plans.json (the embeddings themselves live in the
    checkpoint as a persistent buffer, so prediction needs no text model)."""

    class_names: tuple[str, ...]  # output channel k+1 is class_names[k] (dataset.json label value k+1)
    prompts: tuple[str, ...]  # the text each class was embedded from
    text_encoder: str | None  # None: learned class embeddings instead of text
    text_dim: int
    embedding_dim: int = 32  # per-pixel embedding / query dimension
    query_hidden_dim: int = 256
    version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.prompts):
            raise SATConfigError(f"{len(self.class_names)} class names but {len(self.prompts)} prompts")
        if not self.class_names:
            raise SATConfigError("a SAT-style model needs at least one class")
        for name, value in (("text_dim", self.text_dim), ("embedding_dim", self.embedding_dim),
                            ("query_hidden_dim", self.query_hidden_dim)):  # fmt: skip
            if int(value) < 1:
                raise SATConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def learned_embeddings(self) -> bool:
        return self.text_encoder is None

    # ------------------------------------------------------------------------------------ plans storage
    def to_json(self) -> dict:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["prompts"] = list(self.prompts)
        return data

    @classmethod
    def from_configuration(cls, configuration: Mapping) -> SATConfig:
        data = configuration.get(PLANS_KEY)
        if data is None:
            raise SATConfigError(
                f"the plans configuration has no '{PLANS_KEY}' entry, so the class prompts are unknown. This model "
                "folder was not written by nnUNetTrainerSATStyle (or its plans.json was replaced)."
            )
        data = dict(data)
        if data.get("version") != SCHEMA_VERSION:
            raise SATConfigError(f"{PLANS_KEY}.version {data.get('version')!r} is not supported (expected 1)")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise SATConfigError(f"{PLANS_KEY} has unknown keys {sorted(unknown)}")
        data["class_names"] = tuple(data["class_names"])
        data["prompts"] = tuple(data["prompts"])
        return cls(**data)

    def store_in(self, plans: dict, configuration_name: str, configuration: dict) -> None:
        """Write into the raw plans (saved as plans.json and in checkpoints) and the resolved configuration."""
        plans["configurations"][configuration_name][PLANS_KEY] = self.to_json()
        configuration[PLANS_KEY] = self.to_json()


class ClassPromptHead(nn.Module):
    """Class queries from class-name embeddings, and logits as a scaled cosine of query and per-pixel embedding.

    logit_k(v) = s · cos(q_k, e(v)) + b_k, with q_k = MLP(t̃_k) and s = exp(logit_scale) learned. ``t`` is either a
    frozen persistent buffer (text embeddings, filled once by :meth:`set_class_embeddings` or loaded from a
    checkpoint) or a learned parameter; t̃ is t centred over the classes and rescaled to norm sqrt(text_dim).

    Why: sentence embeddings of anatomy names share a large common component, and a default-initialised MLP maps
    them to nearly parallel queries (pairwise cosine ~0.97 for the demo's 36 names); centring removes the common
    part (~0.1 after), and unit-variance inputs let the MLP's weights, not its biases, decide the query. The cosine
    makes the initial logit spread independent of the backbone's output scale: a random direction has a cosine
    spread of 1/sqrt(D), so s starts at sqrt(D) (logits spread ~1) and is learned from there. The trainer starts
    b_k at logit(foreground prior) (:meth:`init_class_bias`) instead of sigmoid 0.5 everywhere.

    ``head_version`` (a persistent buffer) says which formula a checkpoint was trained with. Checkpoints written
    before the cosine head have neither ``head_version`` nor ``logit_scale``; they load as version 1, the old
    formula ``<q_k, e(v)> / sqrt(D) + b_k`` on the raw embeddings (s = 1/sqrt(D), equal to the old logits up to
    float rounding; if such a model is trained further, s is learned like in version 2).
    """

    def __init__(self, config: SATConfig):
        super().__init__()
        self.num_classes = config.num_classes
        self.embedding_dim = config.embedding_dim
        shape = (config.num_classes, config.text_dim)
        if config.learned_embeddings:
            self.class_embeddings = nn.Parameter(torch.randn(shape) / math.sqrt(config.text_dim))
            self._embeddings_ready = True
        else:
            self.register_buffer("class_embeddings", torch.zeros(shape), persistent=True)
            self._embeddings_ready = False
        self.query_mlp = nn.Sequential(
            nn.Linear(config.text_dim, config.query_hidden_dim),
            nn.GELU(),
            nn.Linear(config.query_hidden_dim, config.embedding_dim),
        )
        self.class_bias = nn.Parameter(torch.zeros(config.num_classes))
        self.logit_scale = nn.Parameter(torch.tensor(0.5 * math.log(config.embedding_dim)))
        self.register_buffer("head_version", torch.tensor(HEAD_VERSION, dtype=torch.long), persistent=True)
        self._legacy = False

    @property
    def learned(self) -> bool:
        return isinstance(self.class_embeddings, nn.Parameter)

    @property
    def legacy(self) -> bool:
        """True for a version-1 model (trained before the cosine head): raw embeddings, dot product."""
        return self._legacy

    def set_class_embeddings(self, embeddings: torch.Tensor) -> None:
        if self.learned:
            raise SATConfigError("this model learns its class embeddings; there is no text embedding to set")
        if tuple(embeddings.shape) != tuple(self.class_embeddings.shape):
            raise SATConfigError(
                f"class embeddings of shape {tuple(embeddings.shape)} do not fit the model's "
                f"{tuple(self.class_embeddings.shape)} (classes x text dimension)"
            )
        with torch.no_grad():
            self.class_embeddings.copy_(embeddings.to(self.class_embeddings))
        self._embeddings_ready = True

    def init_class_bias(self, priors: Sequence[float] | torch.Tensor) -> None:
        """Start class k at sigmoid = priors[k] everywhere (b_k = logit(prior)): the loss then starts from calibrated
        background predictions instead of spending its first iterations pushing every voxel down from 0.5."""
        values = torch.as_tensor(priors, dtype=torch.float64).flatten()
        if values.numel() != self.num_classes:
            raise SATConfigError(f"{values.numel()} priors for {self.num_classes} classes")
        if not bool(((values > 0) & (values < 1)).all()):
            raise SATConfigError(f"priors must lie strictly between 0 and 1, got {values.tolist()}")
        with torch.no_grad():
            self.class_bias.copy_(torch.logit(values).to(self.class_bias))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        scale_key, version_key = prefix + "logit_scale", prefix + "head_version"
        if scale_key not in state_dict and version_key not in state_dict:  # written before the cosine head
            state_dict[version_key] = torch.tensor(1, dtype=torch.long)
            state_dict[scale_key] = torch.tensor(-0.5 * math.log(self.embedding_dim))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        version = int(self.head_version)
        if version not in (1, HEAD_VERSION):
            raise SATConfigError(f"prompt head version {version} is not supported (known: 1, {HEAD_VERSION})")
        self._legacy = version == 1
        if prefix + "class_embeddings" in state_dict:  # a checkpoint carries the embeddings it was trained with
            self._embeddings_ready = True

    def _query_inputs(self) -> torch.Tensor:
        embeddings = self.class_embeddings
        if self._legacy:
            return embeddings
        if embeddings.shape[0] > 1:  # centred over all classes, so a subset's queries equal the full model's
            embeddings = embeddings - embeddings.mean(0, keepdim=True)
        return F.normalize(embeddings, dim=1) * math.sqrt(embeddings.shape[1])

    def queries(self, class_indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K', D) class queries (unit length unless legacy) and (K',) biases, for all or the given classes."""
        if not self._embeddings_ready:
            raise SATConfigError(
                "the class-name embeddings were never set: load a trained checkpoint, or call "
                "set_class_embeddings() with the text encoder's embeddings before the first forward"
            )
        queries, bias = self.query_mlp(self._query_inputs()), self.class_bias
        if class_indices is not None:
            index = torch.as_tensor(list(class_indices), dtype=torch.long, device=queries.device)
            queries, bias = queries.index_select(0, index), bias.index_select(0, index)
        if not self._legacy:
            queries = F.normalize(queries, dim=1)
        return queries, bias

    def forward(self, pixel_embeddings: torch.Tensor, class_indices: Sequence[int] | None = None) -> torch.Tensor:
        """(B, D, *spatial) embeddings -> (B, K', *spatial) class logits, in the embeddings' dtype."""
        queries, bias = self.queries(class_indices)
        logits = torch.einsum("bd...,kd->bk...", pixel_embeddings, queries.to(pixel_embeddings.dtype))
        bias = bias.view(1, -1, *([1] * (pixel_embeddings.dim() - 2)))
        if self._legacy:
            return logits * self.logit_scale.exp().to(logits.dtype) + bias.to(logits.dtype)
        # cosine: divide by the per-voxel norm in float32 (a half-precision norm can underflow)
        norm = torch.linalg.vector_norm(pixel_embeddings, dim=1, keepdim=True, dtype=torch.float32)
        scaled = logits.float() * (self.logit_scale.float().exp() / norm.clamp_min(PIXEL_NORM_EPS))
        return (scaled + bias.float()).to(logits.dtype)


class PromptedUNet(nn.Module):
    """A dynamic-network-architectures U-Net (built with ``num_classes = embedding_dim``) plus the prompt head.

    ``decoder`` and ``encoder`` point at the U-Net's, so nnU-Net's ``set_deep_supervision_enabled`` works.
    """

    def __init__(self, unet: nn.Module, config: SATConfig):
        super().__init__()
        for attribute in ("encoder", "decoder"):
            if not hasattr(unet, attribute):
                raise SATConfigError(
                    f"the backbone {type(unet).__name__} has no '{attribute}'; expected an nnU-Net U-Net"
                )
        self.unet = unet
        self.prompt = ClassPromptHead(config)

    @property
    def encoder(self) -> nn.Module:
        return self.unet.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    @property
    def num_classes(self) -> int:
        return self.prompt.num_classes

    def _with_background(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.prompt(embeddings)
        return torch.cat((logits.new_zeros((logits.shape[0], 1, *logits.shape[2:])), logits), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, 1 + K, ...) per scale: a zero background channel, then the class logits."""
        embeddings = self.unet(x)
        if isinstance(embeddings, list | tuple):
            return [self._with_background(e) for e in embeddings]
        return self._with_background(embeddings)

    def class_logits(self, x: torch.Tensor, class_indices: Sequence[int]) -> torch.Tensor:
        """Full-resolution logits of the given classes only (0-based class indices), (B, len, *spatial)."""
        embeddings = self.unet(x)
        if isinstance(embeddings, list | tuple):
            embeddings = embeddings[0]
        return self.prompt(embeddings, class_indices)


def class_prompt(label_name: str) -> str:
    """The text a dataset.json label name is embedded from: separators become spaces ("femur_left" ->
    "femur left"), since the sentence encoder was trained on natural text."""
    return " ".join(label_name.replace("_", " ").replace("-", " ").split())


def foreground_label_names(dataset_json: Mapping) -> tuple[str, ...]:
    """Foreground label names in output-channel order (label value 1..K), refusing what the prompted network
    cannot represent: nnU-Net regions (overlapping label groups) and non-consecutive values."""
    labels = dataset_json.get("labels", {})
    plain: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise SATConfigError(
                f"label '{name}' is {value!r}; the SAT-style model needs plain integer labels (every class is its "
                "own sigmoid already, nnU-Net regions are not needed)"
            )
        plain[value] = name
    values = sorted(v for v in plain if v != 0)
    if values != list(range(1, len(values) + 1)):
        raise SATConfigError(f"foreground label values must be 1..K without gaps, got {values}")
    return tuple(plain[v] for v in values)


def build_prompted_network(
    plans_manager,
    configuration_manager,
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool = True,
) -> PromptedUNet:
    """The plans' U-Net (PlainConvUNet, ResidualEncoderUNet, 2D or 3D) with ``embedding_dim`` outputs per scale,
    wrapped with the prompt head; the layout comes from the plans' ``lorkd_sat`` entry."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    config = SATConfig.from_configuration(configuration_manager.configuration)
    if num_output_channels != config.num_classes + 1:
        raise SATConfigError(
            f"nnU-Net asks for {num_output_channels} output channels but the plans' {PLANS_KEY} lists "
            f"{config.num_classes} classes (+1 background); dataset.json and plans.json do not belong together"
        )
    unet = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, config.embedding_dim, enable_deep_supervision
    )
    return PromptedUNet(unet, config)
