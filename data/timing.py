"""How much of training time the loop spends waiting for batches."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class DataWaitTimer(Callback):
    """Logs ``perf/data_wait_share``: the share of a training epoch spent outside training steps.

    Per epoch, *wait* is the wall time from the epoch start or the previous ``on_train_batch_end`` to
    the next ``on_train_batch_start`` (fetching the batch, incl. worker start-up on the first one,
    plus the loop's own small overhead), and *step* is the time from ``on_train_batch_start`` to
    ``on_train_batch_end`` (forward, backward, optimizer). Validation runs are not counted as wait.
    The logged value is ``wait / (wait + step)`` at the end of each training epoch; ``wait_s`` and
    ``step_s`` keep the last epoch's totals in seconds. On GPU, steps end when their kernels are
    queued, not finished, so the share is only indicative there.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.step_s = 0.0
        self._mark = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._mark = now - self._mark, now
        return elapsed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait_s = self.step_s = 0.0
        self._lap()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.wait_s += self._lap()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.step_s += self._lap()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lap()  # a mid-epoch validation run is neither data wait nor a training step

    @property
    def share(self) -> float:
        """``wait_s / (wait_s + step_s)`` for the current/last epoch (0 before any step)."""
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("perf/data_wait_share", self.share)
