"""Alpha-beta in probability space with per-frame scaling (Rabiner 1989; Graves et al. 2006, sec. 4.1), and the
check that says where its result can be trusted; :func:`losses.alpha_beta.ctc_state_posteriors` recomputes the
other samples in log space.

Symbols and layout as in :mod:`losses.state_layout`: ``N = 2S + 1`` states, rows of ``N + 2`` columns with two
padding columns first, alpha and beta (states reversed) stacked as ``(2, B, N+2)`` and advanced by one set of ops
per step.

Why: a log-space step is a three-way log-sum-exp (``exp`` of three terms and a ``log``: 13 small ops); in
probability space it is ``P = x_s + x_{s-1} + skip * x_{s-2}``, ``x = P * y`` and a division by the row's sum
``c`` (7 ops, no transcendental function).

Scaling. Emissions are ``y_t(s) = exp(log y_t(z_s) - m_t)`` with ``m_t`` the frame's largest log-prob over the
sample's own classes, so the likeliest state emits 1; after each step the row is divided by its sum ``c_t``, so
``log p(l|x) = log sum_{final s} alpha_{T-1}(s) + sum_t log c_t + sum_t m_t`` (:func:`_log_likelihood`).

Underflow, and when the result is trusted. A scaled value below the dtype's smallest normal number ``tiny`` is
flushed to 0 where log space keeps it: per step at most ``rho_t = N tiny (1 + 4 / c_t)`` of the row's mass (values
after the division, and products ``P * y`` or emissions below ``tiny`` before it). Alpha mass ``delta`` lost at frame
``t`` and state ``s`` would have added ``delta beta_t(s) <= delta max(beta_t)`` to ``p = sum_s alpha_t(s) beta_t(s)``,
so, to first order, the relative error of ``p`` is at most ``sum_t rho_t / overlap_t`` with
``overlap_t = sum_s alpha_t(s) beta_t(s) / (sum(alpha_t) max(beta_t))``; likewise for the mass beta loses and
``gamma``. A sample is *trusted* when that bound, over its valid frames and both recursions, is within the dtype's
``eps``: its result is then as accurate as rounding allows. The bound fails only where alpha and beta put their mass
on different states by ~``eps / tiny`` (1e31 in float32) or a frame's emissions all but vanish (``c_t`` near
``tiny``), e.g. a confident model and a wrong label; those samples, and the ones with ``p = 0``, are recomputed in
log space, which never underflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.state_layout import PAD, alpha_emissions, beta_restarts, emission_sources, pad_states, start_and_skip
from losses.targets import final_log_likelihood


def _scaled_emissions(log_probs, states):
    """``(sources, index, shift)``: :func:`losses.state_layout.emission_sources`'s layout (both recursions), in
    probability space, each frame scaled by ``exp(-shift)``; ``shift`` ``(T, B)`` is the frame's largest
    log-prob over the sample's classes (blank included), at least the dtype's lowest finite value."""
    lowest = torch.finfo(log_probs.dtype).min
    if log_probs.shape[2] + 1 > states.shape[1] + PAD:  # a large charset: gather the states' log-probs once
        sources, index = emission_sources(log_probs, states, with_beta=True)
        shift = sources[:, 0].amax(2).clamp_min_(lowest)
        return sources.sub_(torch.stack([shift, shift.flip(0)], 1)[..., None]).exp_(), index, shift
    # few classes: scale alpha's (T, B, C+1) once, then stack it with its time-reversed copy for beta
    alpha = F.pad(log_probs, (0, 1), value=float("-inf")).nan_to_num_(0.0, 0.0, float("-inf"))  # class C: padding
    own = torch.full(alpha.shape[1:], float("-inf"), dtype=alpha.dtype, device=alpha.device)
    shift = (alpha + own.scatter_(1, states, 0.0)).amax(2).clamp_min_(lowest)  # only the sample's own classes
    alpha.sub_(shift[..., None]).exp_()
    index = torch.stack([pad_states(states, log_probs.shape[2]), pad_states(states.flip(1), log_probs.shape[2])])
    return torch.stack([alpha, alpha.flip(0)], 1), index, shift


@torch.no_grad()
def _scaled_recursions(sources, index, start, skip, input_lengths):
    """Both recursions in probability space.

    Returns ``(before, scale)``: ``before`` ``(T+1, 2, B, N+2)`` each state's sum over its predecessors, before the
    frame's emission (row ``k+1`` at loop step ``k``, row 0 the start), the predecessors scaled so that their row
    sums to 1; ``scale`` ``(T, 2, B)`` the sum that row ``k+1`` times the emission had before that division.
    """
    num_frames = sources.shape[0]
    before = sources.new_empty(num_frames + 1, *start.shape)
    before[0] = start
    before[..., :PAD] = 0.0  # the steps write from the first state on
    scale = sources.new_empty(num_frames, start.shape[0] * start.shape[1])
    tiny = torch.finfo(sources.dtype).tiny
    restart = beta_restarts(input_lengths, num_frames)
    after = start.clone()  # the row before, emission included, scaled
    emission = torch.empty_like(start)
    flat, rows = after.view(-1), after.view(scale.shape[1], -1)
    for k in range(num_frames):
        if restart is not None:
            after[1].copy_(torch.where(restart[k], start[1], after[1]))
        out = before[k + 1].view(-1)[PAD:]
        torch.add(flat[2:], flat[1:-1], out=out)  # from s and s - 1
        out.addcmul_(flat[:-2], skip)  # from s - 2 where the skip is allowed
        if index is not None:
            torch.gather(sources[k], 2, index, out=emission)
        torch.mul(before[k + 1], sources[k] if index is None else emission, out=after)
        torch.sum(rows, 1, out=scale[k])
        rows.div_(scale[k].clamp_min_(tiny)[:, None])
    return before, scale.view(num_frames, *start.shape[:2])


def _log_likelihood(before, sources, index, scale, shift, input_lengths, target_lengths):
    """``(B,)`` ``log p(l|x)``: alpha's final states at frame ``T_b - 1`` (the start where ``T_b = 0``), plus the
    logs of the scales before that frame and the shifts of the frames ``t < T_b``."""
    rows = torch.arange(input_lengths.shape[0], device=input_lengths.device)
    last = (input_lengths - 1).clamp_min(0)
    emission = alpha_emissions(sources, index, last)[:, PAD:]
    alpha = before[input_lengths, 0, rows, PAD:] * torch.where((input_lengths > 0)[:, None], emission, 1.0)
    sums = F.pad(torch.stack([scale[:, 0].log(), shift]).cumsum(1), (0, 0, 1, 0))  # (2, T+1, B): first t frames
    return final_log_likelihood(alpha.log(), target_lengths) + sums[0, last, rows] + sums[1, input_lengths, rows]


def _trusted(overlap, scale, valid, log_likelihood, num_states):
    """``(B,)`` bool: the first-order bound on the relative error from underflow (module docstring) is within
    ``eps`` and ``p > 0``. ``overlap`` ``(T, B)`` as defined there, ``scale`` ``(T, 2, B)`` per loop step."""
    info = torch.finfo(overlap.dtype)
    scales = torch.stack([scale[:, 0], scale[:, 1].flip(0)])  # (2, T, B) per frame
    lost = (num_states * info.tiny) * (1.0 + 4.0 / scales).sum(0)  # both recursions
    bound = torch.where(valid, lost / overlap, 0.0).sum(0)
    return (bound <= info.eps) & (log_likelihood > float("-inf"))


def scaled_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths):
    """Log-likelihood, state posteriors and whether to trust them, from the scaled recursions.

    Args:
        log_probs: ``(T, B, C)`` float32 or float64, detached (NaN / ``+inf`` read as 0, as in
            :mod:`losses.alpha_beta`).
        states, can_skip: ``(B, N)`` from :func:`losses.targets.extended_targets`.
        input_lengths, target_lengths: ``(B,)`` int64.
    Returns:
        ``(log_likelihood (B,), gamma (T, B, N), trusted (B,) bool)`` in ``log_probs.dtype``; ``gamma`` rows sum to
        1 on valid frames and are 0 elsewhere. Untrusted samples' values are not to be used (module docstring).
    """
    sources, index, shift = _scaled_emissions(log_probs, states)
    log_start, skip_bias = start_and_skip(states, can_skip, target_lengths, True, log_probs.dtype)
    before, scale = _scaled_recursions(sources, index, log_start.exp(), skip_bias.exp(), input_lengths)
    log_likelihood = _log_likelihood(before, sources, index, scale, shift, input_lengths, target_lengths)
    # gamma_t(s) ∝ alpha_t(s) (emission included) * beta_t(s) (emission excluded)
    joint = before[1:, 0, :, PAD:] * alpha_emissions(sources, index)[..., PAD:]
    joint.mul_(before[1:, 1, :, PAD:].flip((0, 2)))  # (T, B, N)
    total = joint.sum(2)  # (T, B)
    valid = torch.arange(joint.shape[0], device=joint.device)[:, None] < input_lengths
    # alpha_t = before^a_t * y_t sums to scale^a_t; beta_t = before^b_t sums over at most three predecessors of a
    # row that sums to 1, so its largest entry is at most 3: a lower bound on the overlap
    overlap = total / (3.0 * scale[:, 0])
    trusted = _trusted(overlap, scale, valid, log_likelihood, states.shape[1])
    gamma = joint.div_(total.clamp_min_(torch.finfo(joint.dtype).tiny)[..., None]).mul_(valid[..., None])
    return log_likelihood, gamma, trusted
