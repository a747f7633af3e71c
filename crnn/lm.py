"""Character n-gram language models: Witten-Bell estimation, ARPA files, scoring, and the dense tables the beam
search fuses with (:mod:`crnn.decoding`).

Tokens are single characters; the space is written ``<space>`` in ARPA files (ARPA separates tokens by
whitespace), a line is wrapped in ``<s> ... </s>``. :func:`witten_bell` also estimates word models
(``tokenize=word_tokens``) for KenLM (:mod:`crnn.word_lm`); :class:`NgramLM`'s queries are for character models. Log-probabilities in ARPA files are base 10 (the format's
convention); everything this module returns is natural log.

A back-off model is queried through its *state*: the longest suffix of the history that is an n-gram of the
model of order ``< N``. Because every prefix of an ARPA n-gram is itself an n-gram, ``P(c | history)`` equals
``P(c | state)``, and the state after ``c`` is the longest suffix of ``state + c`` that is a state. So the model
is a finite automaton over its states, which :meth:`NgramLM.tables` writes out as two dense ``(S, C)`` tables:
one gather per frame advances every prefix of every line at once.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["BOS", "EOS", "SPACE", "UNK", "LMTables", "NgramLM", "char_tokens", "witten_bell", "word_tokens"]

BOS, EOS, UNK, SPACE = "<s>", "</s>", "<unk>", "<space>"
LN10 = math.log(10.0)
NO_PROB_LOG10 = -99.0  # ARPA's conventional "never predicted" (the <s> unigram)
UNKNOWN_LOG10 = -100.0  # log10 P of a token a model without <unk> has never seen (KenLM's default)

Ngram = tuple[str, ...]


def char_tokens(text: str) -> list[str]:
    """The LM tokens of ``text``: one per character, the space written :data:`SPACE`."""
    return [SPACE if char == " " else char for char in text]


def word_tokens(text: str) -> list[str]:
    """The LM tokens of ``text`` for a word model: its whitespace-separated words."""
    return text.split()


class LMTables(NamedTuple):
    """An :class:`NgramLM` as an automaton over ``S`` states for a ``C``-class recogniser (see the module doc).

    ``log_probs``: ``(S, C)`` float32 ``log P(class's character | state)`` (0 in the blank's column);
    ``next_state``: ``(S, C)`` int32 state after that character (the state itself in the blank's column);
    ``end``: ``(S,)`` float32 ``log P(</s> | state)``; ``start``: the state of an empty line (``<s>``).
    """

    log_probs: Tensor
    next_state: Tensor
    end: Tensor
    start: int


class NgramLM:
    """A back-off n-gram model over character tokens.

    Args:
        entries: ``entries[k]`` maps each ``(k + 1)``-gram (a tuple of tokens) to ``(log10 P, log10 back-off)``
            (back-off 0 where the n-gram is never a context).
    """

    def __init__(self, entries: Sequence[dict[Ngram, tuple[float, float]]]):
        if not entries or not entries[0]:
            raise ValueError("an n-gram model needs unigrams")
        self.entries = list(entries)
        self.unknown_log10 = self.entries[0].get((UNK,), (UNKNOWN_LOG10, 0.0))[0]

    @property
    def order(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"NgramLM(order={self.order}, ngrams={[len(e) for e in self.entries]})"

    # ------------------------------------------------------------ queries

    def log10_prob(self, context: Sequence[str], token: str) -> float:
        """``log10 P(token | context)`` by the ARPA back-off rule: the longest n-gram ``suffix(context) + token``
        in the model, plus the back-off weights of the longer contexts it skipped."""
        context = tuple(context)[max(0, len(context) - self.order + 1) :] if self.order > 1 else ()
        backoff = 0.0
        while True:
            entry = self.entries[len(context)].get((*context, token))
            if entry is not None:
                return backoff + entry[0]
            if not context:
                return backoff + self.unknown_log10
            backoff += self.entries[len(context) - 1].get(context, (0.0, 0.0))[1]
            context = context[1:]

    def score(self, text: str, end: bool = True) -> float:
        """Natural-log probability of the line ``text`` (after ``<s>``, with ``</s>`` at the end if ``end``)."""
        history, total = [BOS], 0.0
        for token in char_tokens(text) + ([EOS] if end else []):
            total += self.log10_prob(history, token)
            history.append(token)
        return total * LN10

    # ------------------------------------------------------------ the decoder's automaton

    def tables(self, class_chars: Sequence[str | None], device: str | torch.device = "cpu") -> LMTables:
        """The model as :class:`LMTables` for classes with characters ``class_chars`` (``None`` for the blank).

        Row of a state ``s``: the row of its longest proper suffix that is a state, plus ``s``'s back-off, then
        overwritten where ``s + c`` is an n-gram (its probability; its index as the next state if it is a state
        itself). Rows are built in order of context length, so each copies a finished row. Memory: ``S * C * 8``
        bytes for ``S`` = number of n-grams of order ``< N`` (+1).
        """
        states: list[Ngram] = [(), *(g for order in self.entries[:-1] for g in order)]
        index = {state: i for i, state in enumerate(states)}
        columns = [None if char is None else char_tokens(char)[0] for char in class_chars] + [EOS]
        column_of = defaultdict(list)
        for column, token in enumerate(columns):
            if token is not None:
                column_of[token].append(column)
        log10 = np.full((len(states), len(columns)), self.unknown_log10)
        if len(states) > np.iinfo(np.int32).max:
            raise ValueError(f"{len(states):,} LM states do not fit the int32 state tables; prune the model")
        next_state = np.zeros((len(states), len(columns)), dtype=np.int32)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, state in enumerate(states[1:], start=1):
            by_length[len(state)].append(i)
        for length in range(self.order):
            rows = by_length[length] if length else [0]
            if length:
                suffixes = [index[self._longest_state_suffix(states[i], index)] for i in rows]
                backoffs = np.array([self.entries[length - 1][states[i]][1] for i in rows])
                log10[rows] = log10[suffixes] + backoffs[:, None]
                next_state[rows] = next_state[suffixes]
            for ngram, (prob, _) in self.entries[length].items():  # n-grams with a context of this length
                row = index.get(ngram[:-1])
                if row is None:
                    raise ValueError(f"{ngram}: its context is not an n-gram of the model (not a valid ARPA model)")
                for column in column_of.get(ngram[-1], ()):
                    log10[row, column] = prob
                    if ngram in index:
                        next_state[row, column] = index[ngram]
        blank = [c for c, char in enumerate(class_chars) if char is None]
        log10[:, blank] = 0.0
        next_state[:, blank] = np.arange(len(states))[:, None]
        log_probs = torch.from_numpy(log10 * LN10).float()
        return LMTables(
            log_probs=log_probs[:, :-1].contiguous().to(device),
            next_state=torch.from_numpy(next_state[:, :-1]).contiguous().to(device),
            end=log_probs[:, -1].contiguous().to(device),
            start=index.get((BOS,), 0),
        )

    @staticmethod
    def _longest_state_suffix(state: Ngram, index: dict[Ngram, int]) -> Ngram:
        for start in range(1, len(state) + 1):
            if state[start:] in index:
                return state[start:]
        return ()  # unreachable: () is always a state

    # ------------------------------------------------------------ ARPA files

    @classmethod
    def read_arpa(cls, path: str | os.PathLike) -> NgramLM:
        """Read an ARPA file (``\\data\\`` header, ``\\N-grams:`` sections, ``\\end\\``); errors name file and line."""
        entries: list[dict[Ngram, tuple[float, float]]] = []
        declared: list[int] = []
        section = None
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                where = f"{path}:{number}"
                line = line.strip()
                if not line:
                    continue
                if line == "\\data\\":
                    section = "data"
                elif line == "\\end\\":
                    section = "end"
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    order = int(line[1:-7])
                    if order != len(entries) + 1:
                        raise ValueError(f"{where}: expected the {len(entries) + 1}-grams section, got {line!r}")
                    entries.append({})
                    section = "ngrams"
                elif section == "data" and line.startswith("ngram "):
                    declared.append(int(line.split("=")[1]))
                elif section == "ngrams":
                    fields = line.split()
                    order = len(entries)
                    if len(fields) not in (order + 1, order + 2):
                        raise ValueError(f"{where}: expected 'log10prob {order} tokens [backoff]', got {line!r}")
                    try:
                        prob = float(fields[0])
                        backoff = float(fields[order + 1]) if len(fields) == order + 2 else 0.0
                    except ValueError:
                        raise ValueError(f"{where}: not a number in {line!r}") from None
                    entries[-1][tuple(fields[1 : order + 1])] = (prob, backoff)
                elif section is not None:
                    raise ValueError(f"{where}: unexpected line {line!r}")
        if section != "end":
            raise ValueError(f"{path}: not an ARPA file (no \\data\\ ... \\end\\)")
        counts = [len(e) for e in entries]
        if counts != declared:
            raise ValueError(f"{path}: the header declares {declared} n-grams per order, the file has {counts}")
        return cls(entries)

    def write_arpa(self, path: str | os.PathLike) -> None:
        """Write the model as an ARPA file (n-grams sorted, numbers with 7 significant digits)."""
        with open(path, "w", encoding="utf-8") as out:
            out.write("\\data\\\n")
            for order, entries in enumerate(self.entries, start=1):
                out.write(f"ngram {order}={len(entries)}\n")
            for order, entries in enumerate(self.entries, start=1):
                out.write(f"\n\\{order}-grams:\n")
                highest = order == self.order
                for ngram in sorted(entries):
                    prob, backoff = entries[ngram]
                    out.write(f"{prob:.7g}\t{' '.join(ngram)}" + ("" if highest else f"\t{backoff:.7g}") + "\n")
            out.write("\n\\end\\\n")


def witten_bell(lines: Iterable[str], order: int, tokenize: Callable[[str], list[str]] = char_tokens) -> NgramLM:
    """Interpolated Witten-Bell n-gram model of the lines, written in back-off form.

    ``P(w | h) = (c(hw) + T(h) P(w | h')) / (c(h) + T(h))`` with ``c(h)`` the count of ``h`` as a context,
    ``T(h)`` the number of distinct tokens after it and ``h'`` = ``h`` without its first token; the unigram
    level interpolates with the uniform distribution over the seen tokens plus ``<unk>``. In back-off form an
    n-gram seen in the data stores this interpolated probability, and a context's back-off weight is the mass
    ``T(h) / (c(h) + T(h))`` it leaves to the shorter context: exactly the interpolated model.

    Args:
        lines: training text, one line per item (each wrapped in ``<s> ... </s>``).
        order: ``N``, at least 1.
        tokenize: a line's tokens: :func:`char_tokens` (a character model), :func:`word_tokens` (a word model).
    """
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    counts: list[Counter[Ngram]] = [Counter() for _ in range(order)]
    for line in lines:
        tokens = [BOS, *tokenize(line), EOS]
        for end in range(1, len(tokens)):  # the predicted token is never <s>
            for length in range(1, min(order, end + 1) + 1):
                counts[length - 1][tuple(tokens[end + 1 - length : end + 1])] += 1
    if not counts[0]:
        raise ValueError("no text to estimate a language model from")

    vocabulary = set(g[0] for g in counts[0]) | {UNK}
    total, types = sum(counts[0].values()), len(counts[0])
    unigram = {(w,): (counts[0][(w,)] + types / len(vocabulary)) / (total + types) for w in vocabulary}
    entries: list[dict[Ngram, tuple[float, float]]] = [{g: (math.log10(p), 0.0) for g, p in unigram.items()}]
    entries[0][(BOS,)] = (NO_PROB_LOG10, 0.0)
    model = NgramLM(entries)
    for length in range(2, order + 1):
        context_count: Counter[Ngram] = Counter()
        context_types: Counter[Ngram] = Counter()
        for ngram, count in counts[length - 1].items():
            context_count[ngram[:-1]] += count
            context_types[ngram[:-1]] += 1
        lower = entries[length - 2]
        for context, count in context_count.items():  # back-offs of the contexts, before the query below uses them
            prob, _ = lower[context]
            lower[context] = (prob, math.log10(context_types[context] / (count + context_types[context])))
        current: dict[Ngram, tuple[float, float]] = {}
        for ngram, count in counts[length - 1].items():
            context = ngram[:-1]
            shorter = 10.0 ** model.log10_prob(context[1:], ngram[-1])
            weight = context_types[context]
            current[ngram] = (math.log10((count + weight * shorter) / (context_count[context] + weight)), 0.0)
        entries.append(current)
        model = NgramLM(entries)
    return model
