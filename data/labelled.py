"""Labelled line images on disk: the one reading path of training and evaluation (read the labels, report empty
ones, screen the records against the bad-input policy), a Dataset and a DataModule base shared by the ``gt.txt``
folder (:mod:`data.folder`) and LMDB (:mod:`data.lmdb`) formats.

A format is a :class:`LabelledLines` subclass: the file that marks a split directory of it (``marker``), how to
read a split's labels (:meth:`LabelledLines.read_records`, cheap, no image decoding), how to build the dataset
(:meth:`LabelledLines.from_records`) and how to open one image by key (:meth:`LabelledLines.open_image`).
:func:`open_split` reads a split of either format, as ``scripts/evaluate.py`` does; the datamodules go through
the same pieces (:func:`read_labels`, :meth:`LabelledLines.screen`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.bad_input import BadInput, BadInputError
from data.charset import Charset
from data.images import MODES, image_to_tensor, resized_width
from data.line_datamodule import LineDataModule
from losses import required_frames

log = logging.getLogger(__name__)

MAX_ASPECT = 40
"""Default ``data.max_width`` in multiples of the data height (1280 px at 32): wider images are ``too_wide``."""


class Record(NamedTuple):
    """One labelled image: ``where`` names it in messages (``gt.txt:LINE``), ``key`` opens its image (a path,
    an LMDB index), ``width`` is its width in px after resizing to the data height (0 until screened)."""

    where: str
    label: str
    key: str | int
    width: int = 0


def label_frames(labels: Sequence[str], chunk: int = 4096) -> list[int]:
    """CTC frames each label needs, :func:`losses.required_frames` of its code points: its length plus its
    adjacent repeated characters (a blank must separate each such pair)."""
    needed: list[int] = []
    for start in range(0, len(labels), chunk):  # chunks: one very long label pads only its own chunk's rows
        rows = labels[start : start + chunk]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        padded = np.zeros((len(rows), max(int(lengths.max()), 1)), dtype=np.int64)
        padded[np.arange(padded.shape[1]) < lengths[:, None]] = np.frombuffer(
            "".join(rows).encode("utf-32-le"), dtype=np.uint32)  # row-major: each row's code points, in order
        needed += required_frames(torch.from_numpy(padded), torch.from_numpy(lengths)).tolist()
    return needed


class LabelledLines(Dataset):
    """Map-style dataset of :class:`Record` s; subclasses say how to read and open them (see the module).

    Items are ``{"image": float32 (channels, height, W) in [0, 1], "text": str, "target": int64 (L,)}``,
    as :class:`data.synthetic.SyntheticLines` gives, so batches are :func:`data.batching.collate_lines` dicts.
    An image that fails to decode here (after passing :meth:`screen`) raises :class:`BadInputError` naming it.
    """

    marker = ""  # the file that marks a split directory of this format (e.g. gt.txt)
    unreadable_policy = "error"  # for images that fail to decode mid-epoch; screen() sets the split's policy
    max_width: int | None = None  # px at the data height; wider images are too_wide (None: MAX_ASPECT x height)

    def __init__(self, records: list[Record], charset: Charset, height: int = 32, channels: int = 1) -> None:
        if channels not in MODES:
            raise ValueError(f"channels must be one of {list(MODES)}, got {channels}")
        self.records = records
        self.charset = charset
        self.height = height
        self.channels = channels

    @classmethod
    def read_records(cls, path: str | os.PathLike, bad: BadInput) -> list[Record]:
        """The records of the split at ``path``, labels only (no image is opened); malformed entries go to
        ``bad``; labels are not checked (empty ones included)."""
        raise NotImplementedError

    @classmethod
    def from_records(cls, path: str | os.PathLike, records: list[Record], charset: Charset, height: int = 32,
                     channels: int = 1) -> LabelledLines:
        """The dataset over ``records`` of the split at ``path``."""
        return cls(records, charset, height, channels)

    def open_image(self, key: str | int) -> Image.Image:
        """The (lazily decoded) Pillow image of ``key``; ``FileNotFoundError`` if there is none."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int, bad: BadInput | None = None) -> torch.Tensor | None:
        """The image of record ``index`` as float32 ``(channels, height, W)`` in ``[0, 1]``.

        One that fails to decode raises :class:`BadInputError` naming the record, or, with ``bad``, is reported
        to it as ``unreadable_image`` (which raises or counts it; then ``None``).
        """
        record = self.records[index]
        try:
            with self.open_image(record.key) as image:
                return image_to_tensor(image, self.height, self.channels)
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
            what = f"cannot read image {record.key!r}: {type(err).__name__}: {err}"
            if bad is None:
                raise BadInputError(f"{record.where}: {what}") from err
            bad.report("unreadable_image", record.where, what)
            return None

    def __getitem__(self, index: int) -> dict:
        """The sample ``{"image", "text", "target"}``; an image that fails to decode here, mid-epoch, follows
        ``unreadable_policy`` (the ``unreadable_image`` policy :meth:`screen` saw): ``error`` raises
        :class:`BadInputError` naming the record and the override, ``skip`` returns ``{"skipped": "where: what"}``,
        which :func:`data.batching.collate_lines` leaves out of the batch and names."""
        bad = BadInput({"unreadable_image": self.unreadable_policy})
        image, record = self.image(index, bad), self.records[index]
        if image is None:
            return {"skipped": bad.skipped["unreadable_image"][0]}
        # an evaluation set keeps labels with characters outside the charset: their target leaves those out
        # (the module scores the text, and leaves such lines out of the loss)
        known = self.charset.characters
        target = torch.tensor(self.charset.encode("".join(c for c in record.label if c in known)), dtype=torch.long)
        return {"image": image, "text": record.label, "target": target}

    def screen(self, bad: BadInput, output_length: Callable[[int], int] | None = None,
               require_emittable: bool = True) -> LabelledLines:
        """Check every record; keep the good ones with their resized widths; returns ``self``.

        Reports to ``bad`` (which raises or counts): ``missing_image``, ``unreadable_image`` (Pillow cannot open
        the image or ``verify()`` it: reads headers and, for PNG, checksums, without decoding pixels) and, with
        ``require_emittable``, what the model cannot emit (for training; evaluation keeps and scores such
        lines): ``unknown_char``, ``too_wide`` (wider than ``max_width`` once resized) and, if ``output_length``
        (resized width -> model frames) is given, ``too_long`` (frames < label length + repeats, see
        :func:`label_frames`). Images that pass but fail to decode later follow ``bad``'s ``unreadable_image``
        policy too (see :meth:`__getitem__`).
        """
        self.unreadable_policy = bad.policy["unreadable_image"]
        max_width = self.max_width if self.max_width is not None else MAX_ASPECT * self.height
        kept, known = [], set(self.charset.characters)
        check_frames = require_emittable and output_length is not None
        needed = label_frames([record.label for record in self.records]) if check_frames else []
        for index, record in enumerate(self.records):
            unknown = sorted(set(record.label) - known) if require_emittable else ()
            if unknown:
                bad.report("unknown_char", record.where, f"characters {''.join(unknown)!r} of label "
                           f"{record.label!r} are not in the charset")
                continue
            try:
                with self.open_image(record.key) as image:
                    size = image.size
                    image.verify()
            except FileNotFoundError as err:
                bad.report("missing_image", record.where, f"image {record.key!r} not found ({err})")
                continue
            except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
                bad.report("unreadable_image", record.where, f"cannot read image {record.key!r}: "
                           f"{type(err).__name__}: {err}")
                continue
            width = resized_width(size, self.height)
            if require_emittable and width > max_width:
                bad.report("too_wide", record.where, f"image {size[0]}x{size[1]} px is {width} px wide at height "
                           f"{self.height}, more than data.max_width={max_width}")
                continue
            if check_frames and output_length(width) < needed[index]:
                bad.report("too_long", record.where, f"label {record.label!r} needs {needed[index]} CTC frames, "
                           f"the image ({size[0]}x{size[1]} px, {width} px wide at height {self.height}) gives "
                           f"{output_length(width)}")
                continue
            kept.append(record._replace(width=width))
        self.records = kept
        return self


def split_format(path: str | os.PathLike) -> type[LabelledLines]:
    """The format of the split directory ``path``: a ``gt.txt`` folder or an LMDB directory (``data.mdb``)."""
    from data.folder import FolderLines  # the formats build on this module
    from data.lmdb import LmdbLines

    for lines in (FolderLines, LmdbLines):
        if (Path(path) / lines.marker).is_file():
            return lines
    raise FileNotFoundError(f"{path}: neither a folder with a {FolderLines.marker} nor an LMDB directory "
                            f"({LmdbLines.marker})")


def read_labels(path: str | os.PathLike, bad: BadInput, lines: type[LabelledLines] | None = None,
                allow_outside_paths: bool = False) -> list[Record]:
    """The records of the split at ``path`` in format ``lines`` (``None``: :func:`split_format`), labels only;
    malformed entries and empty labels go to ``bad``, and so do image paths that leave the split's folder
    (absolute, or through ``..``; judged on the path as written, so symlinks inside the folder are fine) unless
    ``allow_outside_paths``."""
    records = []
    root = os.path.abspath(path)  # abspath normalises lexically (no symlinks resolved)
    for record in (lines or split_format(path)).read_records(path, bad):
        if (not allow_outside_paths and isinstance(record.key, str)  # a file path (an LMDB key is an index)
                and os.path.commonpath([root, os.path.abspath(record.key)]) != root):
            bad.report("malformed", record.where, f"image path {record.key!r} leaves the dataset folder {path} "
                       f"(absolute or '..'; allow it with data.allow_outside_paths=true, or --allow-outside-paths "
                       f"in scripts/evaluate.py)")
        elif record.label:
            records.append(record)
        else:
            bad.report("empty_label", record.where, "empty label")
    return records


def open_split(path: str | os.PathLike, charset: Charset, height: int = 32, channels: int = 1,
               bad: BadInput | None = None, output_length: Callable[[int], int] | None = None,
               require_emittable: bool = True, allow_outside_paths: bool = False) -> LabelledLines:
    """The screened labelled lines of the split at ``path`` (a ``gt.txt`` folder or an LMDB directory): read
    (:func:`read_labels`, ``allow_outside_paths`` as there) and checked (:meth:`LabelledLines.screen`) as in
    training; problems go to ``bad`` (``None``: the default policy). ``require_emittable=False`` keeps lines the
    model cannot emit (for evaluation). An LMDB dataset's environment is closed after screening and reopened on the
    next read."""
    bad = bad if bad is not None else BadInput()
    lines = split_format(path)
    records = read_labels(path, bad, lines, allow_outside_paths)
    dataset = lines.from_records(path, records, charset, height, channels)
    return dataset.screen(bad, output_length, require_emittable)


class LabelledDataModule(LineDataModule):
    """Train/val/test splits of labelled line images in some on-disk format.

    Args:
        train_dir, val_dir, test_dir: where each split is (a ``gt.txt`` folder, an LMDB directory, ...).
        charset: the characters in class order; ``None`` infers them from the training labels (sorted
            unique characters, logged), which reads the training labels here, in ``__init__``.
        height: image height the model takes; images are resized to it with their aspect ratio kept.
        channels: 1 (grey) or 3 (RGB); must match the model's ``in_channels``.
        batch_size: samples per batch.
        num_workers: decoding worker processes (persistent when > 0) for every split.
        seed: seeds the training order (a new permutation each epoch).
        blank: CTC blank class id.
        group_by_length: batch images of similar width together (train batches in a seeded random
            order, val/test in width order) to cut padding; False keeps the (shuffled / file) order.
        output_length: resized image width -> frames the model emits, e.g. a ``functools.partial`` of
            :func:`crnn.model.output_length`; training labels that need more frames are ``too_long``
            (more than :attr:`too_long_warning` of them: a warning naming the fix). ``None`` skips that check.
        bad_input: policy per problem kind, ``"error"`` or ``"skip"`` (see :mod:`data.bad_input`).
        train_size, val_size, test_size: use only the first that many samples of a split (e.g. for
            debugging on a large dataset); ``None`` uses all. The charset is still inferred from all
            training labels, and malformed lines anywhere in a ``gt.txt`` are still reported.
        max_width: training images wider than this once resized to ``height`` are ``too_wide`` (``None``:
            :data:`MAX_ASPECT` times ``height``).
        allow_outside_paths: accept image paths that leave a split's folder (absolute, ``..``); otherwise they
            are ``malformed``.
        augment: augments training images on the fly (``augment=line``: :class:`data.augment.LineAugment`);
            ``None`` leaves them as they are. Shapes are kept, so the ``too_long`` screen holds.

    The format is the class attribute ``lines`` (a :class:`LabelledLines` subclass; ``None``: each split's
    own, see :func:`split_format`). ``setup`` screens each split's images once (headers only) and logs how many
    samples were kept and skipped; ``problems[split]`` keeps the :class:`BadInput` record. Only training drops
    what the model cannot emit (``unknown_char``, ``too_long``); val and test keep every line with a readable
    image and a label, so their metrics count those lines too (:class:`crnn.module.CRNNModule` counts them as
    ``val/unemittable``, ``test/unemittable``). ``.charset`` exists
    right after construction. Setup, loaders and data-parallel sharding are
    :class:`data.line_datamodule.LineDataModule`'s.
    """

    lines: type[LabelledLines] | None = None
    too_long_warning = 0.01
    """Share of ``too_long`` training lines above which ``setup`` warns that the model is too coarse."""

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        test_dir: str,
        charset: str | None = None,
        height: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        blank: int = 0,
        group_by_length: bool = True,
        output_length: Callable[[int], int] | None = None,
        bad_input: Mapping[str, str] | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        max_width: int | None = None,
        allow_outside_paths: bool = False,
        augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        super().__init__({"train": train_size, "val": val_size, "test": test_size}, batch_size, num_workers, seed,
                         group_by_length, augment)
        self.dirs = {"train": str(train_dir), "val": str(val_dir), "test": str(test_dir)}
        self.height = height
        self.channels = channels
        self.output_length = output_length
        self.bad_input = dict(bad_input or {})
        self.max_width = max_width
        self.allow_outside_paths = allow_outside_paths
        BadInput(self.bad_input)  # validate the policy now, not at setup
        self.problems: dict[str, BadInput] = {}
        self._records: dict[str, list[Record]] = {}
        if charset is None:
            labels = [record.label for record in self.records("train")]
            charset = "".join(sorted(set("".join(labels))))
            log.info("charset inferred from %d training labels in %s: %r (%d characters)",
                     len(labels), self.dirs["train"], charset, len(charset))
        self.charset = Charset(charset, blank=blank)

    def records(self, split: str) -> list[Record]:
        """The split's records as read (cached); malformed entries and empty labels are reported here."""
        if split not in self._records:
            bad = self.problems[split] = BadInput(self.bad_input)
            self._records[split] = read_labels(self.dirs[split], bad, self.lines, self.allow_outside_paths)
        return self._records[split]

    def build_dataset(self, split: str) -> LabelledLines:
        """The split's screened dataset; logs the split's kept/skipped summary."""
        records, size, directory = self.records(split), self.sizes[split], self.dirs[split]
        dataset = (self.lines or split_format(directory)).from_records(
            directory, records[:size], self.charset, self.height, self.channels)
        bad = self.problems[split]
        dataset.max_width = self.max_width
        # training needs lines the model can emit; val/test score every line (see LineDataModule)
        dataset.screen(bad, self.output_length, require_emittable=split == "train")
        name = f"{split} data {directory}"
        if size is not None and size < len(records):
            name += f" (first {size} of {len(records)} samples: data.{split}_size)"
        if not dataset.records:
            raise BadInputError(f"{directory}: no usable samples; " + bad.summary(name, 0))
        log.log(logging.WARNING if bad.num_skipped else logging.INFO, "%s", bad.summary(name, len(dataset)))
        if split == "train":
            self._warn_if_too_long(bad, len(records[:size]))
        return dataset

    def _warn_if_too_long(self, bad: BadInput, lines: int) -> None:
        """Warn with the fix when more than :attr:`too_long_warning` of the ``lines`` training lines were
        skipped as ``too_long``: the model emits too few frames per pixel for this data."""
        too_long = len(bad.skipped["too_long"])
        if too_long <= self.too_long_warning * lines:
            return
        rate = self.output_length(800) / 800 if self.output_length is not None else float("nan")
        log.warning(
            "%d of %d training lines (%.1f %%) are too long for the model, which emits about 1 frame per %.1f px "
            "(CTC needs one per character, two for a repeated one): it never trains on them. Use a model with "
            "more frames per pixel, model=crnn_w4 (width / 4, the classic CRNN rate) or model=crnn_large, or a "
            "larger data.height (images are scaled, aspect kept, so each character gets wider)",
            too_long, lines, 100 * too_long / lines, 1 / rate)

    def length_key(self, dataset: LabelledLines) -> Callable[[int], int]:
        return lambda i: dataset.records[i].width
