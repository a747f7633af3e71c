"""Recognise text-line images with a trained checkpoint; prints ``path<TAB>text<TAB>confidence`` per image.

Example::

    python scripts/predict.py --checkpoint outputs/RUN/checkpoints/last.ckpt /tmp/lines/images --decoder beam
    python scripts/predict.py --checkpoint last.ckpt line.png --json --words --decoder beam --lm chars5.arpa

Arguments are image files or folders (searched recursively for files Pillow can read, in sorted order).
Images are converted and resized to the model's input height with their aspect ratio kept, and recognised
``--batch-size`` at a time. The confidence is the model's probability of the printed text: the beam search's
``P(text | image)`` summed over alignments with ``--decoder beam``, the best single alignment's probability
(a lower bound) with ``greedy``; see :func:`crnn.inference.recognize`. ``--decoder beam`` takes a character
LM, a lexicon and a set of allowed characters (``--lm``, ``--lexicon``, ``--allow``; see ``docs/decoding.md``).

``--json`` prints one JSON object per image instead: ``path``, ``text``, ``log_prob`` (the decoder's
``log P(text | image)``), ``confidence`` (its ``exp``), the original image's ``width`` and ``height``, and
``chars``: per character ``char``, ``x0``, ``x1`` (its x-range in the original image's pixels, from the Viterbi
alignment of the text) and ``confidence`` (see :mod:`crnn.positions`); ``--words`` adds ``words``, the same per
space-separated word (``word``, ``x0``, ``x1``, ``confidence``: the product of its characters').
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from crnn.inference import load_recognizer, read_image, recognize, resolve_device
from crnn.positions import LinePositions, recognize_with_positions, word_boxes
from scripts.options import add_recognition_arguments, decoder_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    add_recognition_arguments(parser, batch_size=32)
    parser.add_argument("--json", action="store_true", help="one JSON object per image, with character positions")
    parser.add_argument("--words", action="store_true", help="with --json: also per-word boxes and confidences")
    args = parser.parse_args(argv)
    if args.words and not args.json:
        parser.error("--words needs --json")
    return args


def readable_suffixes() -> set[str]:
    """File extensions of the formats Pillow can open (not those it can only write, such as ``.pdf``)."""
    Image.init()
    return {suffix for suffix, format in Image.registered_extensions().items() if format in Image.OPEN}


def image_paths(inputs: Sequence[str]) -> Iterator[Path]:
    """Each input file, and every file with an extension of a format Pillow reads below each input folder."""
    suffixes = readable_suffixes()
    for name in map(Path, inputs):
        if name.is_dir():
            yield from sorted(p for p in name.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif name.is_file():
            yield name
        else:
            raise FileNotFoundError(f"no such image or folder: {name}")


def as_json(path: str, size: tuple[int, int], line: LinePositions, words: bool) -> dict:
    """The ``--json`` object of one image (coordinates rounded to 0.1 px, scores to 6 significant digits)."""
    def box(b, name):
        return {name: b.text, "x0": round(b.x0, 1), "x1": round(b.x1, 1), "confidence": significant(b.confidence)}

    result = {"path": path, "text": line.text, "log_prob": significant(line.log_prob),
              "confidence": significant(line.confidence), "width": size[0], "height": size[1],
              "chars": [box(b, "char") for b in line.chars]}
    if words:
        result["words"] = [box(b, "word") for b in word_boxes(line.chars)]
    return result


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]] | list[dict]:
    """Print and return ``(path, text, confidence)`` for every image, in input order (with ``--json``, the
    objects printed)."""
    args = parse_args(argv)
    module = load_recognizer(args.checkpoint, resolve_device(args.device))
    paths = [str(path) for path in image_paths(args.inputs)]
    decoder = decoder_from_args(args, module.charset)
    results = []
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        images = [read_image(p, module) for p in batch]
        if args.json:
            sizes = [image_size(p) for p in batch]
            located = recognize_with_positions(module, images, [width for width, _ in sizes], decoder)
            for path, size, line in zip(batch, sizes, located):
                results.append(as_json(path, size, line, args.words))
                print(json.dumps(results[-1], ensure_ascii=False), flush=True)
            continue
        for path, (text, confidence) in zip(batch, recognize(module, images, decoder)):
            print(f"{path}\t{text}\t{confidence:.4g}", flush=True)
            results.append((path, text, confidence))
    return results


def significant(value: float) -> float:
    return float(f"{value:.6g}")


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file (read from its header)."""
    with Image.open(path) as image:
        return image.size


if __name__ == "__main__":
    main()
