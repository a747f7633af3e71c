"""Frame-wise cross-entropy against CTC alignment targets: re-weighted (Li et al. 2019) and smoothed CTC.

Cross-entropy against the per-frame CTC posteriors ``γ`` (detached) has exactly CTC's gradient w.r.t. the
logits: ``d/dlogits [-Σ γ·log_softmax(logits)] = softmax - γ``. Changing ``γ`` before taking the
cross-entropy is therefore a clean way to change what CTC teaches each frame. The loss value is that
cross-entropy, ``L + H`` for unmodified ``γ`` (CTC loss plus the path-posterior entropy), not ``L``.

State space: ``γ_tc = Σ_{s: z_s = c} γ_t(s)`` over the ``N = 2S + 1`` states of the blank-interleaved target, so
``-Σ_c γ_tc log y_tc = -Σ_s γ_t(s) log y_t(z_s)``: the built-in losses need only the ``(T, B, N)`` state
posteriors and the log-probs gathered at each state's class, never a ``(T, B, C)`` target (at a 6 000-class
charset that is 100x smaller). Their targets are written once for *columns* ``k`` that each carry a class id
(``classes (B, K)``): the ``N`` states, or, on the dense path, the ``C`` classes themselves.
"""

from __future__ import annotations

from typing import Callable

import torch

from losses.alignment import alignment_targets_and_nll
from losses.alpha_beta import ctc_state_posteriors
from losses.base import CTCLossBase, compute_dtype
from losses.ctc import corrupt_samples, ctc_loss
from losses.targets import CheckedTargets, check_ctc_arguments, extended_targets

REWEIGHT_MODES = ("balanced", "plain", "none")


def column_cross_entropy(target: torch.Tensor, column_log_probs: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``-Σ_t Σ_k target_tk · log_probs_tk`` over ``(T, B, K)``, with ``0 · log 0 = 0``: columns without
    target mass contribute nothing (and no gradient), even at log-prob ``-inf`` or NaN."""
    products = torch.where(target > 0, target * column_log_probs, torch.zeros_like(column_log_probs))
    return -products.sum((0, 2))


class AlignmentTargetLoss(CTCLossBase):
    """Base class: per-sample ``-Σ_t Σ_c γ'_tc · log_probs_tc`` with ``γ'`` the modified alignment targets.

    ``forward`` takes :func:`torch.nn.functional.ctc_loss`'s tensors; ``reduction``/``zero_infinity``
    behave as there (samples whose every alignment has probability 0 have no alignment targets: ``inf``,
    or 0 with zero gradient; so do samples with a NaN or ``+inf`` log-prob on a valid frame).
    ``ctc`` is the CTC implementation whose gradient defines ``γ`` (any ``F.ctc_loss``-like function).

    Two paths, the same numbers:

    * state space (the built-in losses with the default ``ctc``): ``γ`` per state from
      :func:`losses.alpha_beta.ctc_state_posteriors`, :meth:`column_targets` per state, no ``(T, B, C)`` tensor
      but the log-probs' own gradient.
    * dense (a subclass that overrides :meth:`transform`, or another ``ctc``): ``γ`` ``(T, B, C)`` read off
      ``ctc``'s gradient (:func:`losses.ctc_alignment_targets`), then ``transform(column_targets(γ))``.

    Subclasses change the targets by overriding :meth:`transform` (dense ``(T, B, C)``: simplest, any function
    of ``γ``), or :meth:`column_targets` (+ :meth:`uniform_weight`) for the state-space path.
    """

    def __init__(
        self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False,
        ctc: Callable[..., torch.Tensor] = ctc_loss,
    ):
        super().__init__(blank, reduction, zero_infinity)
        self.ctc = ctc

    def transform(self, gamma: torch.Tensor, checked: CheckedTargets) -> torch.Tensor:
        """Map dense ``γ`` ``(T, B, C)`` to the targets actually used; identity here. Overriding it selects the
        dense path."""
        return gamma

    def column_targets(self, gamma: torch.Tensor, classes: torch.Tensor, checked: CheckedTargets,
                       num_classes: int) -> torch.Tensor:
        """Targets ``(T, B, K)`` from posteriors ``γ`` ``(T, B, K)`` of columns whose class ids are ``classes``
        ``(B, K)`` (several columns may share a class: their targets add up); identity here."""
        return gamma

    def uniform_weight(self, num_classes: int) -> float:
        """Target mass every class gets on every frame that has alignment targets, on top of
        :meth:`column_targets` (its cross-entropy is one reduction, ``-w Σ_c log y_tc``); 0 here."""
        return 0.0

    def uses_dense_targets(self) -> bool:
        """Whether ``forward`` takes the dense path: :meth:`transform` overridden, or ``γ`` from another ``ctc``."""
        return type(self).transform is not AlignmentTargetLoss.transform or self.ctc is not ctc_loss

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        checked = check_ctc_arguments(log_probs, targets, input_lengths, target_lengths, self.blank)
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        num_frames, batch, num_classes = log_probs.shape
        if self.uses_dense_targets():
            gamma, nll = alignment_targets_and_nll(log_probs, *checked, blank=self.blank, ctc_loss=self.ctc)
            classes = torch.arange(num_classes, device=log_probs.device).expand(batch, -1)
            target = self.transform(self.column_targets(gamma.to(log_probs.dtype), classes, checked, num_classes),
                                    checked)
            column_log_probs = log_probs
            possible = nll.isfinite()
        else:
            classes, can_skip = extended_targets(checked.padded, self.blank)
            log_likelihood, gamma = ctc_state_posteriors(log_probs, classes, can_skip, *checked[1:])
            possible = log_likelihood.isfinite() & ~corrupt_samples(log_probs, checked.input_lengths)
            gamma = gamma * possible[:, None].to(gamma.dtype)  # a corrupt sample has no targets
            target = self.column_targets(gamma, classes, checked, num_classes)
            column_log_probs = log_probs.gather(2, classes.expand(num_frames, -1, -1))  # (T, B, N)
        cross_entropy = column_cross_entropy(target, column_log_probs)
        weight = self.uniform_weight(num_classes)
        if weight > 0:  # frames with alignment targets: 0 elsewhere, -inf / NaN there must not reach the sum
            has_target = (gamma.sum(2) > 0) & possible
            frame_sums = torch.where(has_target, log_probs.sum(2), torch.zeros((), dtype=log_probs.dtype))
            cross_entropy = cross_entropy - weight * frame_sums.sum(0)
        # no alignment has positive probability: like CTC, inf (or 0 with zero gradient under zero_infinity)
        losses = torch.where(possible, cross_entropy, torch.full_like(cross_entropy, torch.inf))
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

    In balanced mode, samples with an empty target keep their (all-blank) ``γ``. Every factor depends on the
    class only, so it applies per state (a class's mass is the sum over its states).
    """

    def __init__(self, alpha: float = 0.5, mode: str = "balanced", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"ReweightedCTCLoss alpha (non-blank ratio) must be in (0, 1), got {alpha}")
        if mode not in REWEIGHT_MODES:
            raise ValueError(f"ReweightedCTCLoss mode must be one of {REWEIGHT_MODES}, got {mode!r}")
        self.alpha, self.mode = alpha, mode

    def column_targets(self, gamma, classes, checked, num_classes):
        if self.mode == "none":
            return gamma
        is_blank = classes == self.blank  # (B, K)
        if self.mode == "plain":
            weights = gamma.new_tensor([1.0 - self.alpha, self.alpha])  # in gamma's dtype: float64 stays float64
            return gamma * torch.where(is_blank, weights[0], weights[1])
        counts = label_counts(checked, num_classes).to(gamma.dtype).gather(1, classes)  # (B, K)
        blank_mass = (1.0 - self.alpha) / self.alpha * checked.target_lengths.to(gamma.dtype)  # (B,)
        wanted = torch.where(is_blank, blank_mass[:, None], counts)
        class_mass = gamma.new_zeros(gamma.shape[1], num_classes).scatter_add_(1, classes, gamma.sum(0))  # (B, C)
        mass = class_mass.gather(1, classes)  # (B, K): each column's class total
        tiny = torch.finfo(gamma.dtype).tiny
        scale = torch.where(mass > 0, wanted / mass.clamp_min(tiny), torch.zeros_like(mass))
        scale = torch.where((checked.target_lengths > 0)[:, None], scale, torch.ones_like(scale))
        reweighted = gamma * scale
        frame_mass = reweighted.sum(2, keepdim=True)
        return torch.where(frame_mass > 0, reweighted / frame_mass.clamp_min(tiny), reweighted)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mode={self.mode!r}, {super().extra_repr()}"


class SmoothedCTCLoss(AlignmentTargetLoss):
    """Label-smoothed CTC: cross-entropy against ``(1 - epsilon) · γ + epsilon · uniform`` on valid frames.

    The uniform part's cross-entropy is ``-epsilon / C · Σ_c log y_tc`` per frame: one reduction of the
    log-probs, no ``(T, B, C)`` target.
    """

    def __init__(self, epsilon: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"SmoothedCTCLoss epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon

    def column_targets(self, gamma, classes, checked, num_classes):
        return (1.0 - self.epsilon) * gamma

    def uniform_weight(self, num_classes: int) -> float:
        return self.epsilon / num_classes

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, {super().extra_repr()}"
