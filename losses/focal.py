"""Focal CTC (Feng et al. 2019, "Focal CTC Loss for Chinese Optical Character Recognition on Unbalanced Datasets")."""

from __future__ import annotations

from typing import Callable

import torch

from losses.base import CTCLossBase, compute_dtype
from losses.ctc import ctc_loss


class FocalCTCLoss(CTCLossBase):
    """Per-sample ``alpha * (1 - exp(-L)) ** gamma * L`` with ``L`` the CTC negative log-likelihood.

    Well-recognised lines (``L`` near 0, ``p(l|x) = exp(-L)`` near 1) are down-weighted, so training
    focuses on hard ones. PaddleOCR uses ``alpha=1, gamma=2``. The weight is differentiated through by
    default (the paper's formula); ``detach_weight=True`` treats it as a constant per sample.

    ``forward(log_probs (T, B, C), targets, input_lengths (B,), target_lengths (B,))`` as for
    :func:`torch.nn.functional.ctc_loss`; ``reduction`` and ``zero_infinity`` likewise ('mean' divides
    each weighted loss by its target length, then averages). ``ctc`` is any CTC function with
    ``F.ctc_loss``'s signature (default: this package's alpha-beta :func:`losses.ctc_loss`).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        gamma: float = 2.0,
        detach_weight: bool = False,
        blank: int = 0,
        reduction: str = "mean",
        zero_infinity: bool = False,
        ctc: Callable[..., torch.Tensor] = ctc_loss,
    ):
        if alpha <= 0 or gamma < 0:
            raise ValueError(f"FocalCTCLoss needs alpha > 0 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        super().__init__(blank, reduction, zero_infinity)
        self.alpha, self.gamma, self.detach_weight, self.ctc = alpha, gamma, detach_weight, ctc

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        nll = self.ctc(
            log_probs, targets, input_lengths, target_lengths,
            blank=self.blank, reduction="none", zero_infinity=self.zero_infinity,
        )
        infinite = nll.isinf()
        finite_nll = torch.where(infinite, torch.zeros_like(nll), nll)  # inf * 0-gradient would give NaN
        weight = self.alpha * (-torch.expm1(-finite_nll)).clamp_min(0.0) ** self.gamma  # 1 - p(l|x)
        if self.detach_weight:
            weight = weight.detach()
        losses = torch.where(infinite, nll, weight * finite_nll)
        return self.finish(losses, target_lengths)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, detach_weight={self.detach_weight}, {super().extra_repr()}"
