"""Hotword boosting for the beam search (:mod:`crnn.decoding`), as pyctcdecode's ``hotwords``: words or phrases
the output should prefer, compiled to an Aho-Corasick-style automaton written out as dense tables.

The score a finished line gets is ``weight * sum of len(h)`` over every occurrence of a hotword ``h`` in it that
starts at a word start and ends at a word end (the line's ends or a space; overlapping occurrences count each).
While the search runs, a prefix also gets ``weight`` per character of its current partial match (the longest
suffix starting at a word start that is a prefix of a hotword), which it loses when the match breaks: a
potential that guides a narrow beam towards hotwords and cancels out of the finished score.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["HotwordTables", "Hotwords"]


class HotwordTables(NamedTuple):
    """Hotwords as an automaton over ``H`` states for a ``C``-class recogniser.

    A state is the current partial match (a hotword prefix), the empty match at a word start (``root``), or no
    match inside a word (``sink``). ``next_state``: ``(H, C)`` int64 (the state itself in the blank's column);
    ``potential``: ``(H,)`` float ``weight * len(match)``; ``commit``: ``(H,)`` float ``weight * sum of len(h)``
    over the hotwords ``h`` the match ends with (starting at a word start), earned when a word end follows;
    ``space``: the space class, -1 if none.
    """

    next_state: Tensor
    potential: Tensor
    commit: Tensor
    root: int
    sink: int
    space: int


class Hotwords:
    """A set of hotwords (words or phrases of words separated by single spaces) and their weight.

    Args:
        hotwords: the hotwords, or a UTF-8 text file path with one per line (empty lines ignored).
        weight: the bonus per character of a matched hotword (natural-log units of the ranking score).
    """

    def __init__(self, hotwords: str | os.PathLike | Iterable[str], weight: float = 10.0):
        if isinstance(hotwords, (str, os.PathLike)):
            if not os.path.isfile(hotwords):
                raise FileNotFoundError(f"hotwords: no such file: {hotwords} (a list of hotwords is given as a list, "
                                        "e.g. decoder.hotwords=[word1,word2])")
            with open(hotwords, encoding="utf-8") as lines:
                hotwords = [line for line in lines]
        self.entries = sorted({" ".join(entry.split()) for entry in hotwords} - {""})
        if not self.entries:
            raise ValueError("hotwords: the list is empty")
        self.weight = float(weight)

    def __repr__(self) -> str:
        return f"Hotwords({len(self.entries)} entries, weight={self.weight})"

    def tables(self, class_chars: Sequence[str | None], device: str | torch.device = "cpu") -> HotwordTables:
        """The automaton for classes with characters ``class_chars`` (``None`` for the blank). Hotwords with a
        character outside the classes are left out with a warning. Memory: ``H * C * 8`` bytes, ``H`` = number
        of hotword prefixes + 1. Built by trying every suffix of every ``state + character``: ``O(H C L^2)``."""
        chars = {char for char in class_chars if char is not None}
        usable = [entry for entry in self.entries if set(entry) <= chars]
        if len(usable) < len(self.entries):
            warnings.warn(f"{len(self.entries) - len(usable)} of {len(self.entries)} hotwords have characters "
                          "outside the model's charset and are left out", stacklevel=2)
        prefixes = sorted({entry[:n] for entry in usable for n in range(1, len(entry) + 1)})
        root, sink = 0, 1
        matches = ["", None, *prefixes]  # None: no match, inside a word
        index = {match: i for i, match in enumerate(matches) if match is not None}
        hotwords = set(usable)
        next_state = torch.empty(len(matches), len(class_chars), dtype=torch.int64)
        commit = torch.zeros(len(matches))
        for state, match in enumerate(matches):
            for c, char in enumerate(class_chars):
                if char is None:
                    next_state[state, c] = state
                elif match is None:
                    next_state[state, c] = root if char == " " else sink
                else:
                    next_state[state, c] = self._longest_match(match + char, index, root, sink)
            if match:
                commit[state] = sum(len(match) - start for start in range(len(match))
                                    if (start == 0 or match[start - 1] == " ") and match[start:] in hotwords)
        potential = torch.tensor([0.0 if match is None else float(len(match)) for match in matches])
        space = next((c for c, char in enumerate(class_chars) if char == " "), -1)
        return HotwordTables(next_state.to(device), (self.weight * potential).to(device),
                             (self.weight * commit).to(device), root, sink, space)

    @staticmethod
    def _longest_match(text: str, index: dict[str, int], root: int, sink: int) -> int:
        """The state after ``text`` (a match plus one character): its longest suffix that starts at a word start
        and is a hotword prefix; else the empty match at a word start (``text`` ends in a space) or ``sink``."""
        for start in range(len(text)):
            if (start == 0 or text[start - 1] == " ") and text[start:] in index:
                return index[text[start:]]
        return root if text.endswith(" ") else sink
