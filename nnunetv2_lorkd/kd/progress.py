"""progress.png with a distillation panel.

nnU-Net's LocalLogger only plots the keys it knows. :class:`LoRKDLocalLogger` draws nnU-Net's own panels
unchanged and adds one below them with the epoch means of the segmentation loss and the (unweighted) KD loss.
It does so by handing nnU-Net's plotting code a pyplot whose ``subplots`` makes one extra row, which it fills
first; everything else is nnU-Net's code and layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import matplotlib.pyplot as plt
import nnunetv2.training.logging.nnunet_logger as nnunet_logger
from nnunetv2.training.logging.nnunet_logger import LocalLogger

KD_LOSS_KEY = "lorkd_kd_loss"
SEG_LOSS_KEY = "lorkd_seg_loss"
KD_KEYS = (KD_LOSS_KEY, SEG_LOSS_KEY)


class _PyplotWithExtraRow:
    def __init__(self, draw) -> None:
        self._draw = draw

    def subplots(self, nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
        if figsize is not None:
            figsize = (figsize[0], figsize[1] * (nrows + 1) / nrows)
        fig, axes = plt.subplots(nrows + 1, ncols, figsize=figsize, **kwargs)
        self._draw(axes[-1])
        return fig, axes[:-1]

    def __getattr__(self, name: str):
        return getattr(plt, name)


@contextlib.contextmanager
def _extra_row(draw) -> Iterator[None]:
    original = nnunet_logger.plt
    nnunet_logger.plt = _PyplotWithExtraRow(draw)
    try:
        yield
    finally:
        nnunet_logger.plt = original


class LoRKDLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with the KD keys registered and plotted."""

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.ensure_keys()

    def ensure_keys(self, num_epochs: int | None = None) -> None:
        """Register the KD keys; pad them with NaN up to ``num_epochs`` entries (a checkpoint from a run without
        them), since nnU-Net plots only as many epochs as its shortest list has."""
        for key in KD_KEYS:
            values = self.my_fantastic_logging.setdefault(key, [])
            if num_epochs is not None:
                values.extend([math.nan] * (num_epochs - len(values)))

    def load_checkpoint(self, checkpoint: dict) -> None:
        super().load_checkpoint(checkpoint)
        self.ensure_keys(len(self.my_fantastic_logging.get("train_losses", [])))

    def _has_kd_values(self) -> bool:
        return any(math.isfinite(v) for v in self.my_fantastic_logging.get(KD_LOSS_KEY, []))

    def _draw_kd(self, ax) -> None:
        epochs = min(len(v) for v in self.my_fantastic_logging.values())
        x = list(range(epochs))
        ax.plot(
            x, self.my_fantastic_logging[SEG_LOSS_KEY][:epochs], color="b", ls="-", label="seg loss (tr)", linewidth=4
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel("segmentation loss")
        ax.legend(loc=(0, 1))
        ax2 = ax.twinx()
        kd = self.my_fantastic_logging[KD_LOSS_KEY][:epochs]
        ax2.plot(x, kd, color="darkorange", ls="-", label="KD loss (tr, unweighted)", linewidth=4)
        ax2.set_ylabel("KD loss")
        ax2.legend(loc=(0.3, 1))

    def plot_progress_png(self, output_folder: str) -> None:
        if not self._has_kd_values():
            super().plot_progress_png(output_folder)
            return
        with _extra_row(self._draw_kd):
            super().plot_progress_png(output_folder)
