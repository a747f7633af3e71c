"""Show what line augmentation does: a montage of lines of a dataset, each followed by its augmented views.

Each row is a line as the model reads it without augmentation, then the views that training epochs 1, 2, ...
give it.

Example::

    python scripts/show_augment.py /tmp/ds/train --output grid.png --lines 8 --views 5 --augment line \\
        augment.warp_p=1.0

DATASET is a ``gt.txt`` folder or an LMDB directory, read as training reads it (``--height``, ``--channels``).
Extra ``key=value`` arguments are Hydra overrides of the composed config (e.g. ``augment.blur_p=1``), so the
montage shows exactly what ``python train.py augment=line augment.blur_p=1 seed=SEED`` trains on. Layout: a
``GAP``-px frame; row ``r`` starts at ``y = GAP + r * (height + GAP)``, and cell ``k`` of a line ``W`` px wide
at ``x = GAP + k * (W + GAP)``; cell 0 is the un-augmented line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from data import BadInput, Charset, Record, open_split
from data.augment import AugmentedLines
from data.labelled import read_labels

CONF = Path(__file__).resolve().parents[1] / "conf"
GAP = 4  # px between cells and around the montage
FRAME = (70, 130, 180)  # colour of the gaps, unlike any grey line's paper


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a gt.txt folder or an LMDB directory")
    parser.add_argument("--output", required=True, type=Path, help="montage image to write (PNG)")
    parser.add_argument("--lines", type=int, default=8, help="lines to show (rows)")
    parser.add_argument("--views", type=int, default=5, help="augmented views per line (epochs 1..VIEWS)")
    parser.add_argument("--augment", default="line", help="option of the augment config group (conf/augment/)")
    parser.add_argument("--seed", type=int, default=42, help="training seed (`seed=`); also picks the lines")
    parser.add_argument("--height", type=int, default=32, help="line height (data.height)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1: grey, 3: RGB (data.channels)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. augment.degrees=3")
    return parser.parse_intermixed_args(argv)  # overrides may follow the options


def compose_augment(option: str, overrides: list[str]):
    """The augmentation ``train.py augment=OPTION OVERRIDES...`` would use (``None`` for ``augment=none``)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"augment={option}", *overrides])
    return instantiate(cfg.augment) if cfg.augment is not None else None


def montage(rows: list[list[torch.Tensor]]) -> Image.Image:
    """RGB montage of ``rows`` of float ``(C, H, W)`` images in ``[0, 1]`` (one height; one width per row), laid out
    as the module docstring says; grey images are repeated over R, G and B; pixels rounded to 8 bits."""
    height = rows[0][0].shape[1]
    width = max(GAP + len(row) * (row[0].shape[2] + GAP) for row in rows)
    canvas = np.empty((GAP + len(rows) * (height + GAP), width, 3), dtype=np.uint8)
    canvas[:] = FRAME
    for r, row in enumerate(rows):
        y = GAP + r * (height + GAP)
        for k, image in enumerate(row):
            w = image.shape[2]
            x = GAP + k * (w + GAP)
            pixels = np.rint(image.expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            canvas[y : y + height, x : x + w] = pixels
    return Image.fromarray(canvas)


def main(argv: list[str] | None = None) -> list[Record]:
    """Write the montage; returns the records of the lines shown, in row order."""
    args = parse_args(argv)
    labels = [record.label for record in read_labels(args.dataset, BadInput())]
    charset = Charset("".join(sorted(set("".join(labels)))))
    lines = open_split(args.dataset, charset, args.height, args.channels, require_emittable=False)
    picks = np.sort(np.random.default_rng(args.seed).permutation(len(lines))[: args.lines])
    augment = compose_augment(args.augment, args.overrides)
    augmented = AugmentedLines(lines, augment, args.seed) if augment is not None else None
    rows = []
    for index in picks.tolist():
        original = lines[index]["image"]
        views = [augmented[epoch, index]["image"] if augmented else original for epoch in range(1, args.views + 1)]
        rows.append([original, *views])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    montage(rows).save(args.output)
    shown = [lines.records[index] for index in picks.tolist()]
    print(f"wrote {args.output}: {len(rows)} lines of {args.dataset} (original, then epochs 1-{args.views} of "
          f"augment={args.augment}, seed {args.seed})")
    for row, record in enumerate(shown):
        print(f"  row {row}: {record.where}\t{record.label}")
    return shown


if __name__ == "__main__":
    main()
