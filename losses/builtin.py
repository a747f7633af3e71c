"""PyTorch's built-in CTC as a loss module with this package's constructor conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.base import CTCLossBase


class CTCLoss(CTCLossBase):
    """:func:`torch.nn.functional.ctc_loss` (cuDNN / native kernels) behind the common loss interface.

    ``forward(log_probs (T, B, C), targets, input_lengths (B,), target_lengths (B,))`` returns the
    reduced loss; half-precision log-probs are upcast to float32 first (the kernels need it on CPU).
    """

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        if log_probs.dtype in (torch.float16, torch.bfloat16):
            log_probs = log_probs.float()
        return F.ctc_loss(
            log_probs, targets, input_lengths, target_lengths,
            blank=self.blank, reduction=self.reduction, zero_infinity=self.zero_infinity,
        )
