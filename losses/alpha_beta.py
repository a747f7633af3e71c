"""Fast mode of :func:`losses.ctc_loss`: a ``torch.autograd.Function`` with an explicit beta recursion.

Symbols: ``N = 2S + 1`` states per row (:mod:`losses.targets`); ``H`` the number of stacked recursions:
2 (alpha, then beta) when ``log_probs`` requires grad, else 1 (alpha only).

The beta recursion needs only the emissions, not alpha, so both run in the *same* loop over time: step
``k`` advances alpha to frame ``k`` and beta to frame ``T-1-k``. Beta is stored with its states reversed,
which turns its moves ``s -> s, s+1, s+2`` into alpha's ``s, s-1, s-2 -> s``, so one set of elementwise
ops on a stacked ``(H = 2, B, N+2)`` tensor does both (twice the work per op, half the op launches, and large
enough for PyTorch to spread over CPU threads). Each step is four ops: the skip move's bias, two
``logaddexp`` and the emission, gathered per step from the small ``(T, H, B, C+1)`` log-probs so the
``(T, H, B, N+2)`` emissions are never materialised. The backward is then loop-free.

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
    """What the loop gathers each step's emissions from: ``sources (T, H, B, C+1)``, where step ``k`` reads
    ``sources[k]`` (``[:, 0]`` alpha's frame ``k``, ``[:, 1]`` when ``with_beta`` beta's frame ``T-1-k``), and
    ``index (H, B, N+2)``, each state's class (beta's states reversed; class ``C``, ``-inf``, in the padding
    columns). Gathering per step keeps the ``(T, H, B, N+2)`` emissions from ever being materialised."""
    num_classes = log_probs.shape[2]
    with_void = F.pad(log_probs, (0, 1), value=NEG_INF)  # class C: the padding columns' class, never emitted
    sources, indices = [with_void], [_pad_states(states, num_classes)]
    if with_beta:
        sources.append(with_void.flip(0))
        indices.append(_pad_states(states.flip(1), num_classes))
    return torch.stack(sources, 1), torch.stack(indices)


def _alpha_emissions(sources, index, frames=None):
    """Alpha's emissions: ``(B, N+2)`` at one frame per sample (``frames (B,)``), or ``(T, B, N+2)`` at every
    frame (``frames=None``)."""
    if frames is None:
        return sources[:, 0].gather(2, index[0].expand(sources.shape[0], -1, -1))
    rows = torch.arange(frames.shape[0], device=frames.device)
    return sources[frames, 0, rows].gather(1, index[0])


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
    skip, pair = sources.new_empty(2, previous.numel() - PAD)
    emission = torch.empty_like(start)
    for k in range(num_frames):
        if restart is not None:
            beta_previous = previous.view_as(start)[1]
            beta_previous.copy_(torch.where(restart[k], start[1], beta_previous))
        torch.add(previous[:-2], skip_bias, out=skip)  # from s - 2
        torch.logaddexp(previous[2:], previous[1:-1], out=pair)  # from s and s - 1 (-inf, -inf -> -inf)
        torch.logaddexp(pair, skip, out=predecessors[k + 1].view(-1)[PAD:])
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
