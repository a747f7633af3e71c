"""Character set: the mapping between characters and CTC class ids.

The CTC blank gets its own class id (``blank``); the characters take the remaining ids in order,
so ``num_classes == len(characters) + 1``. With ``blank=0`` the characters are ``1..N``; with
``blank=N`` they are ``0..N-1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class Charset:
    """Bidirectional character <-> class-id map with an explicit blank index.

    Args:
        characters: the alphabet, one class per character, in class order (duplicates are an error).
        blank: class id reserved for the CTC blank, ``0 <= blank <= len(characters)``.
    """

    def __init__(self, characters: str, blank: int = 0) -> None:
        if not characters:
            raise ValueError("charset is empty")
        seen: set[str] = set()
        duplicates = sorted({c for c in characters if c in seen or seen.add(c)})
        if duplicates:
            raise ValueError(f"charset has duplicate characters: {duplicates!r}")
        if not 0 <= blank <= len(characters):
            raise ValueError(f"blank must be in [0, {len(characters)}], got {blank}")
        self.characters = characters
        self.blank = blank
        ids = [i if i < blank else i + 1 for i in range(len(characters))]
        self._char_to_id = dict(zip(characters, ids))
        self._id_to_char = dict(zip(ids, characters))

    @classmethod
    def from_file(cls, path: str | os.PathLike, blank: int = 0) -> Charset:
        """Read a UTF-8 file; every character except line breaks (``\\n``, ``\\r``) is a class.

        So both layouts work: the whole alphabet on one line, or one character per line (a line
        holding a single space makes the space a class).
        """
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return cls(text.replace("\r", "").replace("\n", ""), blank=blank)

    @property
    def num_classes(self) -> int:
        """Number of output classes including the blank: ``len(characters) + 1``."""
        return len(self.characters) + 1

    def __len__(self) -> int:
        """Number of characters (the blank excluded)."""
        return len(self.characters)

    def __repr__(self) -> str:
        return f"Charset({self.characters!r}, blank={self.blank})"

    def encode(self, text: str) -> list[int]:
        """Map ``text`` to class ids (never the blank); an unknown character raises ``ValueError``."""
        try:
            return [self._char_to_id[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} in text {text!r} is not in the charset") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Map class ids back to text, dropping blanks (no CTC repeat-collapsing; that is the decoder's job).

        ``ids`` may be any iterable of ints, e.g. a list or a 1-D integer tensor.
        """
        chars = []
        for i in map(int, ids):
            if i == self.blank:
                continue
            if i not in self._id_to_char:
                raise ValueError(f"class id {i} is outside [0, {self.num_classes})")
            chars.append(self._id_to_char[i])
        return "".join(chars)
