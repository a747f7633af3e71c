"""Convert a ``gt.txt`` image folder into an LMDB dataset (deep-text-recognition-benchmark / parseq layout).

Example::

    python scripts/make_lmdb.py /tmp/ds/train /tmp/ds_lmdb/train

Image files are stored as they are (their encoded bytes), labels as UTF-8, under 1-based keys
``image-%09d`` / ``label-%09d`` plus ``num-samples``. Malformed ``gt.txt`` lines and missing images stop the
conversion with the file and line; images and labels are otherwise checked when the LMDB is loaded
(``data=lmdb``, with the same ``data.bad_input`` policy as ``data=folder``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data.bad_input import BadInputError
from data.folder import read_gt
from data.labelled import Record
from data.lmdb import write_lmdb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="folder holding gt.txt")
    parser.add_argument("output", help="LMDB directory to create")
    return parser.parse_args(argv)


def encoded_samples(records: list[Record]) -> Iterator[tuple[bytes, str]]:
    """``(image file bytes, label)`` of each record; a missing image raises :class:`BadInputError`."""
    for record in records:
        try:
            yield Path(record.key).read_bytes(), record.label
        except FileNotFoundError as err:
            raise BadInputError(f"{record.where}: image {record.key!r} not found") from err


def main(argv: list[str] | None = None) -> int:
    """Convert; returns the number of samples written."""
    args = parse_args(argv)
    count = write_lmdb(encoded_samples(read_gt(args.input)), args.output)
    print(f"wrote {count} samples to {args.output}")
    return count


if __name__ == "__main__":
    main()
