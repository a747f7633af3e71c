"""CTC decoding of time-major log-probs ``(T, B, C)``: best path (greedy) and batched prefix beam search.

Every decoder returns a :class:`Decoded`: per line the label ids (blank removed, repeats collapsed) as a Python
list, and a log-score. Mapping ids to text is the charset's job. Everything runs in tensors on the log-probs'
device; the beam search loops over time only, extending every prefix of every line by every class at once.

The functions (:func:`greedy_decode`, :func:`beam_search`) are what the decoder objects the configs build
(:class:`GreedyDecoder`, :class:`BeamSearchDecoder`, ``conf/decoder/*.yaml``) call; any object with the
:class:`Decoder` call signature can stand in for them.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BeamSearchDecoder", "Decoded", "Decoder", "GreedyDecoder", "beam_search", "greedy_decode"]

_HASH_MOD = 2**31 - 1  # Mersenne prime: also the 31-bit mask of the low half of a packed key
_HASH_BASES = (911_382_323, 972_663_749)


class Decoded(NamedTuple):
    """What a decoder returns for ``B`` lines.

    ``labels``: ``B`` lists of label ids. ``scores``: ``(B,)`` float log-score of each line's labelling, on the
    log-probs' device: the decoder's own measure of it (see each decoder), higher is better.
    """

    labels: list[list[int]]
    scores: Tensor


class Decoder(Protocol):
    """``decoder(log_probs (T, B, C), input_lengths (B,), blank) -> Decoded``."""

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded: ...


class GreedyDecoder:
    """Best-path decoding (:func:`greedy_decode`); scores are the best path's log-probability."""

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded:
        return greedy_decode(log_probs, input_lengths, blank=blank)

    def __repr__(self) -> str:
        return "GreedyDecoder()"


class BeamSearchDecoder:
    """Prefix beam search (:func:`beam_search`) keeping ``beam_width`` prefixes per frame; scores are the
    labelling's log-probability summed over its alignments."""

    def __init__(self, beam_width: int = 10):
        if beam_width < 1:
            raise ValueError(f"beam_width must be positive, got {beam_width}")
        self.beam_width = beam_width

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded:
        return beam_search(log_probs, input_lengths, beam_width=self.beam_width, blank=blank)

    def __repr__(self) -> str:
        return f"BeamSearchDecoder(beam_width={self.beam_width})"


def greedy_decode(log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded:
    """Best-path decoding: most likely class per frame, repeats collapsed, blanks dropped.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities (any monotone scores give the same labels).
        input_lengths: ``(B,)`` int64 number of valid frames per line; later frames are ignored.
        blank: index of the CTC blank class.

    Returns:
        :class:`Decoded`: ``B`` lists of label ids, and ``(B,)`` the log-probability of the best path,
        ``sum_t max_c log_probs[t, b, c]`` over the line's valid frames (float32 for half inputs), a lower bound
        of the labelling's log-probability (which sums over all of its alignments).
    """
    num_frames = log_probs.shape[0]
    peak, best = log_probs.max(-1)  # (T, B) each
    frames = torch.arange(num_frames, device=best.device)[:, None]
    after_end = frames >= input_lengths.to(best.device)  # (T, B)
    scores = peak.masked_fill(after_end, 0.0).sum(0, dtype=torch.promote_types(peak.dtype, torch.float32))
    best = best.masked_fill(after_end, blank).T  # (B, T)
    previous = F.pad(best[:, :-1], (1, 0), value=blank)
    return Decoded(_compact(best, (best != blank) & (best != previous)), scores)


class _Beams(NamedTuple):
    """``K`` prefixes per line, each field ``(B, K)``.

    A prefix is identified by ``key``, a rolling hash of its labels (two 31-bit residues packed into
    int64); ``parent_key`` is the key of the prefix without its last label. Slots with
    ``p_blank = p_label = -inf`` are dead and may duplicate a live prefix.
    """

    p_blank: Tensor  # float log P(prefix, path ends in blank)
    p_label: Tensor  # float log P(prefix, path ends in its last label)
    last: Tensor  # int64 last label, -1 for the empty prefix
    key: Tensor  # int64 hash of the labels
    parent_key: Tensor  # int64 hash of the labels but the last


def beam_search(log_probs: Tensor, input_lengths: Tensor, beam_width: int = 10, blank: int = 0) -> Decoded:
    """CTC prefix beam search without a language model (Hannun et al., 2014).

    Each prefix carries the probability of all paths collapsing to it, split by whether the path
    ends in blank or in the prefix's last label; extensions that reproduce a prefix already in the
    beam are merged into it, so the beam never holds a labelling twice. Among equal scores the
    candidate with the lower (beam slot, class) index wins, so results are deterministic. Prefix
    identity uses a 62-bit hash: two different labellings in one line colliding has probability
    about ``2**-62`` per comparison.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities, ``C`` including the blank. Half
            precision is upcast to float32.
        input_lengths: ``(B,)`` int64 number of valid frames per line; later frames are ignored.
        beam_width: number of prefixes kept per line after every frame.
        blank: index of the CTC blank class, anywhere in ``[0, C)``.

    Returns:
        :class:`Decoded`: the best labelling of each line as a list of label ids, and ``(B,)`` float
        log-probabilities of those labellings summed over all their paths (exact whenever no path of the
        labelling was pruned, e.g. for a beam as wide as all prefixes).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be positive, got {beam_width}")
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        log_probs = log_probs.float()
    num_frames, batch, _ = log_probs.shape
    log_probs = _blank_after_end(log_probs, input_lengths.to(log_probs.device), blank)
    beams = _initial_beams(batch, beam_width, log_probs)
    history = []
    for t in range(num_frames):
        beams, parent, label = _step(beams, log_probs[t], blank)
        history.append((parent, label))
    totals = torch.logaddexp(beams.p_blank, beams.p_label)
    best = totals.argmax(1)  # the first of equal maxima, like the tie rule in _top_k_first
    scores = totals.gather(1, best[:, None])[:, 0]
    path = _backtrack(history, best, blank)
    return Decoded(_compact(path, path != blank), scores)


def _blank_after_end(log_probs: Tensor, input_lengths: Tensor, blank: int) -> Tensor:
    """Make frames ``t >= input_lengths[b]`` certain blanks (log-prob 0, others ``-inf``).

    A certain blank keeps every prefix and its total probability, so a finished line's beam is
    unchanged apart from moving all its mass into the ends-in-blank part. ``(T, B, C)`` in and out.
    """
    num_frames, _, num_classes = log_probs.shape
    after_end = torch.arange(num_frames, device=log_probs.device)[:, None] >= input_lengths
    certain_blank = torch.full((num_classes,), float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    certain_blank[blank] = 0.0
    return torch.where(after_end[..., None], certain_blank, log_probs)


def _initial_beams(batch: int, width: int, like: Tensor) -> _Beams:
    """Slot 0 holds the empty prefix with probability one; the other slots are dead."""
    p_blank = like.new_full((batch, width), float("-inf"))
    p_blank[:, 0] = 0.0
    zeros = torch.zeros(batch, width, dtype=torch.int64, device=like.device)
    return _Beams(p_blank, torch.full_like(p_blank, float("-inf")), zeros - 1, zeros, zeros)


def _step(beams: _Beams, log_probs: Tensor, blank: int) -> tuple[_Beams, Tensor, Tensor]:
    """Advance every beam by one frame.

    Candidates are indexed flat as ``slot * C + class``: class ``c != blank`` is the extension
    ``p + c`` of the prefix ``p`` in that slot, and the blank column stands for ``p`` unchanged.

    Args:
        beams: current ``K`` prefixes per line.
        log_probs: ``(B, C)`` float log-probabilities of this frame.
        blank: index of the blank class.

    Returns:
        ``(beams, parent, label)``: the new top-K prefixes, and ``(B, K)`` int64 the slot each came
        from and the label it appended (``blank`` if it is its parent unchanged).
    """
    batch, width = beams.last.shape
    num_classes = log_probs.shape[1]
    total = torch.logaddexp(beams.p_blank, beams.p_label)  # (B, K)
    has_last = beams.last >= 0
    last = torch.where(has_last, beams.last, blank)  # the empty prefix points at its own blank column
    last_log_prob = log_probs.gather(1, last)

    # Prefix p unchanged: the frame is a blank, or a repeat of p's last label.
    stay_blank = total + log_probs[:, blank, None]
    stay_label = torch.where(has_last, beams.p_label + last_log_prob, float("-inf"))

    # Prefix p + c ends in c; a repeat of p's last label must follow a blank.
    extend = total[..., None] + log_probs[:, None, :]  # (B, K, C)
    extend.scatter_(2, last[..., None], (beams.p_blank + last_log_prob)[..., None])
    extend = extend.view(batch, width * num_classes)
    stay_label = torch.logaddexp(stay_label, _merge_duplicates(beams, total, last, extend, blank))

    is_stay = torch.arange(num_classes, device=last.device) == blank
    stay_total = torch.logaddexp(stay_blank, stay_label)
    scores = torch.where(is_stay, stay_total[..., None], extend.view(batch, width, num_classes))
    scores = scores.view(batch, width * num_classes)
    chosen = _top_k_first(scores, width)
    parent, label = chosen // num_classes, chosen % num_classes
    extended = label != blank
    parent_key = beams.key.gather(1, parent)
    new_beams = _Beams(
        p_blank=torch.where(extended, float("-inf"), stay_blank.gather(1, parent)),
        p_label=torch.where(extended, scores.gather(1, chosen), stay_label.gather(1, parent)),
        last=torch.where(extended, label, beams.last.gather(1, parent)),
        key=torch.where(extended, _extend_hash(parent_key, label), parent_key),
        parent_key=torch.where(extended, parent_key, beams.parent_key.gather(1, parent)),
    )
    return new_beams, parent, label


def _merge_duplicates(beams: _Beams, total: Tensor, last: Tensor, extend: Tensor, blank: int) -> Tensor:
    """Take the extensions ``p + c`` that equal a live prefix ``q`` of the beam out of ``extend``.

    Live prefixes are distinct, so each live ``q`` has at most one live parent ``p`` in the beam,
    found by ``key(p) == parent_key(q)``; its extension by ``last(q)`` is set to ``-inf`` in place.

    Args:
        beams: current prefixes; ``total`` ``(B, K)`` their log-probs, ``last`` ``(B, K)`` int64
            their last labels (``blank`` for the empty prefix).
        extend: ``(B, K * C)`` float ends-in-label log-probs of the extensions, flat by ``slot * C + c``.
        blank: index of the blank class.

    Returns:
        ``(B, K)`` float log-prob each prefix receives from its parent's extension (``-inf`` if none).
    """
    width = last.shape[1]
    num_classes = extend.shape[1] // width
    alive = total > float("-inf")
    is_parent = beams.parent_key[:, :, None] == beams.key[:, None, :]  # (B, Kq, Kp)
    is_parent &= (alive & (beams.last >= 0))[:, :, None] & alive[:, None, :]
    has_parent, parent_slot = is_parent.any(2), is_parent.to(torch.uint8).argmax(2)
    own_blank = torch.arange(width, device=last.device) * num_classes + blank
    twin = torch.where(has_parent, parent_slot * num_classes + last, own_blank)  # (B, Kq)
    incoming = torch.where(has_parent, extend.gather(1, twin), float("-inf"))
    extend.scatter_(1, twin, float("-inf"))  # own blank columns are overwritten by the caller
    return incoming


def _top_k_first(scores: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` int64, ascending, of the ``k`` largest of ``scores`` ``(B, N)``.

    Ties at the k-th value go to the lowest indices, unlike :func:`torch.topk`, whose choice among
    ties is unspecified and device-dependent.
    """
    kth = scores.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    above, tie = scores > kth, scores == kth
    take = above | (tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True)))
    slot = torch.where(take, take.cumsum(1) - 1, k)  # column k collects the rest
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(slot)
    return slot.new_zeros(scores.shape[0], k + 1).scatter_(1, slot, positions)[:, :k]


def _extend_hash(key: Tensor, label: Tensor) -> Tensor:
    """Key of a prefix extended by ``label``: two polynomial hashes mod ``2**31 - 1``, packed.

    ``key`` and ``label`` are int64 of one shape; every product stays below ``2**62``.
    """
    high = (key >> 31) * _HASH_BASES[0] + label + 1
    low = (key & _HASH_MOD) * _HASH_BASES[1] + label + 1
    return (high % _HASH_MOD) << 31 | (low % _HASH_MOD)


def _backtrack(history: list[tuple[Tensor, Tensor]], slot: Tensor, blank: int) -> Tensor:
    """Labels appended along the way to ``slot`` ``(B,)``, as ``(B, T)`` int64 with ``blank`` for stays.

    ``history`` holds per frame the ``(parent, label)`` ``(B, K)`` returned by :func:`_step`.
    """
    path = slot.new_full((slot.shape[0], len(history)), blank)
    slot = slot[:, None]
    for t in range(len(history) - 1, -1, -1):
        parent, label = history[t]
        path[:, t] = label.gather(1, slot)[:, 0]
        slot = parent.gather(1, slot)
    return path


def _compact(labels: Tensor, keep: Tensor) -> list[list[int]]:
    """Per row of ``labels`` ``(B, L)`` int64, the entries where ``keep`` ``(B, L)`` bool, in order."""
    kept_first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    rows = torch.cat([keep.sum(1, keepdim=True), labels.gather(1, kept_first)], dim=1).tolist()
    return [row[1 : 1 + row[0]] for row in rows]
