"""Recognise text-line images with a trained checkpoint; prints ``path<TAB>text<TAB>confidence`` per image.

Example::

    python scripts/predict.py --checkpoint outputs/RUN/checkpoints/last.ckpt /tmp/lines/images --decoder beam

Arguments are image files or folders (searched recursively for files Pillow can read, in sorted order).
Images are converted and resized to the model's input height with their aspect ratio kept, and recognised
``--batch-size`` at a time. The confidence is the model's probability of the printed text: the beam search's
``P(text | image)`` summed over alignments with ``--decoder beam``, the best single alignment's probability
(a lower bound) with ``greedy``; see :func:`crnn.inference.recognize`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from crnn.inference import load_recognizer, read_image, recognize, resolve_device
from scripts.options import add_recognition_arguments, decoder_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    add_recognition_arguments(parser, batch_size=32)
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    """Print and return ``(path, text, confidence)`` for every image, in input order."""
    args = parse_args(argv)
    module = load_recognizer(args.checkpoint, resolve_device(args.device))
    paths = [str(path) for path in image_paths(args.inputs)]
    decoder = decoder_from_args(args)
    results = []
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        recognised = recognize(module, [read_image(p, module) for p in batch], decoder)
        for path, (text, confidence) in zip(batch, recognised):
            print(f"{path}\t{text}\t{confidence:.4g}", flush=True)
            results.append((path, text, confidence))
    return results


if __name__ == "__main__":
    main()
