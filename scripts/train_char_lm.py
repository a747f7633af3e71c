"""Estimate a character (or word) n-gram language model (Witten-Bell, back-off) from text; write it as ARPA.

Example::

    python scripts/train_char_lm.py --order 5 --output /tmp/lm/chars5.arpa /tmp/ds/train /tmp/corpus.txt
    python scripts/train_char_lm.py --unit word --order 3 --output /tmp/lm/words3.arpa /tmp/corpus.txt

Each source is a ``gt.txt`` folder or an LMDB directory (their labels, read and checked as for training: a
malformed line or an empty label stops with an error naming it) or a plain UTF-8 text file (one line of text per
line; empty lines are skipped and counted). The model is the interpolated Witten-Bell estimate of
:func:`crnn.lm.witten_bell` over single characters (the space is the token ``<space>``), each line wrapped in
``<s> ... </s>``; ``--decoder beam --lm FILE`` of ``predict.py``/``evaluate.py`` fuses it into the beam search.
With ``--unit word`` the tokens are the whitespace-separated words instead: a word model for KenLM
(``--word-lm FILE``), made without KenLM's ``lmplz``. Train it on text the evaluation lines are not part of.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from crnn.lm import NgramLM, char_tokens, witten_bell, word_tokens
from data import BadInput
from data.labelled import read_labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="gt.txt folders, LMDB directories or plain text files")
    parser.add_argument("--output", type=Path, required=True, help="the ARPA file to write")
    parser.add_argument("--order", type=int, default=5, choices=range(1, 11), metavar="N",
                        help="n-gram order, 1..10 (3-6 suits character models, 2-4 word models; default 5)")
    parser.add_argument("--unit", choices=["char", "word"], default="char",
                        help="tokens: characters (for --lm) or whitespace-separated words (for --word-lm)")
    return parser.parse_args(argv)


def source_lines(path: Path, skipped: list[str]) -> Iterator[str]:
    """The text lines of one source; empty lines of a text file are appended to ``skipped`` as ``file:line``."""
    if path.is_dir():
        yield from (record.label for record in read_labels(path, BadInput()))
    elif path.is_file():
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                line = line.rstrip("\r\n")
                if line:
                    yield line
                else:
                    skipped.append(f"{path}:{number}")
    else:
        raise FileNotFoundError(f"no such text file, gt.txt folder or LMDB directory: {path}")


def main(argv: list[str] | None = None) -> NgramLM:
    """Estimate, write and return the model."""
    args = parse_args(argv)
    if args.unit == "word" and args.order < 2:
        raise SystemExit("error: --unit word needs --order 2 or more (KenLM reads no unigram-only models)")
    skipped: list[str] = []
    lines = [line for source in args.sources for line in source_lines(Path(source), skipped)]
    model = witten_bell(lines, args.order, char_tokens if args.unit == "char" else word_tokens)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model.write_arpa(args.output)
    counts = ", ".join(f"{order}-grams={len(e)}" for order, e in enumerate(model.entries, start=1))
    print(f"wrote {args.output}: {args.unit} order {model.order} from {len(lines)} lines ({counts})")
    if skipped:
        print(f"skipped {len(skipped)} empty lines (first: {', '.join(skipped[:3])})")
    return model


if __name__ == "__main__":
    main()
