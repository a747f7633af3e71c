"""Pure-PyTorch CTC loss whose only Python loop is over time.

The forward (alpha) recursion runs in log space over the blank-interleaved *states* of every target
at once: a batch is a ``(B, N)`` tensor of state scores per frame, ``N = 2S + 1`` states (see
:mod:`losses.targets`). A state ``s`` is reached from ``s`` (stay), ``s-1`` (advance) and ``s-2`` (skip a
blank, allowed only between different labels)::

    alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2)) + log y_t(z_s)

Starting from a virtual ``alpha_{-1} = (0, -inf, -inf, ...)`` makes frame 0 a normal step and gives
zero-length inputs the right answer for free. Frames past a sample's input length leave its alpha
unchanged, so ``-log p(l|x) = -logsumexp(alpha_{T-1}(2L), alpha_{T-1}(2L-1))``.

Two ways to get gradients:

* ``backward="autograd"`` (research mode): autograd differentiates the recursion itself, so any
  change you make to it is differentiable, double backward included.
* ``backward="alpha_beta"`` (fast mode, :mod:`losses.alpha_beta`): an explicit beta recursion, run in the
  same loop as alpha, gives the state posteriors ``gamma_t(s) = exp(alpha_t(s) + beta_t(s) + loss)``; the
  gradient w.r.t. ``log_probs[t, b, c]`` is ``-sum_{s: z_s = c} gamma_t(s)`` (the true gradient; PyTorch's
  built-in returns ``exp(log_probs) - gamma``, which agrees once composed with ``log_softmax``).

Both are NaN-free: a log-sum-exp whose inputs are all ``-inf`` returns ``-inf`` with zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.alpha_beta import AlphaBetaCTC
from losses.base import CTCLossBase, check_reduction, compute_dtype, finish_loss
from losses.logspace import NEG_INF, safe_logaddexp3
from losses.targets import LengthsLike, check_ctc_arguments, extended_targets, final_log_likelihood

BACKWARD_MODES = ("alpha_beta", "autograd")


def _skip_bias(can_skip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, N)`` additive log-weight of the skip move into each state: 0 where allowed, ``-inf`` where not."""
    return torch.zeros(can_skip.shape, dtype=dtype, device=can_skip.device).masked_fill_(~can_skip, NEG_INF)


def _initial_alpha(batch: int, num_states: int, like: torch.Tensor) -> torch.Tensor:
    """``alpha_{-1}``: log 1 in state 0, ``-inf`` elsewhere; shape ``(B, N)``."""
    alpha = torch.full((batch, num_states), NEG_INF, dtype=like.dtype, device=like.device)
    alpha[:, 0] = 0.0
    return alpha


def _frame_mask(input_lengths: torch.Tensor, num_frames: int) -> torch.Tensor | None:
    """``(T, B, 1)`` bool, True on frames inside each input; None when every input spans all T frames."""
    if bool((input_lengths == num_frames).all()):
        return None
    return (torch.arange(num_frames, device=input_lengths.device)[:, None] < input_lengths)[..., None]


def alpha_recursion_autograd(
    state_log_probs: torch.Tensor, can_skip: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """Differentiable forward recursion (research mode).

    Args:
        state_log_probs: ``(T, B, N)`` log-prob of each state's class per frame.
        can_skip: ``(B, N)`` bool, skip transition allowed into the state.
        input_lengths, target_lengths: ``(B,)`` int64.
    Returns:
        ``(B,)`` ``log p(l|x)`` (``-inf`` where no alignment exists).
    """
    num_frames, batch, num_states = state_log_probs.shape
    skip_bias = _skip_bias(can_skip, state_log_probs.dtype)
    frame_mask = _frame_mask(input_lengths, num_frames)
    alpha = _initial_alpha(batch, num_states, state_log_probs)
    # unbind, not state_log_probs[t]: the backward then stacks T frame gradients once, where indexing would
    # allocate and zero-fill a whole (T, B, N) gradient per frame
    for t, frame_log_probs in enumerate(state_log_probs.unbind(0)):
        shifted = F.pad(alpha, (2, 0), value=NEG_INF)  # column j holds state j - 2
        step = safe_logaddexp3(alpha, shifted[:, 1:-1], shifted[:, :-2] + skip_bias) + frame_log_probs
        alpha = step if frame_mask is None else torch.where(frame_mask[t], step, alpha)
    return final_log_likelihood(alpha, target_lengths)


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: LengthsLike,
    target_lengths: LengthsLike,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
    backward: str = "alpha_beta",
) -> torch.Tensor:
    """CTC negative log-likelihood in pure PyTorch, with ``torch.nn.functional.ctc_loss``'s semantics.

    Args:
        log_probs: ``(T, B, C)`` log-probabilities (float16/bfloat16 are computed in float32).
        targets: padded ``(B, S)`` or concatenated ``(sum(target_lengths),)`` class ids, never ``blank``.
        input_lengths: ``(B,)`` integers ``<= T``.
        target_lengths: ``(B,)`` integers ``<= S``.
        blank: blank class index in ``[0, C)``.
        reduction: ``"none"`` -> ``(B,)``; ``"mean"`` -> each loss divided by its target length, then averaged;
            ``"sum"``.
        zero_infinity: replace infinite losses (no alignment fits) by 0, with zero gradient.
        backward: ``"alpha_beta"`` (explicit beta recursion, fast) or ``"autograd"`` (autograd through the
            forward recursion; supports double backward).
    Returns:
        The loss in float32 for half inputs, else in ``log_probs.dtype``. Infeasible samples give ``inf``
        (never NaN) and zero gradient.
    """
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    check_reduction(reduction)
    checked = check_ctc_arguments(log_probs, targets, input_lengths, target_lengths, blank)
    states, can_skip = extended_targets(checked.padded, blank)
    log_probs = log_probs.to(compute_dtype(log_probs.dtype))
    corrupt = corrupt_samples(log_probs, checked.input_lengths)
    if backward == "autograd":
        log_likelihood = alpha_recursion_autograd(
            gather_states(log_probs, states), can_skip, checked.input_lengths, checked.target_lengths
        )
        losses = -log_likelihood
    else:
        losses = AlphaBetaCTC.apply(log_probs, states, can_skip, checked.input_lengths, checked.target_lengths)
    losses = torch.where(corrupt, torch.inf, losses)  # zero gradient into the stand-in log-probs
    return finish_loss(losses, checked.target_lengths, reduction, zero_infinity)


def gather_states(log_probs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``(T, B, N)`` log-prob of each state's class per frame, NaN and ``+inf`` read as 0 (see
    :func:`corrupt_samples`). Differentiable; the replacement runs on whichever of ``(T, B, C)`` and
    ``(T, B, N)`` is smaller, so a large charset's log-probs are never copied."""
    index = states[None].expand(log_probs.shape[0], -1, -1)
    if log_probs.shape[2] <= states.shape[1]:
        return log_probs.nan_to_num(0.0, 0.0, NEG_INF).gather(2, index)
    return log_probs.gather(2, index).nan_to_num(0.0, 0.0, NEG_INF)


def corrupt_samples(log_probs: torch.Tensor, input_lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the sample has a NaN or ``+inf`` log-prob on a frame before its input length.

    Such a sample's loss is reported as ``inf`` (0 under ``zero_infinity``) with zero gradient; the recursions
    read those entries as 0 (``nan_to_num`` of the gathered emissions), so they never reach another sample
    (the alpha-beta recursion runs all samples' states as one flat row). Entries past a sample's input length
    are ignored, like every other value there. One ``(T, B)`` reduction (``amax`` propagates NaN), no copy of
    the log-probs, no host sync.
    """
    peak = log_probs.detach().amax(2)  # (T, B): NaN if any NaN, +inf if any +inf
    valid = torch.arange(log_probs.shape[0], device=log_probs.device)[:, None] < input_lengths
    return ((peak.isnan() | peak.isposinf()) & valid).any(0)


class PythonCTCLoss(CTCLossBase):
    """:func:`ctc_loss` as a module; ``forward`` takes exactly ``F.ctc_loss``'s tensors."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False, backward: str = "alpha_beta"):
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        super().__init__(blank, reduction, zero_infinity)
        self.backward = backward

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        return ctc_loss(
            log_probs, targets, input_lengths, target_lengths,
            blank=self.blank, reduction=self.reduction, zero_infinity=self.zero_infinity, backward=self.backward,
        )

    def extra_repr(self) -> str:
        return f"backward={self.backward!r}, {super().extra_repr()}"
