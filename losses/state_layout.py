"""The state layout both alpha-beta recursions (:mod:`losses.alpha_beta` in log space,
:mod:`losses.scaled_alpha_beta` in probability space) run on.

Symbols: ``N = 2S + 1`` states per row (:mod:`losses.targets`); ``H`` the number of stacked recursions: 2 (alpha,
then beta) or 1 (alpha only). Beta is stored with its states reversed, which turns its moves ``s -> s, s+1, s+2``
into alpha's ``s, s-1, s-2 -> s``, so one set of elementwise ops on a stacked ``(H, B, N+2)`` tensor advances both.

Per-state tensors are rows of ``N + 2`` columns with two padding columns first (log-prob ``-inf``, probability 0).
Flattened, states ``s-1`` and ``s-2`` of every row are plain contiguous 1-D views, about 2x faster than ``(B, N)``
strided ones; the padding columns emit nothing, so nothing leaks from one row into the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.logspace import NEG_INF

PAD = 2  # -inf padding columns before each row's states


def pad_states(x: torch.Tensor, value: float = NEG_INF) -> torch.Tensor:
    """``(..., N)`` -> ``(..., N + 2)`` with two padding columns first."""
    return F.pad(x, (PAD, 0), value=value)


def emission_sources(log_probs, states, with_beta):
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
        sources, indices = [with_void], [pad_states(states, num_classes)]
        if with_beta:
            sources.append(with_void.flip(0))
            indices.append(pad_states(states.flip(1), num_classes))
        return torch.stack(sources, 1), torch.stack(indices)
    emissions = log_probs.gather(2, states.expand(num_frames, -1, -1)).nan_to_num_(0.0, 0.0, NEG_INF)  # (T, B, N)
    sources = [pad_states(emissions)]
    if with_beta:
        sources.append(pad_states(emissions.flip((0, 2))))
    return torch.stack(sources, 1), None


def alpha_emissions(sources, index, frames=None):
    """Alpha's emissions: ``(B, N+2)`` at one frame per sample (``frames (B,)``), or ``(T, B, N+2)`` at every
    frame (``frames=None``)."""
    if frames is None:
        alpha = sources[:, 0]
        return alpha if index is None else alpha.gather(2, index[0].expand(sources.shape[0], -1, -1))
    rows = torch.arange(frames.shape[0], device=frames.device)
    alpha = sources[frames, 0, rows]
    return alpha if index is None else alpha.gather(1, index[0])


def start_and_skip(states, can_skip, target_lengths, with_beta, dtype):
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
    start = pad_states(torch.stack(start).to(dtype).log())
    skip = pad_states(torch.stack(skip).to(dtype).log())
    return start, skip.flatten()[PAD:]


def beta_restarts(input_lengths: torch.Tensor, num_frames: int) -> torch.Tensor | None:
    """``(T, B, 1)`` bool per loop step ``k``: beta's frame ``T-1-k`` is at or after the sample's last frame, so
    beta (re)starts there from its start row; None when every input spans all ``T`` frames (one host sync)."""
    if not bool((input_lengths < num_frames).any()):
        return None
    frame = num_frames - 1 - torch.arange(num_frames, device=input_lengths.device)
    return (frame[:, None] >= input_lengths - 1)[:, :, None]
