"""Image folders with a ``gt.txt`` (deep-text-recognition-benchmark's format): read, write, and a DataModule.

``gt.txt`` is UTF-8, one sample per line: ``relative/image/path<TAB>label`` (exactly one tab; the label is
everything after it, spaces included). Paths are relative to the folder holding ``gt.txt``; empty lines
are ignored. Images may be in any format Pillow reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from data.bad_input import BadInput
from data.labelled import LabelledDataModule, LabelledLines, Record

GT_FILE = "gt.txt"


def read_gt(directory: str | os.PathLike, bad: BadInput | None = None) -> list[Record]:
    """The records of ``directory/gt.txt``: ``where`` is ``.../gt.txt:LINE``, ``key`` the image path.

    Lines that are not ``path<TAB>label`` (no tab, several tabs, empty path, invalid UTF-8) are reported
    to ``bad`` as ``malformed`` (``None``: raise). Labels are not checked here (empty ones included).
    """
    bad = bad if bad is not None else BadInput()
    gt = Path(directory) / GT_FILE
    if not gt.is_file():
        raise FileNotFoundError(f"no {GT_FILE} in {directory}")
    records = []
    for number, raw in enumerate(gt.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        where = f"{gt}:{number}"
        if not raw:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.report("malformed", where, f"not UTF-8 ({err})")
            continue
        path, tab, label = line.partition("\t")
        if not tab or "\t" in label or not path.strip():
            bad.report("malformed", where, f"expected 'relative/image/path<TAB>label', got {line!r}")
            continue
        records.append(Record(where, label, str(Path(directory) / path)))
    return records


def write_gt_folder(samples: Iterable[tuple[Image.Image, str]], output: str | os.PathLike) -> int:
    """Write ``(image, label)`` pairs as ``output/images/NNNNNN.png`` plus ``output/gt.txt``; returns the count.

    Labels must not contain tabs or line breaks (``ValueError``), which ``gt.txt`` cannot hold.
    """
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, label) in enumerate(samples):
        if any(c in label for c in "\t\n\r"):
            raise ValueError(f"sample {index}: label {label!r} contains a tab or line break")
        name = f"images/{index:06d}.png"
        image.save(output / name)
        lines.append(f"{name}\t{label}\n")
    (output / GT_FILE).write_text("".join(lines), encoding="utf-8")
    return len(lines)


class FolderLines(LabelledLines):
    """:class:`LabelledLines` whose keys are image file paths."""

    marker = GT_FILE

    @classmethod
    def read_records(cls, path: str | os.PathLike, bad: BadInput) -> list[Record]:
        return read_gt(path, bad)

    def open_image(self, key: str) -> Image.Image:
        return Image.open(key)


class FolderDataModule(LabelledDataModule):
    """Train/val/test ``gt.txt`` folders (``train_dir`` etc.); all arguments as :class:`LabelledDataModule`."""

    lines = FolderLines
