"""Write a synthetic dataset (the renderers of ``data=digits`` / ``data=text``) to disk as a ``gt.txt`` folder.

Example::

    python scripts/render_dataset.py --kind digits --size 2000 --seed 1 --output /tmp/ds/train

writes ``/tmp/ds/train/images/000000.png ...`` (grey PNGs, ``--height`` px high) and ``/tmp/ds/train/gt.txt``
(``images/000000.png<TAB>label`` lines), ready for ``data=folder`` or ``scripts/make_lmdb.py``. Sample ``i``
is the sample ``i`` of ``SyntheticLines`` with stream seed ``--seed`` (``SyntheticDataModule(seed=s)`` uses
``3*s + k`` for split ``k`` of train/val/test), so use a different seed for each split. Your own fonts and a
large charset::

    python scripts/render_dataset.py --kind text --charset-file chars.txt --fonts /usr/share/fonts/truetype/wqy \
        --size 1000 --output /tmp/ds/cjk
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from data import KIND_CHARACTERS, Charset, SyntheticLines, make_renderer, read_characters
from data.folder import write_gt_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write images/ and gt.txt into")
    parser.add_argument("--size", type=int, required=True, help="number of lines")
    parser.add_argument("--seed", type=int, default=0, help="stream seed (one per split)")
    parser.add_argument("--kind", choices=sorted(KIND_CHARACTERS), default="digits")
    parser.add_argument("--charset", default=None, help="characters to draw from (default: the kind's)")
    parser.add_argument("--min-length", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=10)
    parser.add_argument("--height", type=int, default=32, help="image height in px")
    parser.add_argument("--words", default=None, help="word-list file for --kind text")
    parser.add_argument("--distortion", type=float, default=0.5, help="augmentation strength in [0, 1]")
    parser.add_argument("--fonts", nargs="+", default=None, metavar="FONT_OR_FOLDER",
                        help="font files and/or folders to render with (default: the installed DejaVu fonts and "
                             "Pillow's); a font lacking some characters draws lines from the ones it has")
    parser.add_argument("--charset-file", default=None,
                        help="UTF-8 file giving the characters instead of --charset (one per line, or running text)")
    parser.add_argument("--uncovered", choices=["error", "skip"], default="error",
                        help="characters no font has: an error, or left out of the lines")
    return parser.parse_args(argv)


def samples(lines: SyntheticLines) -> Iterator[tuple[Image.Image, str]]:
    """``(grey PIL image, text)`` of each line; the float image in ``[0, 1]`` is rounded to 8 bits."""
    for index in range(len(lines)):
        sample = lines[index]
        pixels = np.rint(sample["image"][0].numpy() * 255).astype(np.uint8)
        yield Image.fromarray(pixels), sample["text"]


def main(argv: list[str] | None = None) -> Path:
    """Render and write the dataset; returns the output folder."""
    args = parse_args(argv)
    if args.charset_file is not None and args.charset is not None:
        raise SystemExit("render_dataset.py: give --charset or --charset-file, not both")
    charset = read_characters(args.charset_file) if args.charset_file else args.charset
    renderer = make_renderer(
        args.kind, charset, min_length=args.min_length, max_length=args.max_length, height=args.height,
        words=args.words, distortion=args.distortion, fonts=args.fonts, uncovered=args.uncovered,
    )
    lines = SyntheticLines(renderer, Charset(renderer.characters), args.size, seed=args.seed)
    count = write_gt_folder(samples(lines), args.output)
    print(f"wrote {count} lines to {Path(args.output) / 'gt.txt'}")
    return Path(args.output)


if __name__ == "__main__":
    main()
