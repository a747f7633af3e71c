"""Word n-gram language models through KenLM for the beam search (:mod:`crnn.decoding`): words are the
space-separated parts of a line, scored when they end (at a space, and the last word at the end of the line).

The search carries per prefix an int *state id* (a KenLM state, kept on the host in :class:`WordLM`) and the
node of its current partial word in a trie of the LM's vocabulary (tensors on the device: a dense ``(N, C)`` bool
table of which characters continue a node, and the sorted edges for the node after a chosen character). Once per frame the ``(state id, word id)`` pairs of the candidates that end a word go to the
host, KenLM scores the unique pairs not seen before (a dict cache), and the scores and next state ids come back:
one host sync per frame, only when a word LM is used.

``kenlm`` is an optional dependency (``pip install 'ctc-crnn[lm]'``); nothing else in the package imports it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["WordLM", "WordLMTables", "read_arpa_unigrams"]

LN10 = math.log(10.0)
_SPECIAL = ("<s>", "</s>", "<unk>")


class WordLMTables(NamedTuple):
    """The LM's vocabulary as a trie over ``N`` nodes with ``E`` edges, for a ``C``-class recogniser.

    The node of a partial word after a class's character is its trie child, ``sink`` when the partial word leaves
    the vocabulary (and after the sink), ``root`` after the space, the node itself after the blank.
    ``continues``: ``(N, C)`` bool, the class's character leads to a child; ``edge_key``: ``(E,)`` int64 sorted
    ``node * C + class`` of every edge, ``edge_child``: ``(E,)`` int64 its child; ``word_id``: ``(N,)`` int64 the
    vocabulary index of the node's word, ``unk`` where it is no vocabulary word; ``penalty``: ``weight *
    unk_offset``, the potential of the sink (a partial word no vocabulary word starts with; 0 elsewhere);
    ``root``, ``sink``; ``space``: the space class, -1 if none; ``blank``: the blank class.
    """

    continues: Tensor
    edge_key: Tensor
    edge_child: Tensor
    word_id: Tensor
    penalty: float
    root: int
    sink: int
    space: int
    blank: int

    def potential(self, node: Tensor, dtype: torch.dtype) -> Tensor:
        """``penalty`` where ``node`` is the sink, else 0 (``node``'s shape, ``dtype``)."""
        return (node == self.sink).to(dtype) * self.penalty

    def next_node(self, node: Tensor, label: Tensor) -> Tensor:
        """The node after appending ``label`` to the partial word at ``node`` (int64, one shape)."""
        key = node * self.continues.shape[1] + label
        at = torch.searchsorted(self.edge_key, key).clamp(max=self.edge_key.shape[0] - 1)
        child = torch.where(self.edge_key[at] == key, self.edge_child[at], self.sink)
        child = torch.where(label == self.space, self.root, child)
        return torch.where(label == self.blank, node, child)


def read_arpa_unigrams(path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file's ``\\1-grams:`` section without ``<s>``, ``</s>``, ``<unk>``; a file that is
    not ARPA (e.g. a KenLM binary) is an error that says to give the vocabulary separately."""
    words, inside = [], False
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                line = line.strip()
                if line == "\\1-grams:":
                    inside = True
                elif inside and line.startswith("\\"):
                    break
                elif inside and line:
                    fields = line.split()
                    if len(fields) < 2:
                        raise ValueError(f"{path}:{number}: expected 'log10prob word [backoff]', got {line!r}")
                    if fields[1] not in _SPECIAL:
                        words.append(fields[1])
    except UnicodeDecodeError:
        words = []
    if not words:
        raise ValueError(f"{path}: no ARPA unigrams found (a binary KenLM model needs its vocabulary given "
                         "separately: word_lm_vocabulary, one word per line)")
    return words


class WordLM:
    """A KenLM word model, its vocabulary and a cache of scored ``(state, word)`` pairs.

    Args:
        path: an ARPA or KenLM binary file.
        weight: ``lm_weight`` of the word LM: the ranking adds ``weight * log P(word | history)`` per word.
        unk_offset: added to ``log P`` (natural log, before the weight) of a word outside the vocabulary, and,
            as a potential, while the partial word is no prefix of a vocabulary word (like pyctcdecode's
            ``unk_score_offset``, which is in log10 units: ours = theirs * ln 10).
        word_bonus: added to the ranking per scored word (pyctcdecode's ``beta``).
        vocabulary: the words (default: the ARPA file's unigrams); a text file path, one word per line, or a list.
    """

    def __init__(self, path: str | os.PathLike, weight: float = 0.5, unk_offset: float = -10.0,
                 word_bonus: float = 0.0, vocabulary: str | os.PathLike | Iterable[str] | None = None):
        try:
            import kenlm
        except ImportError:
            raise ImportError("a word LM needs the kenlm package: pip install 'ctc-crnn[lm]' (or pip install kenlm)"
                              ) from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"word_lm_path: no such file: {path}")
        self.path, self.weight, self.unk_offset, self.word_bonus = str(path), float(weight), float(unk_offset), \
            float(word_bonus)
        if vocabulary is None:
            words = read_arpa_unigrams(path)
        elif isinstance(vocabulary, (str, os.PathLike)):
            with open(vocabulary, encoding="utf-8") as lines:
                words = [line.strip() for line in lines if line.strip()]
        else:
            words = list(vocabulary)
        self.words = sorted(set(words) - set(_SPECIAL))
        self.unk = len(self.words)  # the word id of every word outside the vocabulary
        self._kenlm = kenlm
        self.model = kenlm.Model(self.path)
        start = kenlm.State()
        self.model.BeginSentenceWrite(start)
        self.states: list = [start]  # state id -> kenlm.State; id 0 is the start of a line
        self._state_ids = {start: 0}
        self._word_cache: dict[int, tuple[float, int]] = {}  # state * (unk + 1) + word -> (ln P, next state id)
        self._end_cache: dict[int, float] = {}  # state id -> ln P(</s> | state)

    def __repr__(self) -> str:
        return (f"WordLM({self.path!r}, order={self.model.order}, words={len(self.words)}, weight={self.weight}, "
                f"unk_offset={self.unk_offset}, word_bonus={self.word_bonus})")

    # ------------------------------------------------------------ host-side scoring

    def _state_id(self, state) -> int:
        known = self._state_ids.get(state)
        if known is None:
            known = self._state_ids[state] = len(self.states)
            self.states.append(state)
        return known

    def _word_values(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ranking value and next state id per int64 key ``state * (unk + 1) + word`` (``-1``: no word: 0, 0).
        KenLM is asked once per pair ever seen; the caches hold log-probs, so the weights may change."""
        unique, inverse = np.unique(keys, return_inverse=True)
        log_prob, after = np.zeros(len(unique)), np.zeros(len(unique), dtype=np.int64)
        cache = self._word_cache
        for i, key in enumerate(unique.tolist()):
            if key < 0:
                continue
            hit = cache.get(key)
            if hit is None:
                state, word = divmod(key, self.unk + 1)
                out = self._kenlm.State()
                log10 = self.model.BaseScore(self.states[state], "<unk>" if word == self.unk else self.words[word], out)
                hit = cache[key] = (log10 * LN10, self._state_id(out))
            log_prob[i], after[i] = hit
        unknown = unique % (self.unk + 1) == self.unk
        values = np.where(unique >= 0, self.weight * (log_prob + self.unk_offset * unknown) + self.word_bonus, 0.0)
        return values[inverse], after[inverse]

    def _end_log_probs(self, states: np.ndarray) -> np.ndarray:
        """``ln P(</s> | state)`` per state id."""
        unique, inverse = np.unique(states, return_inverse=True)
        cache = self._end_cache
        for state in unique.tolist():
            if state not in cache:
                cache[state] = self.model.BaseScore(self.states[state], "</s>", self._kenlm.State()) * LN10
        return np.array([cache[state] for state in unique.tolist()])[inverse]

    def score_words(self, state: Tensor, word: Tensor, needed: Tensor) -> tuple[Tensor, Tensor]:
        """What ending word ``word`` after ``state`` adds to the ranking, and the state id after it.

        Args:
            state, word: int64 of one shape, state ids and word ids (``unk`` for words outside the vocabulary).
            needed: bool of that shape: the pairs to score (others get 0 and state 0).

        Returns:
            ``weight * (ln P(word | state) [+ unk_offset]) + word_bonus`` (float64) and the next state ids, on
            ``state``'s device. One transfer each way; KenLM is asked only about pairs never seen before.
        """
        keys = torch.where(needed, state * (self.unk + 1) + word, -1).cpu().numpy()
        values, after = self._word_values(keys.reshape(-1))
        return (torch.from_numpy(values.reshape(state.shape)).to(state.device),
                torch.from_numpy(after.reshape(state.shape)).to(state.device))

    def score_ends(self, state: Tensor, word: Tensor, has_word: Tensor) -> Tensor:
        """What ending the line adds: the partial word ``word`` where ``has_word`` (as :meth:`score_words`), then
        ``weight * ln P(</s> | state after it)``. Float64 of ``state``'s shape, on its device; one transfer each way."""
        states, keys = torch.stack([state, torch.where(has_word, state * (self.unk + 1) + word, -1)]).cpu().numpy()
        values, after = self._word_values(keys.reshape(-1))
        after = np.where(keys.reshape(-1) >= 0, after, states.reshape(-1))
        values = values + self.weight * self._end_log_probs(after)
        return torch.from_numpy(values.reshape(state.shape)).to(state.device)

    # ------------------------------------------------------------ the decoder's automaton

    def tables(self, class_chars: Sequence[str | None], device: str | torch.device = "cpu") -> WordLMTables:
        """The vocabulary trie as :class:`WordLMTables` for classes with characters ``class_chars`` (``None`` for
        the blank). Words with a character outside the classes (or a space) can never be output: they are left
        out of the trie, with one warning that counts them. Memory: ``N * C`` bytes plus ``16`` per edge."""
        column = {char: c for c, char in enumerate(class_chars) if char is not None}
        usable = [i for i, word in enumerate(self.words) if all(char in column and char != " " for char in word)]
        if not usable:
            raise ValueError(f"{self.path}: no word of the word LM can be written with the model's characters")
        if len(usable) < len(self.words):
            warnings.warn(f"{len(self.words) - len(usable)} of {len(self.words)} word LM vocabulary words have "
                          "characters outside the model's charset and can never be output", stacklevel=2)
        root, sink = 0, 1
        children: list[dict[str, int]] = [{}, {}]
        word_id = [self.unk, self.unk]
        for i in usable:
            node = root
            for char in self.words[i]:
                if char not in children[node]:
                    children.append({})
                    word_id.append(self.unk)
                    children[node][char] = len(children) - 1
                node = children[node][char]
            word_id[node] = i
        num_classes = len(class_chars)
        edges = sorted((node * num_classes + column[char], child) for node, kids in enumerate(children)
                       for char, child in kids.items())
        edge_key = torch.tensor([key for key, _ in edges], dtype=torch.int64).reshape(-1)
        continues = torch.zeros(len(children) * num_classes, dtype=torch.bool)
        continues[edge_key] = True
        blank = next(c for c, char in enumerate(class_chars) if char is None)
        return WordLMTables(continues.view(len(children), num_classes).to(device), edge_key.to(device),
                            torch.tensor([child for _, child in edges], dtype=torch.int64).reshape(-1).to(device),
                            torch.tensor(word_id, device=device), self.weight * self.unk_offset, root, sink,
                            column.get(" ", -1), blank)
