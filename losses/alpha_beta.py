"""Fast mode of :func:`losses.ctc_loss`: a ``torch.autograd.Function`` with an explicit beta recursion.

Symbols: ``N = 2S + 1`` states per row (:mod:`losses.targets`); ``H`` the number of stacked recursions:
2 (alpha, then beta) when ``log_probs`` requires grad, else 1 (alpha only).

The beta recursion needs only the emissions, not alpha, so both run in the *same* loop over time: step
``k`` advances alpha to frame ``k`` and beta to frame ``T-1-k``. Beta is stored with its states reversed,
which turns its moves ``s -> s, s+1, s+2`` into alpha's ``s, s-1, s-2 -> s``, so one set of elementwise
ops on a stacked ``(H = 2, B, N+2)`` tensor does both (twice the work per op, half the op launches, and large
enough for PyTorch to spread over CPU threads). Each step is a three-way log-sum-exp over the predecessors
(:class:`_LogSumExp3Scratch`, ``exp``/``log`` only) and the emission: gathered per step from the small
``(T, H, B, C+1)`` log-probs when there are few classes, so the ``(T, H, B, N+2)`` emissions are never
materialised, or gathered once when there are many (a large charset), so the ``(T, B, C)`` log-probs are never
copied. The backward is then loop-free: ``gamma`` per state, then one ``scatter_add`` into the ``(T, B, C)``
gradient. :func:`ctc_state_posteriors` gives ``gamma`` per state for losses that need only that.

Per-state tensors are rows of ``N + 2`` columns with two ``-inf`` padding columns first. Flattened, states
``s-1`` and ``s-2`` of every row are plain contiguous 1-D views, about 2x faster than ``(B, N)`` strided
ones; the padding columns have ``-inf`` emissions, so nothing leaks from one row into the next.

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
from losses.targets import final_log_likelihood

PAD = 2  # -inf padding columns before each row's states


def _pad_states(x: torch.Tensor, value: float = NEG_INF) -> torch.Tensor:
    """``(..., N)`` -> ``(..., N + 2)`` with two padding columns first."""
    return F.pad(x, (PAD, 0), value=value)


def _emission_sources(log_probs, states, with_beta):
    """What the loop reads each step's emissions from: ``(sources, index)``; step ``k`` reads ``sources[k]``
    (``[:, 0]`` alpha's frame ``k``, ``[:, 1]`` when ``with_beta`` beta's frame ``T-1-k``).

    Whichever is smaller of two layouts: with few classes (``C + 1 <= N + 2``), ``sources`` are the log-probs
    ``(T, H, B, C+1)`` and ``index`` ``(H, B, N+2)`` is each state's class (beta's states reversed; class ``C``,
    ``-inf``, in the padding columns), gathered per step so the ``(T, H, B, N+2)`` emissions are never
    materialised; with many classes (a large charset), ``sources`` are those emissions, gathered once, and
    ``index`` is None, so no copy of the ``(T, B, C)`` log-probs is ever made. NaN and ``+inf`` become 0 (the
    caller reports such samples as corrupt, see :func:`losses.ctc.corrupt_samples`).
    """
    num_frames, _, num_classes = log_probs.shape
    if num_classes + 1 <= states.shape[1] + PAD:
        with_void = F.pad(log_probs, (0, 1), value=NEG_INF).nan_to_num_(0.0, 0.0, NEG_INF)  # class C: padding
        sources, indices = [with_void], [_pad_states(states, num_classes)]
        if with_beta:
            sources.append(with_void.flip(0))
            indices.append(_pad_states(states.flip(1), num_classes))
        return torch.stack(sources, 1), torch.stack(indices)
    emissions = log_probs.gather(2, states.expand(num_frames, -1, -1)).nan_to_num_(0.0, 0.0, NEG_INF)  # (T, B, N)
    sources = [_pad_states(emissions)]
    if with_beta:
        sources.append(_pad_states(emissions.flip((0, 2))))
    return torch.stack(sources, 1), None


def _alpha_emissions(sources, index, frames=None):
    """Alpha's emissions: ``(B, N+2)`` at one frame per sample (``frames (B,)``), or ``(T, B, N+2)`` at every
    frame (``frames=None``)."""
    if frames is None:
        alpha = sources[:, 0]
        return alpha if index is None else alpha.gather(2, index[0].expand(sources.shape[0], -1, -1))
    rows = torch.arange(frames.shape[0], device=frames.device)
    alpha = sources[frames, 0, rows]
    return alpha if index is None else alpha.gather(1, index[0])


def _start_and_skip(states, can_skip, target_lengths, with_beta, dtype):
    """Virtual row before the first step, ``(H, B, N+2)``, and the skip move's log-weight, flattened without the
    first two padding columns, ``(H*B*(N+2) - 2,)`` (the loop adds it to the flat ``s-2`` view).

    Alpha starts from state 0 (``alpha_{-1}``); beta from state ``2L`` of its reversed row, which one step
    turns into ``beta_{T-1} = 0`` in states ``2L`` and ``2L-1``. Beta's skip into reversed state ``s~`` is the
    move ``s -> s+2`` of the original, allowed where ``can_skip[s+2]``.
    """
    batch, num_states = states.shape
    state = torch.arange(num_states, device=states.device)
    skip = [can_skip]
    start = [(state == 0).expand(batch, -1)]
    if with_beta:
        skip.append(F.pad(can_skip, (0, 2), value=False)[:, 2:].flip(1))
        start.append(state.flip(0) == 2 * target_lengths[:, None])
    start = _pad_states(torch.stack(start).to(dtype).log())
    skip = _pad_states(torch.stack(skip).to(dtype).log())
    return start, skip.flatten()[PAD:]


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
    restart = None
    if num_recursions == 2 and bool((input_lengths < num_frames).any()):  # beta starts at each sample's end
        frame = num_frames - 1 - torch.arange(num_frames, device=input_lengths.device)
        restart = (frame[:, None] >= input_lengths - 1)[:, :, None]  # (T, B, 1) per step k
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
    emission = _alpha_emissions(sources, index, (input_lengths - 1).clamp_min(0))[:, PAD:]
    alpha = alpha + torch.where((input_lengths > 0)[:, None], emission, 0.0)
    return final_log_likelihood(alpha, target_lengths)


def _state_posteriors(predecessors, sources, index, input_lengths, log_likelihood):
    """``(T, B, N)`` posteriors ``gamma_t(s)``, zero past each input length and for impossible samples."""
    num_frames = sources.shape[0]
    log_gamma = torch.add(predecessors[1:, 0, :, PAD:], _alpha_emissions(sources, index)[..., PAD:])
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


class AlphaBetaCTC(torch.autograd.Function):
    """Per-sample CTC negative log-likelihood ``(B,)``; gradient ``-gamma`` w.r.t. ``log_probs`` (true gradient).

    ``forward(log_probs (T, B, C), states (B, N), can_skip (B, N), input_lengths (B,), target_lengths (B,))``
    with ``states``/``can_skip`` from :func:`losses.targets.extended_targets`. Beta is only computed when
    ``log_probs`` requires grad.
    """

    @staticmethod
    def forward(ctx, log_probs, states, can_skip, input_lengths, target_lengths):
        with_beta = ctx.needs_input_grad[0]
        sources, index = _emission_sources(log_probs, states, with_beta)
        start, skip_bias = _start_and_skip(states, can_skip, target_lengths, with_beta, log_probs.dtype)
        predecessors = _recursions(sources, index, start, skip_bias, input_lengths)
        log_likelihood = _final_log_likelihood(predecessors, sources, index, input_lengths, target_lengths)
        ctx.save_for_backward(predecessors, sources, index, states, input_lengths, log_likelihood)
        ctx.num_classes = log_probs.shape[2]
        return -log_likelihood

    @staticmethod
    def backward(ctx, grad_loss):
        predecessors, sources, index, states, input_lengths, log_likelihood = ctx.saved_tensors
        gamma = _state_posteriors(predecessors, sources, index, input_lengths, log_likelihood).mul_(grad_loss[:, None])
        num_frames, batch = gamma.shape[:2]
        index = states.expand(num_frames, -1, -1)
        grad = gamma.new_zeros(num_frames, batch, ctx.num_classes).scatter_add_(2, index, gamma)
        return grad.neg_(), None, None, None, None


@torch.no_grad()
def ctc_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths):
    """CTC log-likelihood and state posteriors, without any ``(T, B, C)`` tensor: what cross-entropy against the
    alignment targets needs (``gamma_tc = sum_{s: z_s = c} gamma_t(s)``).

    Args:
        log_probs: ``(T, B, C)`` (NaN / ``+inf`` read as 0: detect them with :func:`losses.ctc.corrupt_samples`).
        states, can_skip: ``(B, N)`` from :func:`losses.targets.extended_targets`.
        input_lengths, target_lengths: ``(B,)`` int64.
    Returns:
        ``(log_likelihood (B,), gamma (T, B, N))``, detached; ``gamma`` rows sum to 1 on frames before each
        input length of samples with ``p > 0`` and are 0 elsewhere. Per-frame shifts of ``log_probs`` (e.g. a
        missing ``log_softmax``) change the log-likelihood, not ``gamma``.
    """
    log_probs = log_probs.detach()
    sources, index = _emission_sources(log_probs, states, True)
    start, skip_bias = _start_and_skip(states, can_skip, target_lengths, True, log_probs.dtype)
    predecessors = _recursions(sources, index, start, skip_bias, input_lengths)
    log_likelihood = _final_log_likelihood(predecessors, sources, index, input_lengths, target_lengths)
    return log_likelihood, _state_posteriors(predecessors, sources, index, input_lengths, log_likelihood)
