"""What every loss in this package shares: ``F.ctc_loss``'s reductions and ``zero_infinity``, the compute dtype,
and :class:`CTCLossBase`, the module that owns ``blank``, ``reduction`` and ``zero_infinity``.
"""

from __future__ import annotations

import torch
from torch import nn

from losses.targets import LengthsLike

REDUCTIONS = ("none", "mean", "sum")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, else the input dtype (float32 / float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_losses(losses: torch.Tensor, target_lengths: torch.Tensor, reduction: str) -> torch.Tensor:
    """``F.ctc_loss``'s reductions of ``(B,)`` per-sample losses: ``"none"`` -> ``(B,)``, ``"sum"``, or ``"mean"``
    (each loss divided by its target length, at least 1, then averaged over the batch)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return (losses / target_lengths.clamp_min(1).to(losses.dtype)).mean()


def finish_loss(losses: torch.Tensor, target_lengths: LengthsLike, reduction: str, zero_infinity: bool):
    """Apply ``zero_infinity`` (inf -> 0 with zero gradient) and the ``F.ctc_loss`` reduction to ``(B,)`` losses.

    ``target_lengths``: ``(B,)`` integers (a tensor or a sequence of ints).
    """
    if zero_infinity:
        losses = torch.where(losses.isinf(), torch.zeros_like(losses), losses)
    return reduce_losses(losses, torch.as_tensor(target_lengths, device=losses.device), reduction)


class CTCLossBase(nn.Module):
    """Base of every loss module here: ``forward`` takes ``F.ctc_loss``'s tensors, ``blank``, ``reduction`` and
    ``zero_infinity`` mean what they mean there.

    ``reduction`` is checked here; ``blank`` is checked against the number of classes when the loss is computed.
    Subclasses compute ``(B,)`` per-sample losses and return :meth:`finish` of them.
    """

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False):
        super().__init__()
        check_reduction(reduction)
        self.blank, self.reduction, self.zero_infinity = blank, reduction, zero_infinity

    def finish(self, losses: torch.Tensor, target_lengths: LengthsLike) -> torch.Tensor:
        """``(B,)`` per-sample losses with this module's ``zero_infinity`` and ``reduction`` applied."""
        return finish_loss(losses, target_lengths, self.reduction, self.zero_infinity)

    def extra_repr(self) -> str:
        return f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}"
