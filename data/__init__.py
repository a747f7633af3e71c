"""Data for the CRNN: charset, synthetic line renderers/datasets, real data (gt.txt folders, LMDB) with a
bad-input policy, batching, the DataModules and a data-wait timer."""

from data.bad_input import BadInput, BadInputError
from data.charset import Charset
from data.datamodule import EpochSampler, LengthGroupedBatchSampler, SyntheticDataModule, collate_lines
from data.folder import FolderDataModule, FolderLines, read_gt, write_gt_folder
from data.labelled import LabelledDataModule, LabelledLines, Record, image_to_tensor
from data.lmdb import LmdbDataModule, LmdbLines, read_lmdb_labels, write_lmdb
from data.synthetic import (
    DIGITS,
    KIND_CHARACTERS,
    TEXT_CHARACTERS,
    LineRenderer,
    SyntheticLines,
    installed_fonts,
    make_renderer,
    read_words,
)
from data.timing import DataWaitTimer

__all__ = [
    "DIGITS",
    "KIND_CHARACTERS",
    "TEXT_CHARACTERS",
    "BadInput",
    "BadInputError",
    "Charset",
    "DataWaitTimer",
    "EpochSampler",
    "FolderDataModule",
    "FolderLines",
    "LabelledDataModule",
    "LabelledLines",
    "LengthGroupedBatchSampler",
    "LineRenderer",
    "LmdbDataModule",
    "LmdbLines",
    "Record",
    "SyntheticDataModule",
    "SyntheticLines",
    "collate_lines",
    "image_to_tensor",
    "installed_fonts",
    "make_renderer",
    "read_gt",
    "read_lmdb_labels",
    "read_words",
    "write_gt_folder",
    "write_lmdb",
]
