"""Callbacks for sweeps and reports: a wall clock logged with validation, and a writer of test predictions.

Both feed ``scripts/sweep_report.py``: ``time/fit_seconds`` (in the CSV logger's ``metrics.csv``, on the
same row as ``val/cer``) gives the seconds to reach a CER, and ``test_predictions.tsv`` gives per-character
error rates.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

__all__ = ["FitClock", "PredictionWriter", "read_predictions"]


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
