"""Every callback of the project, each with a ``conf/callbacks/*.yaml``.

- :class:`DataWaitTimer`: ``perf/data_wait_share``, the share of training time spent waiting for batches.
- :class:`RNGStateCheckpoint`: global RNG states in checkpoints, so a resumed run continues exactly.
- :class:`FitClock`: ``time/fit_seconds`` with every validation (``scripts/sweep_report.py``'s time to a CER).
- :class:`PredictionWriter`: every test line's reference and prediction in ``test_predictions.tsv``
  (``scripts/sweep_report.py``'s per-character error rates; :func:`read_predictions` reads it back).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

__all__ = ["DataWaitTimer", "FitClock", "PredictionWriter", "RNGStateCheckpoint", "read_predictions"]


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


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states in every checkpoint and restores them when training resumes from one.

    Lightning restores weights, optimizer, scheduler, loop counters and callback states, but not the global
    generators: without this, dropout masks (torch) after a resume differ from those of an uninterrupted run.
    Covers ``torch`` (CPU and, when available, the current CUDA device), ``numpy.random`` and ``random``. The
    checkpoint holds rank 0's states; every process restores them, the CUDA one onto its own device (so a
    checkpoint also resumes on a machine with fewer GPUs). Exact for one process; under DDP the ranks are seeded
    alike, so exact as far as their draws are alike too (same batch shapes). The states
    are stored as tensors, ints and strings only, so checkpoints still load with ``torch.load(weights_only=True)``.
    Data order needs nothing here: the samplers derive it from ``(seed, epoch)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        return {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"][0])
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, state, gauss = state_dict["python"]
        random.setstate((version, tuple(state), gauss))


class FitClock(Callback):
    """Logs ``time/fit_seconds``: wall time since the start of training, at the end of every validation run.

    The clock starts in ``on_train_start`` (after Lightning's sanity check), so the value includes
    training steps, data loading and earlier validation runs: the cost of getting to this checkpoint.
    Nothing is logged during the sanity check or after ``fit`` (e.g. by a later ``trainer.validate``).
    The time is saved in checkpoints, so a resumed run goes on counting from where it was saved.
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.offset = 0.0  # seconds before this process's fit (restored from a checkpoint)

    def elapsed(self) -> float:
        """Fit seconds so far, earlier processes' included."""
        return self.offset + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start is None or trainer.sanity_checking:
            return
        pl_module.log("time/fit_seconds", self.elapsed())

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.offset = float(state_dict["elapsed"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = None


class PredictionWriter(Callback):
    """Writes every test line's reference and prediction to ``<dirpath>/test_predictions.tsv``.

    One line per sample, ``target<TAB>prediction`` after a ``target\\tprediction`` header, in loader order
    (texts never contain tabs or newlines). Under a multi-process strategy each rank writes its own shard,
    ``test_predictions.rank<R>.tsv``; :func:`read_predictions` reads either layout.

    Predictions are taken from the ``test_step`` output ``{"preds": [...]}`` of
    :class:`crnn.module.CRNNModule`.

    Args:
        dirpath: directory of the file (created if missing), e.g. the run's output directory.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._rows: list[tuple[str, str]] = []

    def path(self, trainer: pl.Trainer) -> Path:
        """The file this rank writes."""
        name = "test_predictions.tsv" if trainer.world_size == 1 else f"test_predictions.rank{trainer.global_rank}.tsv"
        return self.dirpath / name

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            raise TypeError(f"PredictionWriter needs test_step to return {{'preds': texts}}, got {type(outputs).__name__}")
        preds = outputs["preds"]
        self._rows.extend(zip(batch["texts"], preds))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("target\tprediction\n")
            f.writelines(f"{target}\t{pred}\n" for target, pred in self._rows)
        self._rows = []


def read_predictions(dirpath: str | Path) -> list[tuple[str, str]]:
    """``(target, prediction)`` pairs from ``test_predictions.tsv`` or all its ``.rank<R>`` shards in
    ``dirpath`` (an empty list if there is none)."""
    dirpath = Path(dirpath)
    files = [dirpath / "test_predictions.tsv"]
    if not files[0].exists():
        files = sorted(dirpath.glob("test_predictions.rank*.tsv"))
    pairs = []
    for file in files:
        lines = file.read_text(encoding="utf-8").split("\n")[1:]  # drop the header
        pairs.extend(tuple(line.split("\t", 1)) for line in lines if line)
    return pairs
