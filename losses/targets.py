"""Argument checking and target bookkeeping shared by every CTC routine in this package.

Conventions (the same as :func:`torch.nn.functional.ctc_loss`):

* ``log_probs``: ``(T, B, C)`` floating tensor, time-major.
* ``targets``: padded ``(B, S)`` or concatenated ``(sum(target_lengths),)`` integer tensor.
* ``input_lengths`` / ``target_lengths``: ``(B,)`` integer tensors (or sequences of ints).

The *extended* target of a label sequence ``l`` of length ``L`` interleaves blanks:
``z = (blank, l_1, blank, l_2, ..., l_L, blank)``, ``2L + 1`` states. Batched, every row is
padded to ``N = 2S + 1`` states with ``S = max(target_lengths)``; ``N`` is the number of states in every
shape of this package.

An alignment of ``l`` needs at least :func:`required_frames` frames: one per label, plus one blank between
each pair of equal adjacent labels.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from losses.logspace import NEG_INF, safe_logsumexp

LengthsLike = torch.Tensor | Sequence[int]


class CheckedTargets(NamedTuple):
    """Validated CTC arguments, on ``log_probs``' device.

    Attributes:
        padded: ``(B, S)`` int64 labels, ``S = max(target_lengths)``; slots past a row's length hold ``blank``.
        input_lengths: ``(B,)`` int64.
        target_lengths: ``(B,)`` int64.
    """

    padded: torch.Tensor
    input_lengths: torch.Tensor
    target_lengths: torch.Tensor


def _as_lengths(name: str, lengths: LengthsLike, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(list(lengths), dtype=torch.long)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() == 0 and batch == 1:
        lengths = lengths.reshape(1)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.long)
    if batch and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {lengths.tolist()}")
    return lengths


def check_ctc_arguments(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: LengthsLike,
    target_lengths: LengthsLike,
    blank: int,
) -> CheckedTargets:
    """Validate CTC arguments and return labels padded to ``(B, max(target_lengths))``.

    Raises:
        ValueError: naming the offending argument, for wrong ranks/shapes/dtypes, negative lengths,
            lengths beyond ``T`` or ``S``, a blank outside ``[0, C)``, or label ids ``>= C``, ``< 0``
            or equal to ``blank`` (checked only inside each row's length).
    """
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 3:
        shape = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
        raise ValueError(f"log_probs must be a (T, B, C) tensor, got {shape}")
    if not log_probs.is_floating_point():
        raise ValueError(f"log_probs must be floating point, got {log_probs.dtype}")
    num_frames, batch, num_classes = log_probs.shape
    if not 0 <= blank < num_classes:
        raise ValueError(f"blank must be in [0, C) = [0, {num_classes}), got {blank}")
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    device = log_probs.device
    input_lengths = _as_lengths("input_lengths", input_lengths, batch, device)
    target_lengths = _as_lengths("target_lengths", target_lengths, batch, device)
    if batch and bool((input_lengths > num_frames).any()):
        raise ValueError(f"input_lengths must be <= T = {num_frames}, got {input_lengths.tolist()}")

    targets = targets.to(device=device, dtype=torch.long)
    max_len = int(target_lengths.max()) if batch else 0
    positions = torch.arange(max_len, device=device)
    valid = positions < target_lengths[:, None]  # (B, S)
    if targets.dim() == 2:
        if targets.shape[0] != batch:
            raise ValueError(f"targets must have shape (B, S) with B = {batch}, got {tuple(targets.shape)}")
        if max_len > targets.shape[1]:
            raise ValueError(
                f"target_lengths must be <= S = {targets.shape[1]} (targets' second dim), got {target_lengths.tolist()}"
            )
        padded = targets[:, :max_len]
    elif targets.dim() == 1:
        total = int(target_lengths.sum())
        if targets.numel() != total:
            raise ValueError(
                f"concatenated targets must hold sum(target_lengths) = {total} labels, got {targets.numel()}"
            )
        starts = torch.cumsum(target_lengths, 0) - target_lengths  # (B,)
        index = (starts[:, None] + positions).clamp(max=max(total - 1, 0))
        padded = targets[index] if total else torch.zeros(batch, max_len, dtype=torch.long, device=device)
    else:
        raise ValueError(f"targets must be 1-D (concatenated) or 2-D (B, S), got {targets.dim()}-D")

    padded = torch.where(valid, padded, torch.full_like(padded, blank))
    bad = valid & ((padded < 0) | (padded >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"targets must hold class ids in [0, C) = [0, {num_classes}), got {padded[bad].tolist()[:10]}")
    if bool((valid & (padded == blank)).any()):
        raise ValueError(f"targets must not contain the blank index {blank} inside target_lengths")
    return CheckedTargets(padded, input_lengths, target_lengths)


def extended_targets(padded: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blank-interleaved states and where the skip transition ``s-2 -> s`` is allowed.

    Args:
        padded: ``(B, S)`` int64 labels (blank-padded, as from :func:`check_ctc_arguments`).
    Returns:
        ``states``: ``(B, N)`` int64 class id of each state, ``N = 2S + 1``.
        ``can_skip``: ``(B, N)`` bool, True where ``states[s]`` is a label differing from ``states[s-2]``.
    """
    batch, max_len = padded.shape
    states = torch.full((batch, 2 * max_len + 1), blank, dtype=torch.long, device=padded.device)
    states[:, 1::2] = padded
    can_skip = torch.zeros_like(states, dtype=torch.bool)
    can_skip[:, 3::2] = padded[:, 1:] != padded[:, :-1]
    can_skip[:, 1::2] &= padded != blank  # padding slots hold blank: never skip into them
    return states, can_skip


def required_frames(padded: torch.Tensor, target_lengths: LengthsLike) -> torch.Tensor:
    """``(B,)`` int64 fewest frames any CTC alignment of each target needs: its length plus its adjacent repeats.

    Args:
        padded: ``(B, S)`` integer labels, any ids (class ids, code points); entries at or past a row's
            length are ignored, whatever they hold.
        target_lengths: ``(B,)`` integers (a tensor or a sequence of ints).
    Returns:
        ``(B,)`` int64 on ``padded``'s device; a sample is feasible iff its input length is at least this.
    """
    target_lengths = torch.as_tensor(target_lengths, device=padded.device).long()
    repeats = padded[:, 1:] == padded[:, :-1]  # each adjacent equal pair needs a blank frame between
    inside = torch.arange(padded.shape[1], device=padded.device)[1:] < target_lengths[:, None]
    return target_lengths + (repeats & inside).sum(1)


def feasible(checked: CheckedTargets) -> torch.Tensor:
    """``(B,)`` bool: some alignment fits, i.e. ``input_length >= required_frames``."""
    return checked.input_lengths >= required_frames(checked.padded, checked.target_lengths)


def final_log_likelihood(alpha: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``log p(l|x)`` from the last alpha ``(B, N)``: end in the final blank or the final label."""
    last = 2 * target_lengths
    ends = torch.stack([last, (last - 1).clamp_min(0)], dim=1)  # (B, 2)
    scores = alpha.gather(1, ends)
    no_label = (target_lengths == 0)[:, None] & torch.tensor([False, True], device=alpha.device)
    return safe_logsumexp(scores.masked_fill(no_label, NEG_INF), dim=1)
