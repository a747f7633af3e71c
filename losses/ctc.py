"""Pure-PyTorch CTC loss whose only Python loop is over time.

The forward (alpha) recursion runs in log space over the blank-interleaved *states* of every target
at once: a batch is a ``(B, 2S+1)`` tensor of state scores per frame. A state ``s`` is reached from
``s`` (stay), ``s-1`` (advance) and ``s-2`` (skip a blank, allowed only between different labels)::

    alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2)) + log y_t(z_s)

Starting from a virtual ``alpha_{-1} = (0, -inf, -inf, ...)`` makes frame 0 a normal step and gives
zero-length inputs the right answer for free. Frames past a sample's input length leave its alpha
unchanged, so ``-log p(l|x) = -logsumexp(alpha_{T-1}(2L), alpha_{T-1}(2L-1))``.

Two ways to get gradients:

* ``backward="autograd"`` (research mode): autograd differentiates the recursion itself, so any
  change you make to it is differentiable, double backward included.
* ``backward="alpha_beta"`` (fast mode): an explicit beta recursion gives the state posteriors
  ``gamma_t(s) = exp(alpha_t(s) + beta_t(s) + loss)``; the gradient w.r.t. ``log_probs[t, b, c]`` is
  ``-sum_{s: z_s = c} gamma_t(s)`` (the true gradient; PyTorch's built-in returns ``exp(log_probs) - gamma``,
  which agrees once composed with ``log_softmax``).

Both are NaN-free: a log-sum-exp whose inputs are all ``-inf`` returns ``-inf`` with zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losses.targets import LengthsLike, check_ctc_arguments, extended_targets

BACKWARD_MODES = ("alpha_beta", "autograd")
REDUCTIONS = ("none", "mean", "sum")
NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, else the input dtype (float32 / float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``logsumexp`` over ``dim`` that is ``-inf`` with zero gradient (not NaN) where every input is ``-inf``.

    Differentiable any number of times (the running max is a detached constant).
    """
    peak = x.detach().amax(dim, keepdim=True)
    alive = peak > NEG_INF
    peak = torch.where(alive, peak, torch.zeros_like(peak))
    return _guarded_log((x - peak).exp().sum(dim), peak.squeeze(dim), alive.squeeze(dim))


def safe_logaddexp3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log(e^a + e^b + e^c)``; ``-inf`` with zero gradient (not NaN) where all three are ``-inf``.

    Three same-shape tensors rather than one reduction over a size-3 axis: elementwise kernels on
    contiguous rows are several times faster on CPU than a strided reduction. Exponents are clamped at
    ``log(tiny)`` so ``exp`` never makes denormals (~7x slower on CPU; what that drops is below the
    dtype's resolution).
    """
    peak = torch.maximum(torch.maximum(a, b), c).detach()
    alive = peak > NEG_INF
    peak = torch.where(alive, peak, torch.zeros_like(peak))
    floor = math.log(torch.finfo(a.dtype).tiny) + 1.0
    total = sum((x - peak).clamp_min(floor).exp() for x in (a, b, c))
    return _guarded_log(total, peak, alive)


def _guarded_log(total: torch.Tensor, peak: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``log(total) + peak`` where ``alive``, else ``-inf``; the gradient is zero (not NaN) where not alive."""
    safe_total = torch.where(alive, total, torch.ones_like(total))
    return torch.where(alive, safe_total.log() + peak, torch.full_like(total, NEG_INF))


def _skip_bias(can_skip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, S')`` additive log-weight of the skip move into each state: 0 where allowed, ``-inf`` where not."""
    return torch.zeros(can_skip.shape, dtype=dtype, device=can_skip.device).masked_fill_(~can_skip, NEG_INF)


def _final_log_likelihood(alpha: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``log p(l|x)`` from the last alpha ``(B, S')``: end in the final blank or the final label."""
    last = 2 * target_lengths
    ends = torch.stack([last, (last - 1).clamp_min(0)], dim=1)  # (B, 2)
    scores = alpha.gather(1, ends)
    no_label = (target_lengths == 0)[:, None] & torch.tensor([False, True], device=alpha.device)
    return safe_logsumexp(scores.masked_fill(no_label, NEG_INF), dim=1)


def _initial_alpha(batch: int, num_states: int, like: torch.Tensor) -> torch.Tensor:
    """``alpha_{-1}``: log 1 in state 0, ``-inf`` elsewhere; shape ``(B, S')``."""
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
        state_log_probs: ``(T, B, S')`` log-prob of each state's class per frame.
        can_skip: ``(B, S')`` bool, skip transition allowed into the state.
        input_lengths, target_lengths: ``(B,)`` int64.
    Returns:
        ``(B,)`` ``log p(l|x)`` (``-inf`` where no alignment exists).
    """
    num_frames, batch, num_states = state_log_probs.shape
    skip_bias = _skip_bias(can_skip, state_log_probs.dtype)
    frame_mask = _frame_mask(input_lengths, num_frames)
    alpha = _initial_alpha(batch, num_states, state_log_probs)
    for t in range(num_frames):
        shifted = F.pad(alpha, (2, 0), value=NEG_INF)  # column j holds state j - 2
        step = safe_logaddexp3(alpha, shifted[:, 1:-1], shifted[:, :-2] + skip_bias) + state_log_probs[t]
        alpha = step if frame_mask is None else torch.where(frame_mask[t], step, alpha)
    return _final_log_likelihood(alpha, target_lengths)


@torch.no_grad()
def _logsumexp3_into(out, a, b, c, peak, scratch):
    """``out = log(e^a + e^b + e^c)`` elementwise, in place and without autograd (1-D, same length).

    ``-inf`` exactly where all three are ``-inf`` (adding the unclamped peak last). Exponents are clamped
    at ``log(tiny)`` so ``exp`` never makes denormals, which are ~7x slower on CPU; what that drops is below
    the dtype's resolution. ``peak`` and ``scratch`` are work buffers.
    """
    floor = math.log(torch.finfo(out.dtype).tiny) + 1.0
    raw_peak = torch.maximum(torch.maximum(a, b), c)
    torch.clamp_min(raw_peak, torch.finfo(out.dtype).min, out=peak)  # finite, so x - peak is never NaN
    torch.sub(a, peak, out=out).clamp_min_(floor).exp_()
    for term in (b, c):
        out.add_(torch.sub(term, peak, out=scratch).clamp_min_(floor).exp_())
    out.log_().add_(raw_peak)


# The fast mode keeps per-state tensors as rows of S' + 2 columns, two -inf padding columns first:
# flattened, states s-1 and s-2 (or s+1 and s+2) of every sample are then plain contiguous 1-D views, which
# run ~2x faster than (B, S') strided ones. Padding columns get -inf emissions, so in alpha they stay -inf
# and whatever spills into them in beta is wiped by the next step's emission: samples never mix.
PAD = 2


def _padded_emissions(log_probs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``(T, B*(S'+2))`` log-prob of each state's class per frame, with ``-inf`` in the padding columns."""
    num_frames, batch, num_classes = log_probs.shape
    with_void = F.pad(log_probs, (0, 1), value=NEG_INF)  # class C: the "padding" class, never emitted
    index = F.pad(states, (PAD, 0), value=num_classes)
    return with_void.gather(2, index.expand(num_frames, -1, -1)).flatten(1)


@torch.no_grad()
def _alphas(emissions, skip_bias, batch):
    """All forward variables, ``(T + 1, B, S' + 2)`` (row 0 is ``alpha_{-1}``); real states at columns ``2:``.

    Frames past an input's length are computed too (harmlessly); read sample ``b`` at row ``input_lengths[b]``.
    """
    num_frames, width = emissions.shape
    alphas = emissions.new_empty(num_frames + 1, batch, width // batch)
    alphas[0] = NEG_INF
    alphas[0, :, PAD] = 0.0
    alphas[1:, :, :PAD] = NEG_INF
    skip_bias = skip_bias.flatten()[PAD:]
    skip, peak, scratch = emissions.new_empty(3, width - PAD)
    for t in range(num_frames):
        previous, current = alphas[t].view(-1), alphas[t + 1].view(-1)[PAD:]
        torch.add(previous[:-2], skip_bias, out=skip)  # from s - 2
        _logsumexp3_into(current, previous[2:], previous[1:-1], skip, peak, scratch)
        current.add_(emissions[t, PAD:])
    return alphas


@torch.no_grad()
def _betas(emissions, skip_bias, input_lengths, target_lengths):
    """Backward variables excluding the current frame's emission, ``(T, B, S' + 2)``; real states at columns ``:-2``.

    ``beta_t(s)`` = log-prob of emitting frames ``t+1 .. T_b-1`` given state ``s`` at frame ``t``;
    0 in the two final states at ``t >= T_b - 1``. Moves ``s -> s, s+1, s+2`` mirror the alpha ones.
    Rows are shifted by two columns against alpha's (padding last), so one emission tensor serves both.
    """
    num_frames, width = emissions.shape
    batch = input_lengths.shape[0]
    state = torch.arange(width // batch, device=emissions.device)
    last = 2 * target_lengths[:, None]
    final = ((state == last) | ((state == last - 1) & (last > 0))).to(emissions.dtype).log()  # 0 / -inf
    betas = emissions.new_empty(num_frames, batch, width // batch)
    betas[-1] = final
    skip_bias = F.pad(skip_bias.flatten()[PAD:], (0, PAD), value=NEG_INF)[PAD:]  # skip from s into s+2
    ragged = bool((input_lengths < num_frames).any())
    is_end = (torch.arange(num_frames, device=final.device)[:, None] >= input_lengths - 1)[..., None]
    emitted = emissions.new_full((width,), NEG_INF)  # beta_{t+1} + emission, padding-last layout
    skip, peak, scratch = emissions.new_empty(3, width - PAD)
    for t in range(num_frames - 2, -1, -1):
        torch.add(betas[t + 1].view(-1)[:-PAD], emissions[t + 1, PAD:], out=emitted[:-PAD])
        torch.add(emitted[2:], skip_bias, out=skip)
        _logsumexp3_into(betas[t].view(-1)[:-PAD], emitted[:-2], emitted[1:-1], skip, peak, scratch)
        if ragged:
            betas[t] = torch.where(is_end[t], final, betas[t])
    return betas


class _AlphaBetaCTC(torch.autograd.Function):
    """Per-sample negative log-likelihood with an explicit beta-recursion backward (fast mode)."""

    @staticmethod
    def forward(ctx, log_probs, states, can_skip, input_lengths, target_lengths):
        batch = log_probs.shape[1]
        emissions = _padded_emissions(log_probs, states)
        skip_bias = F.pad(_skip_bias(can_skip, log_probs.dtype), (PAD, 0), value=NEG_INF)
        alphas = _alphas(emissions, skip_bias, batch)
        last_alpha = alphas[input_lengths, torch.arange(batch, device=log_probs.device), PAD:]  # frame T_b - 1
        log_likelihood = _final_log_likelihood(last_alpha, target_lengths)
        ctx.save_for_backward(emissions, alphas, states, skip_bias, input_lengths, target_lengths, log_likelihood)
        ctx.num_classes = log_probs.shape[2]
        return -log_likelihood

    @staticmethod
    def backward(ctx, grad_loss):
        emissions, alphas, states, skip_bias, input_lengths, target_lengths, log_likelihood = ctx.saved_tensors
        num_frames, batch, num_states = emissions.shape[0], *states.shape
        betas = _betas(emissions, skip_bias, input_lengths, target_lengths)
        # log gamma_t(s) = alpha_t(s) + beta_t(s) - log p; each valid frame's posteriors sum to 1, so scaling by
        # the frame's own peak and renormalising is exact and stays accurate where log p itself has lost digits
        # (log-probs of -1e30).
        log_gamma = alphas[1:, :, PAD:] + betas[:, :, :num_states]
        log_gamma.sub_(log_gamma.amax(2, keepdim=True).clamp_min_(torch.finfo(log_gamma.dtype).min))
        floor = math.log(torch.finfo(log_gamma.dtype).tiny) + 1.0
        alive = log_gamma > floor  # posteriors below the dtype's resolution are exactly 0
        if (frame_mask := _frame_mask(input_lengths, num_frames)) is not None:
            alive &= frame_mask
        gamma = log_gamma.clamp_min_(floor).exp_().mul_(alive)  # clamp: exp never makes (slow) denormals
        gamma.div_(gamma.sum(2, keepdim=True).clamp_min_(torch.finfo(gamma.dtype).tiny))
        gamma.mul_((grad_loss * log_likelihood.isfinite())[:, None])
        index = states.expand(num_frames, -1, -1)
        grad = gamma.new_zeros(num_frames, batch, ctx.num_classes).scatter_add_(2, index, gamma)
        return grad.neg_(), None, None, None, None


def _reduce(losses: torch.Tensor, target_lengths: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return (losses / target_lengths.clamp_min(1).to(losses.dtype)).mean()


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def finish_loss(losses: torch.Tensor, target_lengths: torch.Tensor, reduction: str, zero_infinity: bool):
    """Apply ``zero_infinity`` (inf -> 0 with zero gradient) and the ``F.ctc_loss`` reduction to ``(B,)`` losses."""
    if zero_infinity:
        losses = torch.where(losses.isinf(), torch.zeros_like(losses), losses)
    return _reduce(losses, target_lengths, reduction)


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
    if backward == "autograd":
        index = states[None].expand(log_probs.shape[0], -1, -1)
        log_likelihood = alpha_recursion_autograd(
            log_probs.gather(2, index), can_skip, checked.input_lengths, checked.target_lengths
        )
        losses = -log_likelihood
    else:
        losses = _AlphaBetaCTC.apply(log_probs, states, can_skip, checked.input_lengths, checked.target_lengths)
    return finish_loss(losses, checked.target_lengths, reduction, zero_infinity)


class PythonCTCLoss(nn.Module):
    """:func:`ctc_loss` as a module; ``forward`` takes exactly ``F.ctc_loss``'s tensors."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False, backward: str = "alpha_beta"):
        super().__init__()
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        check_reduction(reduction)
        self.blank, self.reduction, self.zero_infinity, self.backward = blank, reduction, zero_infinity, backward

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        return ctc_loss(
            log_probs, targets, input_lengths, target_lengths,
            blank=self.blank, reduction=self.reduction, zero_infinity=self.zero_infinity, backward=self.backward,
        )

    def extra_repr(self) -> str:
        return f"backward={self.backward!r}, blank={self.blank}, reduction={self.reduction!r}"
