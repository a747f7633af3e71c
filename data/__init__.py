"""Data for the CRNN: charset, synthetic line renderers/datasets, batching, the DataModule and a data-wait timer."""

from data.charset import Charset
from data.datamodule import EpochSampler, LengthGroupedBatchSampler, SyntheticDataModule, collate_lines
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
    "Charset",
    "DataWaitTimer",
    "EpochSampler",
    "LengthGroupedBatchSampler",
    "LineRenderer",
    "SyntheticDataModule",
    "SyntheticLines",
    "collate_lines",
    "installed_fonts",
    "make_renderer",
    "read_words",
]
