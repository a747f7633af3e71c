"""Text-recognition metrics: character error rate, exact-match accuracy, normalised edit distance, under an
evaluation protocol.

Ratios are accumulated as sums (edits, reference characters, lines, ...) and divided only in
``compute``, so a metric reduced across processes equals the metric over all their data.

A protocol maps label and prediction alike before they are compared (:func:`normalize`):

- ``raw``: as they are;
- ``caseless``: lowercased (``str.lower``);
- ``alnum36``: lowercased, then only ``0-9a-z`` kept: the scene-text benchmarks' 36-character protocol
  (deep-text-recognition-benchmark's and parseq's evaluation; a label with nothing left is an empty reference).

``nfkc=True`` first applies Unicode NFKC normalisation (compatibility forms such as ligatures, full-width
letters and composed accents compare equal to their plain forms).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import editdistance
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PROTOCOLS", "TextMetrics", "character_error_rate", "normalize", "normalized_edit_distance",
           "sequence_accuracy"]

PROTOCOLS = ("raw", "caseless", "alnum36")
_NOT_ALNUM36 = re.compile("[^0-9a-z]")


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else ``ValueError`` naming the choices."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    return protocol


def normalize(text: str, protocol: str = "raw", nfkc: bool = False) -> str:
    """``text`` as the evaluation ``protocol`` compares it (see the module), NFKC-normalised first if ``nfkc``."""
    check_protocol(protocol)
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    if protocol == "raw":
        return text
    text = text.lower()
    return _NOT_ALNUM36.sub("", text) if protocol == "alnum36" else text


class TextMetrics(Metric):
    """Character error rate, sequence accuracy and normalised edit distance over text lines.

    ``update(preds, targets)`` takes equal-length lists of predicted and reference strings, both mapped by
    :func:`normalize` with ``protocol`` and ``nfkc``; ``compute()`` returns float tensors ``{"cer", "acc", "ned"}``
    of the mapped strings:

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

    def __init__(self, protocol: str = "raw", nfkc: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.protocol, self.nfkc = check_protocol(protocol), nfkc
        for name in ("edits", "ref_chars", "exact", "lines", "ned_sum"):
            dtype = torch.float64 if name == "ned_sum" else torch.int64
            self.add_state(name, default=torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")

    @property
    def protocol_name(self) -> str:
        """The protocol, ``+nfkc`` appended if NFKC normalisation is on (e.g. ``alnum36+nfkc``)."""
        return self.protocol + "+nfkc" * self.nfkc

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Accumulate sums over lines; ``preds`` and ``targets`` are equal-length sequences of str."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        if self.protocol != "raw" or self.nfkc:
            preds = [normalize(text, self.protocol, self.nfkc) for text in preds]
            targets = [normalize(text, self.protocol, self.nfkc) for text in targets]
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


def character_error_rate(preds: Sequence[str], targets: Sequence[str], protocol: str = "raw",
                         nfkc: bool = False) -> float:
    """Total edit distance / max(total reference characters, 1), under ``protocol``."""
    return _functional(preds, targets, protocol, nfkc)["cer"]


def sequence_accuracy(preds: Sequence[str], targets: Sequence[str], protocol: str = "raw",
                      nfkc: bool = False) -> float:
    """Fraction of lines with ``pred == target`` under ``protocol`` (0 for no lines)."""
    return _functional(preds, targets, protocol, nfkc)["acc"]


def normalized_edit_distance(preds: Sequence[str], targets: Sequence[str], protocol: str = "raw",
                             nfkc: bool = False) -> float:
    """Mean over lines of edit distance / max(len(ref), len(pred), 1) under ``protocol`` (0 for no lines)."""
    return _functional(preds, targets, protocol, nfkc)["ned"]


def _functional(preds: Sequence[str], targets: Sequence[str], protocol: str, nfkc: bool) -> dict[str, float]:
    """All of :class:`TextMetrics` over one batch, as Python floats."""
    metric = TextMetrics(protocol, nfkc)
    metric.update(preds, targets)
    return {name: value.item() for name, value in metric.compute().items()}
