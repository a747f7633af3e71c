"""Data for the CRNN: charset, image decoding, batching, real data (gt.txt folders, LMDB) with a bad-input policy,
synthetic line renderers/datasets and the DataModules.

The renderer's names (:mod:`data.synthetic`: ``SyntheticDataModule``, ``LineRenderer``, ...) are imported on first
use (PEP 562), so reading on-disk data never imports the renderer or matplotlib.
"""

from __future__ import annotations

import importlib

from data.bad_input import BadInput, BadInputError
from data.batching import EpochSampler, LengthGroupedBatchSampler, collate_lines
from data.charset import Charset
from data.folder import FolderDataModule, FolderLines, read_gt, write_gt_folder
from data.images import image_to_tensor
from data.labelled import LabelledDataModule, LabelledLines, Record, open_split
from data.line_datamodule import LineDataModule
from data.lmdb import LmdbDataModule, LmdbLines, read_lmdb_labels, write_lmdb

_SYNTHETIC = (
    "DIGITS",
    "KIND_CHARACTERS",
    "TEXT_CHARACTERS",
    "LineRenderer",
    "SyntheticDataModule",
    "SyntheticLines",
    "find_fonts",
    "installed_fonts",
    "make_renderer",
    "read_characters",
    "read_words",
)


def __getattr__(name: str):
    if name in _SYNTHETIC:
        value = getattr(importlib.import_module("data.synthetic"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SYNTHETIC))


__all__ = [
    "DIGITS",
    "KIND_CHARACTERS",
    "TEXT_CHARACTERS",
    "BadInput",
    "BadInputError",
    "Charset",
    "EpochSampler",
    "FolderDataModule",
    "FolderLines",
    "LabelledDataModule",
    "LabelledLines",
    "LengthGroupedBatchSampler",
    "LineDataModule",
    "LineRenderer",
    "LmdbDataModule",
    "LmdbLines",
    "Record",
    "SyntheticDataModule",
    "SyntheticLines",
    "collate_lines",
    "find_fonts",
    "image_to_tensor",
    "installed_fonts",
    "make_renderer",
    "open_split",
    "read_characters",
    "read_gt",
    "read_lmdb_labels",
    "read_words",
    "write_gt_folder",
    "write_lmdb",
]
