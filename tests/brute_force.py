"""Exhaustive-enumeration CTC reference for tests: float64, one sample, every one of the ``C**T`` paths.

Only usable for tiny inputs (``C**T`` up to a few thousand). Inputs are a single sample:
``log_probs`` is ``(T, C)`` (any float dtype, used as float64), ``target`` a sequence of label ids.
Nothing here shares code with ``losses``: it is the independent ground truth.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch


def collapse(path: Sequence[int], blank: int) -> list[int]:
    """CTC collapse: merge runs of equal tokens, then drop blanks."""
    return [token for token, _ in itertools.groupby(path) if token != blank]


def alignments(num_frames: int, num_classes: int, target: Sequence[int], blank: int) -> list[tuple[int, ...]]:
    """Every frame-level path of length ``num_frames`` over ``num_classes`` that collapses to ``target``."""
    target = list(target)
    return [
        path
        for path in itertools.product(range(num_classes), repeat=num_frames)
        if collapse(path, blank) == target
    ]


def _path_log_probs(log_probs: torch.Tensor, target: Sequence[int], blank: int) -> list[tuple[tuple[int, ...], float]]:
    """``(path, log P(path))`` for every alignment, the score summed frame by frame from t = 0."""
    lp = log_probs.double().tolist()
    num_frames, num_classes = log_probs.shape
    return [
        (path, sum(lp[t][c] for t, c in enumerate(path)))
        for path in alignments(num_frames, num_classes, target, blank)
    ]


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def ctc_nll(log_probs: torch.Tensor, target: Sequence[int], blank: int) -> float:
    """``-log sum_{alignments} prod_t exp(log_probs[t, path_t])``; ``math.inf`` when there is no alignment."""
    return -_log_sum_exp([score for _, score in _path_log_probs(log_probs, target, blank)])


def _path_posterior(log_probs: torch.Tensor, target: Sequence[int], blank: int) -> list[tuple[tuple[int, ...], float]]:
    """``(path, P(path | target))`` over alignments; empty when no alignment has positive probability."""
    scored = _path_log_probs(log_probs, target, blank)
    log_norm = _log_sum_exp([score for _, score in scored])
    if log_norm == -math.inf:
        return []
    return [(path, math.exp(score - log_norm)) for path, score in scored]


def posteriors(log_probs: torch.Tensor, target: Sequence[int], blank: int) -> torch.Tensor:
    """``(T, C)`` float64 ``gamma[t, c] = P(path_t = c | target)``; zeros if no alignment has positive probability."""
    gamma = torch.zeros(log_probs.shape, dtype=torch.float64)
    for path, prob in _path_posterior(log_probs, target, blank):
        for t, c in enumerate(path):
            gamma[t, c] += prob
    return gamma


def path_entropy(log_probs: torch.Tensor, target: Sequence[int], blank: int) -> float:
    """Entropy (nats) of ``P(path | target)`` over alignments; 0.0 if no alignment has positive probability."""
    return -sum(prob * math.log(prob) for _, prob in _path_posterior(log_probs, target, blank) if prob > 0)


def differentiable_nll_entropy(log_probs: torch.Tensor, target: Sequence[int], blank: int):
    """:func:`ctc_nll` and :func:`path_entropy` as 0-d tensors differentiable w.r.t. ``log_probs`` (its dtype):
    the same enumeration, summed with torch ops. Without any alignment: ``(inf, 0)``, constants."""
    num_frames, num_classes = log_probs.shape
    paths = alignments(num_frames, num_classes, target, blank)
    if not paths:
        return torch.tensor(math.inf, dtype=log_probs.dtype), torch.zeros((), dtype=log_probs.dtype)
    frames = torch.arange(num_frames)
    scores = torch.stack([log_probs[frames, torch.tensor(path, dtype=torch.long)].sum() for path in paths])
    log_norm = scores.logsumexp(0)
    log_posterior = scores - log_norm
    return -log_norm, -(log_posterior.exp() * log_posterior).sum()


def fewest_frames(target: Sequence[int], blank: int) -> int:
    """Length of the shortest path that collapses to ``target``: the labels, a blank between equal neighbours."""
    path: list[int] = []
    for label in target:
        if path and path[-1] == label:
            path.append(blank)
        path.append(label)
    assert collapse(path, blank) == list(target)
    return len(path)


def state_sequence(path: Sequence[int], blank: int) -> list[int]:
    """Per-frame state in the blank-interleaved target ``(blank, l_1, blank, ..., l_L, blank)``.

    Frame ``t`` is in state ``2k - 1`` when it emits the ``k``-th label (1-based) and in state ``2k``
    when it is a blank after ``k`` labels have been emitted.
    """
    states, emitted, previous = [], 0, blank
    for token in path:
        if token != blank and token != previous:
            emitted += 1
        states.append(2 * emitted - 1 if token != blank else 2 * emitted)
        previous = token
    return states


def viterbi(log_probs: torch.Tensor, target: Sequence[int], blank: int) -> tuple[list[int], float]:
    """Best alignment (token id per frame) and its log-score ``sum_t log_probs[t, path_t]``.

    Tie rule (same as ``losses.alignment.forced_align``): among alignments with the highest score, the
    one whose :func:`state_sequence`, read from the last frame backwards, is lexicographically largest.
    Without any alignment: ``([blank] * T, -inf)``.
    """
    scored = _path_log_probs(log_probs, target, blank)
    if not scored:
        return [blank] * log_probs.shape[0], -math.inf
    best_path, best_score = max(scored, key=lambda item: (item[1], state_sequence(item[0], blank)[::-1]))
    return list(best_path), best_score


def labelling_log_probs(log_probs: torch.Tensor, blank: int) -> dict[tuple[int, ...], float]:
    """``{labelling: log P(labelling)}``, summed over every path of the ``(T, C)`` log-probs that collapses to it:
    the exact scores a CTC decoder with an unbounded beam ranks (labellings of no path are absent)."""
    lp = log_probs.double().tolist()
    num_frames, num_classes = log_probs.shape
    scores: dict[tuple[int, ...], list[float]] = {}
    for path in itertools.product(range(num_classes), repeat=num_frames):
        scores.setdefault(tuple(collapse(path, blank)), []).append(sum(lp[t][c] for t, c in enumerate(path)))
    return {labelling: _log_sum_exp(values) for labelling, values in scores.items()}


def best_path(log_probs: torch.Tensor) -> tuple[tuple[int, ...], float]:
    """The most probable frame-level path of ``(T, C)`` log-probs (the first in enumeration order among equals)
    and its log-prob, by enumerating all ``C**T`` paths."""
    lp = log_probs.double().tolist()
    num_frames, num_classes = log_probs.shape
    return max(((path, sum(lp[t][c] for t, c in enumerate(path)))
                for path in itertools.product(range(num_classes), repeat=num_frames)), key=lambda item: item[1])
