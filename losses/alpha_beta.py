"""Fast mode of :func:`losses.ctc_loss`: a ``torch.autograd.Function`` with an explicit beta recursion, and the
log-space alpha-beta recursion it falls back on.

With gradients, both recursions run in probability space (:mod:`losses.scaled_alpha_beta`, about 2.5x faster per
step); the samples whose scaled result it cannot vouch for (underflow that may matter, ``p = 0``) are recomputed
here in log space, which never underflows. Without gradients (evaluation) only alpha runs, in log space. The
backward is loop-free: ``gamma`` per state, from the forward, then one ``scatter_add`` into the ``(T, B, C)``
gradient. :func:`ctc_state_posteriors` gives ``gamma`` per state for losses that need only that.

The log-space recursion (layout: :mod:`losses.state_layout`) runs alpha and beta in the *same* loop over time:
step ``k`` advances alpha to frame ``k`` and beta to frame ``T-1-k`` (twice the work per op, half the op
launches). Each step is a three-way log-sum-exp over the predecessors (:class:`_LogSumExp3Scratch`, ``exp``/``log``
only) and the emission: gathered per step from the small ``(T, H, B, C+1)`` log-probs when there are few classes,
so the ``(T, H, B, N+2)`` emissions are never materialised, or gathered once when there are many (a large
charset), so the ``(T, B, C)`` log-probs are never copied.

The loop stores ``P`` (buffer ``predecessors``) = the log-sum-exp over each state's predecessors *before*
adding the frame's emission ``e``: ``alpha_t = P^a_t + e_t``, Graves' ``beta_t`` (emission at ``t``
excluded) ``= P^b_t``, and the state posteriors are ``gamma_t(s) ∝ exp(P^a_t(s) + e_t(s) + P^b_t(s))``:
sums only, never ``inf - inf``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losses.logspace import NEG_INF
from losses.scaled_alpha_beta import scaled_state_posteriors
from losses.state_layout import PAD, alpha_emissions, beta_restarts, emission_sources, start_and_skip
from losses.targets import final_log_likelihood


class _LogSumExp3Scratch:
    """``out = log(e^a + e^b + e^(c + bias))`` elementwise on 1-D tensors of length ``n``, into preallocated buffers.

    Written with ``exp`` and ``log`` around the elementwise peak rather than as two ``torch.logaddexp``: those
    call ``log1p``, which is about 10x slower than ``exp``/``log`` on some CPUs (AMD EPYC: 380 vs 33-45 µs for
    63 k floats), and was most of the forward there. Precision: the peak's own term is exactly 1, so the sum is in
    ``[1, 3]`` and ``log`` of it is within an ulp, like ``log1p``'s form. Robustness as in
    :func:`losses.logspace.safe_logaddexp3`: exponents are clamped at ``log(tiny) + 1`` (no slow denormals; what
    that adds is below the resolution of a sum >= 1), and the peak is taken at least ``finfo.min`` before the
    subtraction, so three ``-inf`` give ``log(3 e^floor) + (-inf) = -inf``, never ``-inf - -inf = NaN``.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.terms = torch.empty(3, n, dtype=dtype, device=device)
        self.peak, self.reference = torch.empty(2, n, dtype=dtype, device=device)
        self.floor, self.lowest = math.log(torch.finfo(dtype).tiny) + 1.0, torch.finfo(dtype).min

    def __call__(self, a, b, c, bias, out):
        terms, peak, reference = self.terms, self.peak, self.reference
        torch.add(c, bias, out=terms[2])
        torch.maximum(a, b, out=peak)
        torch.maximum(peak, terms[2], out=peak)
        torch.clamp_min(peak, self.lowest, out=reference)
        torch.sub(a, reference, out=terms[0])
        torch.sub(b, reference, out=terms[1])
        terms[2].sub_(reference)
        terms.clamp_min_(self.floor).exp_()
        torch.add(terms[0], terms[1], out=out)
        out.add_(terms[2]).log_().add_(peak)


@torch.no_grad()
def _recursions(sources, index, start, skip_bias, input_lengths):
    """All ``H`` recursions: ``P`` ``(T + 1, H, B, N+2)``, the log-sum-exp over predecessors before the emission;
    row ``k+1`` is computed at loop step ``k`` from row ``k`` plus its emission (row 0: ``start``)."""
    num_frames, num_recursions = sources.shape[:2]  # T, H
    predecessors = sources.new_empty(num_frames + 1, *start.shape)
    predecessors[..., :PAD] = NEG_INF  # the steps write from the first state on
    predecessors[0] = start
    previous = start.flatten().clone()  # the row before, emission included
    restart = beta_restarts(input_lengths, num_frames) if num_recursions == 2 else None
    scratch = _LogSumExp3Scratch(previous.numel() - PAD, previous.dtype, previous.device)
    emission = torch.empty_like(start)
    for k in range(num_frames):
        if restart is not None:
            beta_previous = previous.view_as(start)[1]
            beta_previous.copy_(torch.where(restart[k], start[1], beta_previous))
        # from s, s - 1 and s - 2 (the skip move where allowed)
        scratch(previous[2:], previous[1:-1], previous[:-2], skip_bias, out=predecessors[k + 1].view(-1)[PAD:])
        if index is None:
            torch.add(predecessors[k + 1].view(-1), sources[k].view(-1), out=previous)
        else:
            torch.gather(sources[k], 2, index, out=emission)
            torch.add(predecessors[k + 1].view(-1), emission.view(-1), out=previous)
    return predecessors


def _final_log_likelihood(predecessors, sources, index, input_lengths, target_lengths):
    """``(B,)`` ``log p(l|x)`` from ``alpha_{T_b - 1}`` (``alpha_{-1}`` where ``T_b = 0``)."""
    rows = torch.arange(input_lengths.shape[0], device=input_lengths.device)
    alpha = predecessors[input_lengths, 0, rows, PAD:]
    emission = alpha_emissions(sources, index, (input_lengths - 1).clamp_min(0))[:, PAD:]
    alpha = alpha + torch.where((input_lengths > 0)[:, None], emission, 0.0)
    return final_log_likelihood(alpha, target_lengths)


def _state_posteriors(predecessors, sources, index, input_lengths, log_likelihood):
    """``(T, B, N)`` posteriors ``gamma_t(s)``, zero past each input length and for impossible samples."""
    num_frames = sources.shape[0]
    log_gamma = torch.add(predecessors[1:, 0, :, PAD:], alpha_emissions(sources, index)[..., PAD:])
    log_gamma.add_(predecessors[1:, 1, :, PAD:].flip((0, 2)))
    # Each valid frame's posteriors sum to 1, so scaling by the frame's own peak and renormalising is exact
    # and stays accurate where log p itself has lost digits (log-probs of -1e30).
    log_gamma.sub_(log_gamma.amax(2, keepdim=True).clamp_min_(torch.finfo(log_gamma.dtype).min))
    floor = math.log(torch.finfo(log_gamma.dtype).tiny) + 1.0
    gamma = log_gamma.clamp_min_(floor).exp_()  # clamp: exp never makes (slow) denormals
    # Posteriors at the clamp floor (below the dtype's resolution) are exactly 0, as are invalid frames.
    F.threshold(gamma, math.exp(floor) * 1.5, 0.0, inplace=True)
    valid = torch.arange(num_frames, device=gamma.device)[:, None] < input_lengths
    gamma.mul_((valid & log_likelihood.isfinite()).to(gamma.dtype)[:, :, None])
    return gamma.div_(gamma.sum(2, keepdim=True).clamp_min_(torch.finfo(gamma.dtype).tiny))


def _log_space_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths):
    """:func:`ctc_state_posteriors` by the log-space recursion alone."""
    sources, index = emission_sources(log_probs, states, True)
    start, skip_bias = start_and_skip(states, can_skip, target_lengths, True, log_probs.dtype)
    predecessors = _recursions(sources, index, start, skip_bias, input_lengths)
    log_likelihood = _final_log_likelihood(predecessors, sources, index, input_lengths, target_lengths)
    return log_likelihood, _state_posteriors(predecessors, sources, index, input_lengths, log_likelihood)


@torch.no_grad()
def ctc_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths):
    """CTC log-likelihood and state posteriors, without any ``(T, B, C)`` tensor: what cross-entropy against the
    alignment targets needs (``gamma_tc = sum_{s: z_s = c} gamma_t(s)``).

    The scaled recursion computes every sample; the ones it does not trust are recomputed in log space (one host
    sync per call, none per time step).

    Args:
        log_probs: ``(T, B, C)`` (NaN / ``+inf`` read as 0: detect them with :func:`losses.ctc.corrupt_samples`).
        states, can_skip: ``(B, N)`` from :func:`losses.targets.extended_targets`.
        input_lengths, target_lengths: ``(B,)`` int64.
    Returns:
        ``(log_likelihood (B,), gamma (T, B, N))`` in ``log_probs.dtype``, detached; ``gamma`` rows sum to 1 on
        frames before each input length of samples with ``p > 0`` and are 0 elsewhere. Per-frame shifts of
        ``log_probs`` (e.g. a missing ``log_softmax``) change the log-likelihood, not ``gamma``.
    """
    log_probs = log_probs.detach()
    log_likelihood, gamma, trusted = scaled_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths)
    log_likelihood, gamma = log_likelihood.to(log_probs.dtype), gamma.to(log_probs.dtype)
    redo = (~trusted).nonzero()[:, 0]
    if redo.numel():
        redone = _log_space_state_posteriors(log_probs[:, redo], states[redo], can_skip[redo], input_lengths[redo],
                                             target_lengths[redo])
        log_likelihood[redo], gamma[:, redo] = redone
    return log_likelihood, gamma


class AlphaBetaCTC(torch.autograd.Function):
    """Per-sample CTC negative log-likelihood ``(B,)``; gradient ``-gamma`` w.r.t. ``log_probs`` (true gradient).

    ``forward(log_probs (T, B, C), states (B, N), can_skip (B, N), input_lengths (B,), target_lengths (B,))``
    with ``states``/``can_skip`` from :func:`losses.targets.extended_targets`. When ``log_probs`` requires grad
    the forward computes ``gamma`` (:func:`ctc_state_posteriors`) and keeps it for the backward; otherwise only
    the log-space alpha recursion runs.
    """

    @staticmethod
    def forward(ctx, log_probs, states, can_skip, input_lengths, target_lengths):
        ctx.num_classes = log_probs.shape[2]
        if ctx.needs_input_grad[0]:
            log_likelihood, gamma = ctc_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths)
            ctx.save_for_backward(gamma, states)
            return -log_likelihood
        sources, index = emission_sources(log_probs, states, False)
        start, skip_bias = start_and_skip(states, can_skip, target_lengths, False, log_probs.dtype)
        predecessors = _recursions(sources, index, start, skip_bias, input_lengths)
        return -_final_log_likelihood(predecessors, sources, index, input_lengths, target_lengths)

    @staticmethod
    def backward(ctx, grad_loss):
        gamma, states = ctx.saved_tensors
        gamma = gamma * grad_loss[:, None]
        num_frames, batch = gamma.shape[:2]
        index = states.expand(num_frames, -1, -1)
        grad = gamma.new_zeros(num_frames, batch, ctx.num_classes).scatter_add_(2, index, gamma)
        return grad.neg_(), None, None, None, None
