"""CTC alignments: Viterbi forced alignment, token spans, and per-frame posterior (γ) targets.

All functions take :func:`torch.nn.functional.ctc_loss`'s arguments: ``log_probs`` ``(T, B, C)``,
``targets`` padded ``(B, S)`` or concatenated 1-D, lengths ``(B,)`` tensors or sequences of ints.
States are those of the blank-interleaved target ``z = (blank, l_1, blank, ..., l_L, blank)``, numbered
``0 .. 2L``; batched, ``N = 2S + 1`` states (see :mod:`losses.targets`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from losses.base import compute_dtype
from losses.logspace import NEG_INF
from losses.targets import CheckedTargets, LengthsLike, check_ctc_arguments, extended_targets, feasible

__all__ = ["TokenSpan", "forced_align", "path_to_spans", "ctc_alignment_targets"]

STAY, PREVIOUS, SKIP = 0, 1, 2  # backpointer values: how many states the path advanced into a frame


def _shift(x: torch.Tensor, offset: int, fill: float | bool) -> torch.Tensor:
    """``(B, N)`` -> ``(B, N)`` with ``out[:, s] = x[:, s - offset]`` and ``fill`` where ``s < offset``."""
    padding = x.new_full((x.shape[0], offset), fill)
    return torch.cat([padding, x], dim=1)[:, : x.shape[1]]


def _best_predecessor(
    alpha: torch.Tensor, reachable: torch.Tensor, can_skip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max over the transitions into each state, ties going to stay, then previous, then skip.

    Args:
        alpha: ``(B, N)`` best log-score of a path ending in each state at the previous frame.
        reachable: ``(B, N)`` bool, some path reaches the state at the previous frame (even at score -inf).
        can_skip: ``(B, N)`` bool, the skip ``s-2 -> s`` is allowed.
    Returns:
        ``(best, best_reachable, step)``: ``(B, N)`` best predecessor score, whether any predecessor is
        reachable, and the uint8 step (:data:`STAY`, :data:`PREVIOUS`, :data:`SKIP`) taken from it.
        A candidate replaces the current best only if it is reachable and the best is not, or it is
        strictly larger, so equal scores (including -inf) keep the earlier candidate.
    """
    best, best_reachable = alpha, reachable
    step = torch.full_like(alpha, STAY, dtype=torch.uint8)
    for offset in (PREVIOUS, SKIP):
        score = _shift(alpha, offset, NEG_INF)
        reach = _shift(reachable, offset, False)
        if offset == SKIP:
            reach = reach & can_skip
        better = reach & (~best_reachable | (score > best))
        best = torch.where(better, score, best)
        step = torch.where(better, torch.full_like(step, offset), step)
        best_reachable = best_reachable | reach
    return best, best_reachable, step


def _viterbi_forward(
    emissions: torch.Tensor, can_skip: torch.Tensor, input_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max-product forward pass over the extended target.

    The recursion starts from a virtual frame ``-1`` where only state 0 is reachable (score 0), so that
    frame 0 may start in state 0 (stay) or state 1 (previous), like every later frame.

    Args:
        emissions: ``(T, B, N)`` log-prob of each state's class, ``N = 2S + 1``.
        can_skip: ``(B, N)`` bool.
        input_lengths: ``(B,)`` int64.
    Returns:
        ``backpointers``: ``(T, B, N)`` uint8 step into each state at each frame;
        ``final``: ``(B, N)`` scores at each sample's last frame ``input_length - 1``;
        ``final_reachable``: ``(B, N)`` bool reachability there.
    """
    num_frames, batch, num_states = emissions.shape
    alpha = emissions.new_full((batch, num_states), NEG_INF)
    alpha[:, 0] = 0.0
    reachable = torch.zeros_like(alpha, dtype=torch.bool)
    reachable[:, 0] = True
    final, final_reachable = alpha, reachable
    backpointers = torch.zeros(emissions.shape, dtype=torch.uint8, device=emissions.device)
    for t in range(num_frames):
        best, reachable, step = _best_predecessor(alpha, reachable, can_skip)
        backpointers[t] = step
        alpha = best + emissions[t]
        is_last = (input_lengths == t + 1)[:, None]
        final = torch.where(is_last, alpha, final)
        final_reachable = torch.where(is_last, reachable, final_reachable)
    return backpointers, final, final_reachable


def _end_state(final: torch.Tensor, final_reachable: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 last state: the final label ``2L-1`` only if strictly better than the final blank ``2L``."""
    blank_end = 2 * target_lengths
    label_end = (blank_end - 1).clamp(min=0)
    ends = torch.stack([blank_end, label_end], dim=1)  # (B, 2)
    (blank_score, label_score), (blank_reach, label_reach) = final.gather(1, ends).T, final_reachable.gather(1, ends).T
    use_label = (target_lengths > 0) & label_reach & (~blank_reach | (label_score > blank_score))
    return torch.where(use_label, label_end, blank_end)


def _backtrack(backpointers: torch.Tensor, end: torch.Tensor, input_lengths: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int64 state per frame, following backpointers from ``end`` at frame ``input_length - 1``.

    Frames at or past ``input_length`` hold meaningless (but in-range) states; callers mask them.
    """
    num_frames, batch, _ = backpointers.shape
    state_path = torch.empty(batch, num_frames, dtype=torch.long, device=end.device)
    state = end
    for t in reversed(range(num_frames)):
        state = torch.where(input_lengths == t + 1, end, state)
        state_path[:, t] = state
        state = state - backpointers[t].gather(1, state[:, None]).squeeze(1).long()
    return state_path


def forced_align(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: LengthsLike,
    target_lengths: LengthsLike,
    blank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Viterbi (max-product) CTC alignment, batched; loops over time only, no host syncs in the loops.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities (float16/bfloat16 are computed in float32).
        targets: padded ``(B, S)`` or concatenated ``(sum(target_lengths),)`` integer labels.
        input_lengths: ``(B,)`` frames per sample, each ``<= T``.
        target_lengths: ``(B,)`` labels per sample.
        blank: blank class index.
    Returns:
        ``paths``: ``(B, T)`` int64 token id per frame (blank included) of the best alignment; ``blank``
        at frames ``>= input_length``.
        ``scores``: ``(B, T)`` float (float64 for float64 input, else float32),
        ``log_probs[t, b, paths[b, t]]`` on frames ``< input_length`` and 0 beyond, so ``scores.sum(1)``
        is the best alignment's log-score.

    Infeasible samples (``input_length <`` :func:`losses.targets.required_frames`, no alignment exists) get an all-blank
    path and ``-inf`` scores on their valid frames. A feasible sample whose every alignment scores
    ``-inf`` still gets a valid alignment (with ``-inf`` on some frames).

    Ties: among alignments with equal total score, the one whose state sequence ``(s_{T'-1}, ..., s_0)``
    (``T' = input_length``, states ``0 .. 2L`` as in the module docstring), read from the last valid frame
    backwards, is lexicographically largest. So when both tie it ends on
    the final blank rather than the final label, and at every earlier frame it is as far along the target
    as possible (the recursion prefers staying > previous state > skip). This holds for exact sums (e.g.
    small integer log-probs) with a finite best score; rounding can break near-ties either way.
    """
    checked = check_ctc_arguments(log_probs, targets, input_lengths, target_lengths, blank)
    log_probs = log_probs.detach().to(compute_dtype(log_probs.dtype))
    num_frames, batch, _ = log_probs.shape
    states, can_skip = extended_targets(checked.padded, blank)
    emissions = log_probs.gather(2, states.expand(num_frames, -1, -1))
    backpointers, final, final_reachable = _viterbi_forward(emissions, can_skip, checked.input_lengths)
    end = _end_state(final, final_reachable, checked.target_lengths)
    state_path = _backtrack(backpointers, end, checked.input_lengths)

    frame_valid = torch.arange(num_frames, device=log_probs.device) < checked.input_lengths[:, None]  # (B, T)
    ok = feasible(checked)[:, None]
    paths = torch.where(frame_valid & ok, states.gather(1, state_path), blank)
    frame_scores = log_probs.gather(2, paths.T[:, :, None]).squeeze(2).T
    scores = torch.where(frame_valid, torch.where(ok, frame_scores, NEG_INF), 0.0)
    return paths, scores


class TokenSpan(NamedTuple):
    """One emitted token of a frame-level path: frames ``start <= t < end`` (``end`` exclusive) emit ``token``.

    ``score``: the span's log-score, the sum of the per-frame ``scores`` given to :func:`path_to_spans` over its
    frames (with :func:`forced_align`'s scores, the summed log-prob of ``token`` on those frames); ``None`` when
    no scores were given.
    """

    token: int
    start: int
    end: int
    score: float | None


def path_to_spans(
    path: Sequence[int] | torch.Tensor, blank: int = 0, scores: Sequence[float] | torch.Tensor | None = None
) -> list[TokenSpan]:
    """Token spans of a 1-D frame-level path, in order.

    Consecutive equal non-blank tokens form one span; blanks are dropped. Slice batched paths (and scores) to
    the sample's input length first. Example: ``[0, 3, 3, 0, 3, 5]`` -> spans ``(token, start, end)``
    ``(3, 1, 3), (3, 4, 5), (5, 5, 6)``.

    Args:
        path: ``(T,)`` token id per frame, e.g. a row of :func:`forced_align`'s ``paths``.
        blank: blank class index.
        scores: optional ``(T,)`` per-frame log-scores, e.g. the matching row of :func:`forced_align`'s
            ``scores``; each span's ``score`` is their sum over its frames (in float64).
    """
    tokens = path.tolist() if isinstance(path, torch.Tensor) else list(path)
    frame_scores = None if scores is None else (scores.tolist() if isinstance(scores, torch.Tensor) else list(scores))
    if frame_scores is not None and len(frame_scores) != len(tokens):
        raise ValueError(f"scores must have one value per frame of path ({len(tokens)}), got {len(frame_scores)}")
    runs: list[list[int]] = []  # [token, start, end]
    for t, token in enumerate(tokens):
        if token == blank:
            continue
        if runs and runs[-1][0] == token and runs[-1][2] == t:
            runs[-1][2] = t + 1
        else:
            runs.append([token, t, t + 1])
    return [
        TokenSpan(token, start, end, None if frame_scores is None else float(sum(frame_scores[start:end])))
        for token, start, end in runs
    ]


def ctc_alignment_targets(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: LengthsLike,
    target_lengths: LengthsLike,
    blank: int = 0,
    ctc_loss: Callable[..., torch.Tensor] = F.ctc_loss,
) -> torch.Tensor:
    """Per-frame class posteriors ``γ[t, b, c] = P(π_t = c | target)`` under the CTC path posterior.

    γ is read off the gradient of ``ctc_loss`` (any function with :func:`torch.nn.functional.ctc_loss`'s
    signature). The loss is taken of ``logits.log_softmax(-1)`` with ``logits = log_probs`` (so
    unnormalised scores are normalised per frame first); its gradient w.r.t. ``logits`` is then
    ``softmax(logits) - γ`` whether ``ctc_loss`` reports ``exp(log_probs) - γ`` (the built-in kernels) or
    ``-γ`` (a true autograd CTC) as its gradient, because the two differ by a per-frame multiple of
    ``exp(log_probs)``, which ``log_softmax`` projects away. Works under ``no_grad`` and ``inference_mode``.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities.
        targets, input_lengths, target_lengths, blank: as for :func:`torch.nn.functional.ctc_loss`.
        ctc_loss: the CTC implementation whose gradient defines γ.
    Returns:
        ``(T, B, C)`` detached γ, float64 for float64 input, else float32. Rows sum to 1 on frames
        ``< input_length`` of samples with ``p(target) > 0`` and are 0 elsewhere (frames past the input
        length, and samples no alignment fits or whose every alignment has probability 0).
    """
    return alignment_targets_and_nll(log_probs, targets, input_lengths, target_lengths, blank, ctc_loss)[0]


def alignment_targets_and_nll(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: LengthsLike,
    target_lengths: LengthsLike,
    blank: int = 0,
    ctc_loss: Callable[..., torch.Tensor] = F.ctc_loss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ctc_alignment_targets` and the per-sample CTC loss ``(B,)`` (``inf`` where ``p(target) = 0``)."""
    checked = check_ctc_arguments(log_probs, targets, input_lengths, target_lengths, blank)
    with torch.inference_mode(False), torch.enable_grad():  # clones: tensors made in inference mode can't be saved
        checked = CheckedTargets(*(tensor.clone() for tensor in checked))
        logits = log_probs.detach().to(compute_dtype(log_probs.dtype)).clone().requires_grad_()
        nll = ctc_loss(logits.log_softmax(-1), *checked, blank=blank, reduction="none", zero_infinity=False)
        possible = nll.isfinite()  # an impossible sample's gradient may be NaN: masked out below
        (grad,) = torch.autograd.grad(torch.where(possible, nll, 0.0).sum(), logits)
    gamma = logits.detach().softmax(-1) - grad
    frame_valid = torch.arange(logits.shape[0], device=logits.device)[:, None] < checked.input_lengths  # (T, B)
    keep = frame_valid & possible & feasible(checked)
    return torch.where(keep[:, :, None], gamma, 0.0), nll.detach()
