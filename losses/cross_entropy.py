"""Frame-wise cross-entropy against CTC alignment targets: re-weighted (Li et al. 2019) and smoothed CTC.

Cross-entropy against the per-frame CTC posteriors ``γ`` (detached) has exactly CTC's gradient w.r.t. the
logits: ``d/dlogits [-Σ γ·log_softmax(logits)] = softmax - γ``. Changing ``γ`` before taking the
cross-entropy is therefore a clean way to change what CTC teaches each frame. The loss value is that
cross-entropy, ``L + H`` for unmodified ``γ`` (CTC loss plus the path-posterior entropy), not ``L``.
"""

from __future__ import annotations

from typing import Callable

import torch

from losses.alignment import alignment_targets_and_nll
from losses.base import CTCLossBase, compute_dtype
from losses.ctc import ctc_loss
from losses.targets import CheckedTargets, check_ctc_arguments

REWEIGHT_MODES = ("balanced", "plain", "none")


class AlignmentTargetLoss(CTCLossBase):
    """Base class: per-sample ``-Σ_t Σ_c γ'_tc · log_probs_tc`` with ``γ' = self.transform(γ, ...)``.

    ``forward`` takes :func:`torch.nn.functional.ctc_loss`'s tensors; ``reduction``/``zero_infinity``
    behave as there (samples whose every alignment has probability 0 have no alignment targets: ``inf``,
    or 0 with zero gradient).
    ``ctc`` is the CTC implementation whose gradient defines ``γ`` (any ``F.ctc_loss``-like function).
    """

    def __init__(
        self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False,
        ctc: Callable[..., torch.Tensor] = ctc_loss,
    ):
        super().__init__(blank, reduction, zero_infinity)
        self.ctc = ctc

    def transform(self, gamma: torch.Tensor, checked: CheckedTargets) -> torch.Tensor:
        """Map ``γ`` ``(T, B, C)`` to the targets actually used; identity here."""
        return gamma

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        checked = check_ctc_arguments(log_probs, targets, input_lengths, target_lengths, self.blank)
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        gamma, nll = alignment_targets_and_nll(log_probs, *checked, blank=self.blank, ctc_loss=self.ctc)
        target = self.transform(gamma.to(log_probs.dtype), checked)
        # 0 * log(0) = 0: classes without target mass contribute nothing, even at log-prob -inf
        products = torch.where(target > 0, target * log_probs, torch.zeros_like(log_probs))
        cross_entropy = -products.sum((0, 2))
        # no alignment has positive probability: like CTC, inf (or 0 with zero gradient under zero_infinity)
        losses = torch.where(nll.isfinite(), cross_entropy, torch.full_like(cross_entropy, torch.inf))
        return self.finish(losses, checked.target_lengths)


def label_counts(checked: CheckedTargets, num_classes: int) -> torch.Tensor:
    """``(B, C)`` float: how often each class occurs in each target (the blank count is 0)."""
    inside = torch.arange(checked.padded.shape[1], device=checked.padded.device) < checked.target_lengths[:, None]
    counts = torch.zeros(checked.padded.shape[0], num_classes, device=checked.padded.device)
    return counts.scatter_add_(1, checked.padded, inside.float())


class ReweightedCTCLoss(AlignmentTargetLoss):
    """Re-weighted CTC (Li et al. 2019, arXiv:1904.10619): cross-entropy against re-weighted ``γ``.

    CTC's posteriors put most frames on blank; re-weighting moves target mass to the labels. With
    ``alpha`` the desired non-blank share in ``(0, 1)``:

    * ``mode="balanced"`` (their default): per sample, each label class's total mass ``Σ_t γ_tc`` is
      rescaled to its number of occurrences in the target, blank's mass to ``(1 - alpha) / alpha`` times
      the target length, then every frame is renormalised to sum to 1.
    * ``mode="plain"``: label mass times ``alpha``, blank mass times ``1 - alpha`` (no renormalisation).
    * ``mode="none"``: ``γ`` unchanged; the gradient is exactly CTC's.

    In balanced mode, samples with an empty target keep their (all-blank) ``γ``.
    """

    def __init__(self, alpha: float = 0.5, mode: str = "balanced", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"ReweightedCTCLoss alpha (non-blank ratio) must be in (0, 1), got {alpha}")
        if mode not in REWEIGHT_MODES:
            raise ValueError(f"ReweightedCTCLoss mode must be one of {REWEIGHT_MODES}, got {mode!r}")
        self.alpha, self.mode = alpha, mode

    def transform(self, gamma: torch.Tensor, checked: CheckedTargets) -> torch.Tensor:
        if self.mode == "none":
            return gamma
        is_blank = torch.arange(gamma.shape[2], device=gamma.device) == self.blank  # (C,)
        if self.mode == "plain":
            weights = gamma.new_tensor([1.0 - self.alpha, self.alpha])  # in gamma's dtype: float64 stays float64
            return gamma * torch.where(is_blank, weights[0], weights[1])
        counts = label_counts(checked, gamma.shape[2]).to(gamma.dtype)  # (B, C)
        blank_mass = (1.0 - self.alpha) / self.alpha * checked.target_lengths.to(gamma.dtype)  # (B,)
        wanted = torch.where(is_blank, blank_mass[:, None], counts)
        mass = gamma.sum(0)  # (B, C)
        scale = torch.where(mass > 0, wanted / mass.clamp_min(torch.finfo(mass.dtype).tiny), torch.zeros_like(mass))
        scale = torch.where((checked.target_lengths > 0)[:, None], scale, torch.ones_like(scale))
        reweighted = gamma * scale
        frame_mass = reweighted.sum(2, keepdim=True)
        return torch.where(frame_mass > 0, reweighted / frame_mass.clamp_min(torch.finfo(mass.dtype).tiny), reweighted)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mode={self.mode!r}, {super().extra_repr()}"


class SmoothedCTCLoss(AlignmentTargetLoss):
    """Label-smoothed CTC: cross-entropy against ``(1 - epsilon) · γ + epsilon · uniform`` on valid frames."""

    def __init__(self, epsilon: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"SmoothedCTCLoss epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon

    def transform(self, gamma: torch.Tensor, checked: CheckedTargets) -> torch.Tensor:
        has_target = gamma.sum(2, keepdim=True) > 0  # valid frames of feasible samples
        smoothed = (1.0 - self.epsilon) * gamma + self.epsilon / gamma.shape[2]
        return torch.where(has_target, smoothed, gamma)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, {super().extra_repr()}"
