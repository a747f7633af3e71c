"""Labelled line images on disk: image preprocessing, screening against the bad-input policy, a Dataset and a
DataModule base shared by the ``gt.txt`` folder (:mod:`data.folder`) and LMDB (:mod:`data.lmdb`) formats.

A format supplies two things: how to read a split's labels (:meth:`LabelledDataModule.read_records`, cheap,
no image decoding) and how to open one image by key (:meth:`LabelledLines.open_image`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.bad_input import BadInput, BadInputError
from data.charset import Charset
from data.datamodule import SPLITS, EpochSampler, line_loader, process_shard, shard_indices

log = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB"}


class Record(NamedTuple):
    """One labelled image: ``where`` names it in messages (``gt.txt:LINE``), ``key`` opens its image (a path,
    an LMDB index), ``width`` is its width in px after resizing to the data height (0 until screened)."""

    where: str
    label: str
    key: str | int
    width: int = 0


def resized_width(size: tuple[int, int], height: int) -> int:
    """Width of an image of ``size = (w, h)`` resized to ``height`` with its aspect ratio kept (at least 1)."""
    return max(1, round(size[0] * height / size[1]))


def image_to_tensor(image: Image.Image, height: int, channels: int = 1) -> torch.Tensor:
    """Any Pillow image -> float32 ``(channels, height, W)`` in ``[0, 1]``, ``W = resized_width(image.size, height)``.

    Converted to grey (``channels=1``) or RGB (``3``), resized bilinearly (antialiased when shrinking).
    """
    image = image.convert(_MODES[channels])
    width = resized_width(image.size, height)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
    return torch.from_numpy(array).reshape(height, width, channels).permute(2, 0, 1).contiguous()


def repeats(label: str) -> int:
    """Adjacent repeated characters of ``label``: CTC needs a blank frame between each such pair."""
    return sum(a == b for a, b in zip(label, label[1:]))


class LabelledLines(Dataset):
    """Map-style dataset of :class:`Record` s; subclasses say how to open an image by key.

    Items are ``{"image": float32 (channels, height, W) in [0, 1], "text": str, "target": int64 (L,)}``,
    as :class:`data.synthetic.SyntheticLines` gives, so batches are :func:`data.datamodule.collate_lines` dicts.
    An image that fails to decode here (after passing :meth:`screen`) raises :class:`BadInputError` naming it.
    """

    def __init__(self, records: list[Record], charset: Charset, height: int = 32, channels: int = 1) -> None:
        if channels not in _MODES:
            raise ValueError(f"channels must be one of {list(_MODES)}, got {channels}")
        self.records = records
        self.charset = charset
        self.height = height
        self.channels = channels

    def open_image(self, key: str | int) -> Image.Image:
        """The (lazily decoded) Pillow image of ``key``; ``FileNotFoundError`` if there is none."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            with self.open_image(record.key) as image:
                tensor = image_to_tensor(image, self.height, self.channels)
        except Exception as err:
            raise BadInputError(f"{record.where}: cannot read image {record.key!r}: {err}") from err
        target = torch.tensor(self.charset.encode(record.label), dtype=torch.long)
        return {"image": tensor, "text": record.label, "target": target}

    def screen(self, bad: BadInput, output_length: Callable[[int], int] | None = None) -> LabelledLines:
        """Check every record; keep the good ones with their resized widths; returns ``self``.

        Reports to ``bad`` (which raises or counts): ``unknown_char``, ``missing_image``,
        ``unreadable_image`` (Pillow cannot open the image or ``verify()`` it: reads headers and, for
        PNG, checksums, without decoding pixels) and, if ``output_length`` (resized width -> model
        frames) is given, ``too_long`` (frames < label length + repeats).
        """
        kept, known = [], set(self.charset.characters)
        for record in self.records:
            unknown = sorted(set(record.label) - known)
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
            needed = len(record.label) + repeats(record.label)
            if output_length is not None and output_length(width) < needed:
                bad.report("too_long", record.where, f"label {record.label!r} needs {needed} CTC frames, the "
                           f"image ({size[0]}x{size[1]} px, {width} px wide at height {self.height}) gives "
                           f"{output_length(width)}")
                continue
            kept.append(record._replace(width=width))
        self.records = kept
        return self


class LabelledDataModule(pl.LightningDataModule):
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
            :func:`crnn.model.output_length`; labels that need more frames are ``too_long``.
            ``None`` skips that check.
        bad_input: policy per problem kind, ``"error"`` or ``"skip"`` (see :mod:`data.bad_input`).
        train_size, val_size, test_size: use only the first that many samples of a split (e.g. for
            debugging on a large dataset); ``None`` uses all. The charset is still inferred from all
            training labels, and malformed lines anywhere in a ``gt.txt`` are still reported.

    ``setup`` screens each split's images once (headers only) and logs how many samples were kept and
    skipped; ``problems[split]`` keeps the :class:`BadInput` record. ``.charset`` exists right after
    construction. Batches are :func:`collate_lines` dicts. Under data-parallel training each process
    loads its own shard of every split, as :class:`data.datamodule.SyntheticDataModule` does.
    """

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
    ) -> None:
        super().__init__()
        self.dirs = {"train": str(train_dir), "val": str(val_dir), "test": str(test_dir)}
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.height = height
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
        self.output_length = output_length
        self.bad_input = dict(bad_input or {})
        BadInput(self.bad_input)  # validate the policy now, not at setup
        self.problems: dict[str, BadInput] = {}
        self._records: dict[str, list[Record]] = {}
        self.datasets: dict[str, LabelledLines] = {}
        if charset is None:
            labels = [record.label for record in self.records("train")]
            charset = "".join(sorted(set("".join(labels))))
            log.info("charset inferred from %d training labels in %s: %r (%d characters)",
                     len(labels), self.dirs["train"], charset, len(charset))
        self.charset = Charset(charset, blank=blank)

    def overfit(self, num_batches: int) -> None:
        """Train on the first ``num_batches`` batches' worth of samples only (``trainer.overfit_batches``)."""
        lines = num_batches * self.batch_size
        self.sizes["train"] = lines if self.sizes["train"] is None else min(self.sizes["train"], lines)
        self.datasets.pop("train", None)

    def read_records(self, directory: str, bad: BadInput) -> list[Record]:
        """The records of one split, labels only (no image is opened); malformed entries go to ``bad``."""
        raise NotImplementedError

    def make_dataset(self, directory: str, records: list[Record]) -> LabelledLines:
        """The format's :class:`LabelledLines` over ``records``."""
        raise NotImplementedError

    def records(self, split: str) -> list[Record]:
        """The split's records as read (cached); empty labels are reported here."""
        if split not in self._records:
            bad = self.problems[split] = BadInput(self.bad_input)
            records = []
            for record in self.read_records(self.dirs[split], bad):
                if record.label:
                    records.append(record)
                else:
                    bad.report("empty_label", record.where, "empty label")
            self._records[split] = records
        return self._records[split]

    def dataset(self, split: str) -> LabelledLines:
        """The split's screened dataset, built on first use; logs the split's kept/skipped summary."""
        if split not in self.datasets:
            records, size = self.records(split), self.sizes[split]
            dataset = self.make_dataset(self.dirs[split], records[:size])
            bad = self.problems[split]
            dataset.screen(bad, self.output_length)
            name = f"{split} data {self.dirs[split]}"
            if size is not None and size < len(records):
                name += f" (first {size} of {len(records)} samples: data.{split}_size)"
            if not dataset.records:
                raise BadInputError(f"{self.dirs[split]}: no usable samples; " + bad.summary(name, 0))
            log.log(logging.WARNING if bad.num_skipped else logging.INFO, "%s", bad.summary(name, len(dataset)))
            self.datasets[split] = dataset
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Screen the splits a stage needs: ``fit`` train + val, ``validate`` val, ``test`` test, ``None`` all."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: SPLITS}.get(stage, ())
        for split in splits:
            self.dataset(split)

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        train = split == "train"
        rank, world_size = process_shard(self.trainer)  # data-parallel: each process takes its own shard
        indices: Iterable[int] = (
            EpochSampler(len(dataset), seed=self.seed, fresh=False, rank=rank, world_size=world_size)
            if train else shard_indices(len(dataset), rank, world_size)
        )
        return line_loader(dataset, indices, self.batch_size, length=lambda i: dataset.records[i].width, shuffle=train,
                           group_by_length=self.group_by_length, seed=self.seed, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
