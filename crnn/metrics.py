"""Text-recognition metrics: character error rate, exact-match accuracy, normalised edit distance.

Ratios are accumulated as sums (edits, reference characters, lines, ...) and divided only in
``compute``, so a metric reduced across processes equals the metric over all their data.
"""

from __future__ import annotations

from collections.abc import Sequence

import editdistance
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TextMetrics", "character_error_rate", "normalized_edit_distance", "sequence_accuracy"]


class TextMetrics(Metric):
    """Character error rate, sequence accuracy and normalised edit distance over text lines.

    ``update(preds, targets)`` takes equal-length lists of predicted and reference strings;
    ``compute()`` returns float tensors ``{"cer", "acc", "ned"}``:

    - ``cer``: total Levenshtein distance / max(total reference characters, 1). If every
      reference is empty this is the number of inserted characters (0 when all predictions are
      empty too), never NaN or inf.
    - ``acc``: fraction of lines predicted exactly.
    - ``ned``: mean over lines of distance / max(len(ref), len(pred), 1), in [0, 1].

    Before any line is seen all three are 0 (nothing measured, nothing wrong).
    """

    full_state_update = False
    higher_is_better = None  # cer/ned: lower, acc: higher
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("edits", "ref_chars", "exact", "lines", "ned_sum"):
            dtype = torch.float64 if name == "ned_sum" else torch.int64
            self.add_state(name, default=torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Accumulate sums over lines; ``preds`` and ``targets`` are equal-length sequences of str."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        distances = [editdistance.eval(pred, target) for pred, target in zip(preds, targets)]
        self.edits += sum(distances)
        self.ref_chars += sum(len(target) for target in targets)
        self.exact += sum(pred == target for pred, target in zip(preds, targets))
        self.lines += len(targets)
        self.ned_sum += sum(
            distance / max(len(pred), len(target), 1)
            for distance, pred, target in zip(distances, preds, targets)
        )

    def compute(self) -> dict[str, Tensor]:
        """``{"cer", "acc", "ned"}`` as float32 scalar tensors."""
        lines = self.lines.clamp(min=1).double()
        return {
            "cer": (self.edits / self.ref_chars.clamp(min=1).double()).float(),
            "acc": (self.exact / lines).float(),
            "ned": (self.ned_sum / lines).float(),
        }


def character_error_rate(preds: Sequence[str], targets: Sequence[str]) -> float:
    """Total edit distance / max(total reference characters, 1)."""
    return _functional(preds, targets)["cer"]


def sequence_accuracy(preds: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of lines with ``pred == target`` (0 for no lines)."""
    return _functional(preds, targets)["acc"]


def normalized_edit_distance(preds: Sequence[str], targets: Sequence[str]) -> float:
    """Mean over lines of edit distance / max(len(ref), len(pred), 1) (0 for no lines)."""
    return _functional(preds, targets)["ned"]


def _functional(preds: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """All of :class:`TextMetrics` over one batch, as Python floats."""
    metric = TextMetrics()
    metric.update(preds, targets)
    return {name: value.item() for name, value in metric.compute().items()}
