"""Lexicons for constrained CTC decoding: a word (or whole-line) list compiled to a trie, written out as a dense
automaton the batched beam search (:mod:`crnn.decoding`) advances with one gather per frame.

``mode="word"``: every space-separated word of the output is a lexicon entry (the lexicon-based transcription of
the CRNN paper, extended to lines of several words); words are separated by single spaces, a line neither starts
nor ends with one, and the empty line is allowed. ``mode="line"``: the whole output is one entry (product codes,
dates from a fixed list); entries may contain spaces.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from crnn.huge_pages import huge_page_tensor

__all__ = ["LEXICON_MODES", "Lexicon", "LexiconTables"]

LEXICON_MODES = ("word", "line")


class LexiconTables(NamedTuple):
    """A lexicon as an automaton over ``N`` trie nodes for a ``C``-class recogniser.

    ``next_state``: ``(N, C)`` int32 node after a class's character, ``sink`` where the lexicon has no such
    continuation (the node itself in the blank's column); ``accepting``: ``(N,)`` bool, a line may end there;
    ``start``: the node of the empty line; ``sink``: the node of every text that is no lexicon prefix.
    """

    next_state: Tensor
    accepting: Tensor
    start: int
    sink: int


class Lexicon:
    """A set of entries (words, or whole lines) and how the output must be made of them.

    Args:
        entries: the words (``mode="word"``; an entry with spaces adds each of its words) or lines.
        mode: ``"word"`` or ``"line"`` (see the module docstring).
    """

    def __init__(self, entries: Iterable[str], mode: str = "word"):
        if mode not in LEXICON_MODES:
            raise ValueError(f"lexicon_mode must be one of {list(LEXICON_MODES)}, got {mode!r}")
        self.mode = mode
        if mode == "word":
            entries = (word for entry in entries for word in entry.split())
        self.entries = sorted({entry for entry in entries if entry})
        if not self.entries:
            raise ValueError("the lexicon is empty")

    @classmethod
    def from_file(cls, path: str | os.PathLike, mode: str = "word") -> Lexicon:
        """One entry per line of a UTF-8 file (surrounding whitespace stripped, empty lines ignored)."""
        with open(path, encoding="utf-8") as lines:
            entries = [line.strip() for line in lines]
        try:
            return cls(entries, mode)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def __repr__(self) -> str:
        return f"Lexicon({len(self.entries)} entries, mode={self.mode!r})"

    def __contains__(self, text: str) -> bool:
        """Whether ``text`` is an output the lexicon allows (the reference the automaton is tested against)."""
        if self.mode == "line":
            return text in self.entries
        words = set(self.entries)
        return text == "" or all(word in words for word in text.split(" "))

    def tables(self, class_chars: Sequence[str | None], device: str | torch.device = "cpu") -> LexiconTables:
        """The lexicon as :class:`LexiconTables` for classes with characters ``class_chars`` (``None`` for the
        blank). Entries with a character outside the classes can never be output: they are left out, with one
        warning that counts them. Memory: ``N * C * 8`` bytes for ``N`` trie nodes (+3)."""
        column = {char: c for c, char in enumerate(class_chars) if char is not None}
        usable = [entry for entry in self.entries if all(char in column for char in entry)]
        if len(usable) < len(self.entries):
            kept = set(usable)
            left_out = [entry for entry in self.entries if entry not in kept]
            warnings.warn(f"{len(left_out)} of {len(self.entries)} lexicon entries have characters outside the "
                          f"model's charset and are left out (first: {left_out[:3]})", stacklevel=2)
        # nodes: 0 start of line, 1 start of a later word (word mode), 2 sink, then the trie below them
        start, word_start, sink = 0, 1, 2
        children: list[dict[str, int]] = [{}, {}, {}]
        terminal = [False, False, False]
        for entry in usable:
            node = start
            for char in entry:
                if char not in children[node]:
                    children.append({})
                    terminal.append(False)
                    children[node][char] = len(children) - 1
                node = children[node][char]
            terminal[node] = True
        children[word_start] = children[start]
        if len(children) > torch.iinfo(torch.int32).max:
            raise ValueError(f"{len(children):,} lexicon trie nodes do not fit the int32 node tables")
        next_state = huge_page_tensor((len(children), len(class_chars))).fill_(sink)
        for node, kids in enumerate(children):
            for char, child in kids.items():
                next_state[node, column[char]] = child
        accepting = torch.tensor(terminal)
        if self.mode == "word":
            accepting[start] = True
            if " " in column:
                next_state[accepting, column[" "]] = word_start
                next_state[start, column[" "]] = sink  # no leading space
        blank = [c for c, char in enumerate(class_chars) if char is None]
        next_state[:, blank] = torch.arange(len(children), dtype=torch.int32)[:, None]
        return LexiconTables(next_state.to(device), accepting.to(device), start, sink)
