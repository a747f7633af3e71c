"""The prefix beam search of :func:`crnn.decoding.beam_search`, one line at a time, compiled by numba: its CPU backend.

On a CPU the batched tensor search pays a fixed cost per frame (~150 small tensor ops) and keeps every line's beam
as wide as the fullest one; here each line runs its own loop over its kept frames, so a frame costs a few
operations per (prefix, candidate class). Both searches compute the same thing, step for step: the same pruning
(``token_min_logp``, skipped certain blanks), the same merging of prefixes, the same fused ranking (char LM,
insertion bonus, lexicon, hotwords: the dense tables of :class:`crnn.decoding.Fusion`) and the same tie order
(lower ``(slot, class)`` first), so the labels agree and the scores agree to float rounding
(``tests/test_decoding.py`` runs the search tests on both). The word LM, whose scores come from KenLM on the host,
has no compiled form: :func:`crnn.decoding.beam_search` keeps the tensor search for it.

Compiled on first use (a few seconds, then cached on disk by numba).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from crnn.decoding import _HASH_BASES, _HASH_MOD, interleaved_lm_tables  # the tensor search's prefix keys

_HASH_BASE_HIGH, _HASH_BASE_LOW = _HASH_BASES
MIN_LINES_PER_THREAD = 32  # fewer lines per call run in one thread: a thread costs more than they take


def _compiled(function):
    """``numba.njit(function)``, its machine code cached on disk; without the cache where numba finds no writable
    place for it (a read-only install, and neither a writable home nor ``NUMBA_CACHE_DIR``): then every process
    compiles it anew."""
    try:
        return njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available for file ..."
        return njit(nogil=True)(function)


@_compiled
def _logaddexp(a, b):
    """``log(exp(a) + exp(b))`` as torch computes it (``-inf`` for two ``-inf``); without ``exp`` and ``log1p``
    where one is ``-inf`` (a pruned class), which gives the other exactly, as those would."""
    if a == -np.inf:
        return b
    if b == -np.inf or (a == b and np.isinf(a)):
        return a
    return max(a, b) + np.log1p(np.exp(-abs(a - b)))


@_compiled
def _extend_hash(key, label):
    """The key of a prefix extended by ``label``: :func:`crnn.decoding._extend_hash` for one int64."""
    high = (key >> 31) * _HASH_BASE_HIGH + label + 1
    low = (key & _HASH_MOD) * _HASH_BASE_LOW + label + 1
    return (high % _HASH_MOD) << 31 | (low % _HASH_MOD)


@_compiled
def _top_positions(ranking, count, keep, order):
    """Write into ``order[:keep]`` the positions of the ``keep`` largest of ``ranking[:count]``, largest first,
    ties to the lower position; returns ``keep``. An insertion into a sorted list of at most ``keep``: after the
    first few slots' candidates, most others fail one comparison."""
    size = 0
    for position in range(count):
        value = ranking[position]
        if size == keep:
            if not value > ranking[order[keep - 1]]:
                continue
            size -= 1
        i = size
        while i > 0 and value > ranking[order[i - 1]]:
            order[i] = order[i - 1]
            i -= 1
        order[i] = position
        size += 1
    return keep


@_compiled
def _search_line(log_probs, length, beam_width, blank, token_min_logp, skip_blanks, step, lm_next, lm_end,
                 lm_start, lexicon_next, accepting, lexicon_start, lexicon_sink, hotword_next, hotword_potential,
                 hotword_commit, hotword_root, hotword_space, labels_out):
    """Search one line: ``log_probs`` ``(T, C)``, its first ``length`` frames. Writes the best labelling into
    ``labels_out`` ``(T,)`` and returns ``(number of labels, log P_ctc(labels))`` (``(0, -inf)`` where no
    prefix is allowed). The tables are :class:`crnn.decoding.Fusion`'s (one-state ones stand for a prior that
    is absent); ``lexicon_sink < 0``: no lexicon; ``hotword_root < 0``: no hotwords."""
    num_frames, num_classes = log_probs.shape
    neg_inf = log_probs.dtype.type(-np.inf)
    zero = log_probs.dtype.type(0.0)
    most = beam_width * num_classes

    # The beam: n prefixes, slot by slot.
    p_blank = np.full(beam_width, neg_inf, log_probs.dtype)
    p_label, total, prior = p_blank.copy(), p_blank.copy(), np.zeros(beam_width, log_probs.dtype)
    last = np.full(beam_width, -1, np.int64)
    key, parent_key = np.zeros(beam_width, np.int64), np.zeros(beam_width, np.int64)
    lm_state = np.full(beam_width, lm_start, np.int64)
    lexicon_state = np.full(beam_width, lexicon_start, np.int64)
    hotword_state = np.full(beam_width, max(hotword_root, 0), np.int64)
    p_blank[0], total[0] = zero, zero
    n = 1
    new = (p_blank.copy(), p_label.copy(), total.copy(), prior.copy(), last.copy(), key.copy(),
           parent_key.copy(), lm_state.copy(), lexicon_state.copy(), hotword_state.copy())

    # One frame's candidates: positions slot * num_candidates + column, as in the tensor search's top-k.
    frame = np.empty(num_classes, log_probs.dtype)
    classes = np.empty(num_classes, np.int64)
    column_of = np.empty(num_classes, np.int64)
    stay_blank, stay_label = np.empty(beam_width, log_probs.dtype), np.empty(beam_width, log_probs.dtype)
    score, ranking, candidate_prior = (np.empty(most, log_probs.dtype), np.empty(most, log_probs.dtype),
                                       np.empty(most, log_probs.dtype))
    order = np.empty(beam_width, np.int64)
    history_parent = np.empty((num_frames, beam_width), np.int64)
    history_label = np.empty((num_frames, beam_width), np.int64)
    steps, skipped, after_blank = 0, zero, False

    for t in range(min(num_frames, length)):
        # Prune: a non-blank class below token_min_logp, unless the frame's most likely, is -inf.
        best_class = np.argmax(log_probs[t])
        num_candidates = 0
        for c in range(num_classes):
            value = log_probs[t, c]
            kept = c == blank or c == best_class or value >= token_min_logp
            frame[c] = value if kept else neg_inf
            column_of[c] = -1
            if c == blank or (kept and value > neg_inf):
                classes[num_candidates] = c
                column_of[c] = num_candidates
                num_candidates += 1
        if skip_blanks and num_candidates == 1:  # a certain blank: every prefix stays, scaled alike
            skipped += frame[blank]
            after_blank = True
            continue
        blank_column = column_of[blank]

        # Prefixes unchanged (a blank, or a repeat of the last label) and extended by every candidate class.
        for k in range(n):
            if after_blank:
                p_blank[k], p_label[k] = total[k], neg_inf
            stay_blank[k] = total[k] + frame[blank]
            stay_label[k] = p_label[k] + frame[last[k]] if last[k] >= 0 else neg_inf
            for j in range(num_candidates):
                c = classes[j]
                if c == blank:
                    continue
                value = (p_blank[k] if c == last[k] else total[k]) + frame[c]
                if lexicon_sink >= 0 and lexicon_next[lexicon_state[k], c] == lexicon_sink:
                    value = neg_inf
                score[k * num_candidates + j] = value
        after_blank = False
        # An extension p + c that is already in the beam as q adds to q's stay instead.
        for q in range(n):
            if total[q] == neg_inf or last[q] < 0 or column_of[last[q]] < 0:
                continue
            for p in range(n):
                if total[p] > neg_inf and key[p] == parent_key[q]:
                    position = p * num_candidates + column_of[last[q]]
                    stay_label[q] = _logaddexp(stay_label[q], score[position])
                    score[position] = neg_inf
                    break
        for k in range(n):
            score[k * num_candidates + blank_column] = _logaddexp(stay_blank[k], stay_label[k])

        # Rank by the fused score and keep the best, ties to the lower position.
        count = n * num_candidates
        for k in range(n):
            for j in range(num_candidates):
                c = classes[j]
                position = k * num_candidates + j
                value = prior[k] + step[lm_state[k], c]
                if hotword_root >= 0:
                    boost = hotword_potential[hotword_next[hotword_state[k], c]] - hotword_potential[hotword_state[k]]
                    if c == hotword_space:
                        boost += hotword_commit[hotword_state[k]]
                    value += boost
                candidate_prior[position] = value
                ranking[position] = score[position] + value
        keep = _top_positions(ranking, count, min(beam_width, count), order)
        (new_p_blank, new_p_label, new_total, new_prior, new_last, new_key, new_parent_key, new_lm_state,
         new_lexicon_state, new_hotword_state) = new
        for i in range(keep):
            position = order[i]
            k = position // num_candidates
            c = classes[position - k * num_candidates]
            history_parent[steps, i], history_label[steps, i] = k, c
            if c == blank:
                new_p_blank[i], new_p_label[i], new_total[i] = stay_blank[k], stay_label[k], score[position]
                new_last[i], new_key[i], new_parent_key[i] = last[k], key[k], parent_key[k]
            else:
                new_p_blank[i], new_p_label[i], new_total[i] = neg_inf, score[position], score[position]
                new_last[i], new_key[i], new_parent_key[i] = c, _extend_hash(key[k], c), key[k]
            new_prior[i] = candidate_prior[position]
            new_lm_state[i] = lm_next[lm_state[k], c]
            new_lexicon_state[i] = lexicon_next[lexicon_state[k], c] if lexicon_sink >= 0 else lexicon_state[k]
            new_hotword_state[i] = hotword_next[hotword_state[k], c] if hotword_root >= 0 else hotword_state[k]
        new = (p_blank, p_label, total, prior, last, key, parent_key, lm_state, lexicon_state, hotword_state)
        (p_blank, p_label, total, prior, last, key, parent_key, lm_state, lexicon_state,
         hotword_state) = (new_p_blank, new_p_label, new_total, new_prior, new_last, new_key, new_parent_key,
                           new_lm_state, new_lexicon_state, new_hotword_state)
        n = keep
        steps += 1

    # The best finished prefix by its fused score: the LM's end of line, the hotword ending the line, the lexicon.
    best, best_ranking = 0, neg_inf
    for k in range(n):
        value = prior[k] + lm_end[lm_state[k]]
        if hotword_root >= 0:
            value += hotword_commit[hotword_state[k]] - hotword_potential[hotword_state[k]]
        value = total[k] + value if accepting[lexicon_state[k]] else neg_inf
        if value > best_ranking:
            best, best_ranking = k, value
    if best_ranking == neg_inf:
        return 0, neg_inf
    num_labels, slot = 0, best
    for s in range(steps - 1, -1, -1):
        label = history_label[s, slot]
        if label != blank:
            labels_out[num_labels] = label
            num_labels += 1
        slot = history_parent[s, slot]
    labels_out[:num_labels] = labels_out[:num_labels][::-1].copy()
    return num_labels, total[best] + skipped


@_compiled
def search_lines(log_probs, lengths, beam_width, blank, token_min_logp, skip_blanks, step, lm_next, lm_end,
                 lm_start, lexicon_next, accepting, lexicon_start, lexicon_sink, hotword_next, hotword_potential,
                 hotword_commit, hotword_root, hotword_space):
    """:func:`_search_line` for every line of ``log_probs`` ``(B, T, C)`` (C-contiguous) with ``lengths``
    ``(B,)``: ``(B, T)`` int64 labels, ``(B,)`` their counts and ``(B,)`` log-probabilities."""
    batch, num_frames, _ = log_probs.shape
    labels = np.zeros((batch, num_frames), np.int64)
    counts = np.zeros(batch, np.int64)
    scores = np.empty(batch, log_probs.dtype)
    for b in range(batch):
        counts[b], scores[b] = _search_line(
            log_probs[b], lengths[b], beam_width, blank, token_min_logp, skip_blanks, step, lm_next, lm_end,
            lm_start, lexicon_next, accepting, lexicon_start, lexicon_sink, hotword_next, hotword_potential,
            hotword_commit, hotword_root, hotword_space, labels[b])
    return labels, counts, scores


def beam_search_lines(log_probs, input_lengths, beam_width: int, blank: int, fusion, token_min_logp: float | None):
    """Run :func:`search_lines` on CPU tensors: ``log_probs`` ``(T, B, C)`` float32/float64 (the fusion's class
    mask already added), ``input_lengths`` ``(B,)``, ``fusion`` a :class:`crnn.decoding.Fusion` of that dtype
    without a word LM, or None. Returns ``B`` label lists and ``(B,)`` numpy log-probabilities."""
    dtype = log_probs.numpy().dtype
    num_classes = log_probs.shape[2]
    if fusion is None:  # a one-state LM laid out as Fusion.build lays out an LM (one compiled variant for both)
        step, lm_next = interleaved_lm_tables(torch.zeros(1, num_classes, dtype=log_probs.dtype),
                                              torch.zeros(1, num_classes, dtype=torch.int32))
        tables = (step.numpy(), lm_next.numpy(), np.zeros(1, dtype), 0, np.zeros((1, num_classes), np.int32),
                  np.ones(1, np.bool_), 0, -1)
    else:
        lexicon = fusion.lexicon
        tables = (fusion.step.numpy(), fusion.lm_next.numpy(), fusion.lm_end.numpy(), fusion.lm_start,
                  lexicon.next_state.numpy(), lexicon.accepting.numpy(), lexicon.start, lexicon.sink)
    hotwords = None if fusion is None else fusion.hotwords
    if hotwords is None:
        tables += (np.zeros((1, 1), np.int64), np.zeros(1, dtype), np.zeros(1, dtype), -1, -1)
    else:
        tables += (hotwords.next_state.numpy(), hotwords.potential.numpy(), hotwords.commit.numpy(), hotwords.root,
                   hotwords.space)
    threshold = dtype.type(-np.inf if token_min_logp is None else token_min_logp)  # compared in the input's dtype
    lines = np.ascontiguousarray(log_probs.transpose(0, 1).numpy())
    lengths = input_lengths.numpy().astype(np.int64)

    def search(rows: range):
        return search_lines(lines[rows.start : rows.stop], lengths[rows.start : rows.stop], beam_width, blank,
                            threshold, token_min_logp is not None, *tables)

    # Lines are independent and the compiled search releases the GIL: torch's thread count of threads share them.
    workers = max(1, min(torch.get_num_threads(), len(lines) // MIN_LINES_PER_THREAD))
    bounds = np.linspace(0, len(lines), workers + 1).astype(int)
    parts = [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    if workers == 1:
        results = [search(parts[0])]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(search, parts))
    labels = [row[:count].tolist() for part_labels, part_counts, _ in results
              for row, count in zip(part_labels, part_counts)]
    return labels, np.concatenate([part_scores for _, _, part_scores in results])
