""":class:`LineDataModule`: what every line datamodule (synthetic, on-disk) shares: splits, setup, loaders."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data.augment import AugmentedLines
from data.batching import STAGE_SPLITS, EpochSampler, line_loader, process_shard, shard_indices

log = logging.getLogger(__name__)


class LineDataModule(pl.LightningDataModule):
    """Train/val/test datasets of text lines, built once on first use, and their loaders.

    A subclass says how to build a split's dataset (:meth:`build_dataset`) and the key batches are grouped by
    (:meth:`length_key`), and sets ``.charset``; optionally ``fresh_train`` (the training sampler draws new
    samples each epoch, see :class:`EpochSampler`), ``endless_train`` and :attr:`eval_num_workers`.

    Args:
        sizes: split -> samples (per epoch for training), or ``None`` where the subclass decides (e.g. all).
        batch_size: samples per batch (smaller last batches are kept).
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: seeds the training order.
        group_by_length: batch samples with similar :meth:`length_key` together
            (:class:`data.batching.LengthGroupedBatchSampler`; train batches in a seeded random order, val/test in
            key order) to cut padding; False batches in sampler order.
        augment: ``(image (C, H, W), seed) -> image`` of the same shape, applied to training images on the fly
            (e.g. :class:`data.augment.LineAugment`, ``augment=line``) with a seed of ``(seed, epoch, index)``;
            ``None`` (``augment=none``) leaves them as they are. Val and test images are never augmented.

    Under a multi-process strategy (DDP) every process loads its own shard (see :func:`process_shard`):
    training batches from :class:`EpochSampler` with ``rank``/``world_size``, and val/test batches from
    :func:`shard_indices`, which partition the set exactly (no padded duplicates, so summed metrics count
    every line once). Lightning must not replace the samplers: use ``Trainer(use_distributed_sampler=False)``
    (as ``conf/trainer/ddp*.yaml`` do); ``batch_size`` is per process. Batches are
    :func:`data.batching.collate_lines` dicts.
    """

    fresh_train = False
    endless_train = False
    """True if the training split is an endless stream (rendered lines): :meth:`overfit` then takes exactly
    ``num_batches`` batches' worth, instead of at most the split's size."""

    def __init__(self, sizes: Mapping[str, int | None], batch_size: int, num_workers: int, seed: int,
                 group_by_length: bool,
                 augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
        self.augment = augment
        self.datasets: dict[str, Dataset] = {}

    def build_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``), of ``len`` its size."""
        raise NotImplementedError

    def length_key(self, dataset: Dataset) -> Callable[[int], float]:
        """Index of ``dataset`` -> the key its batches are grouped by (e.g. text length, image width); cheap."""
        raise NotImplementedError

    @property
    def eval_num_workers(self) -> int:
        """Worker processes of the val/test loaders."""
        return self.num_workers

    def dataset(self, split: str) -> Dataset:
        """The split's dataset, built on first use."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs: ``fit`` train + val, ``validate`` val, ``test`` test, ``None`` all."""
        for split in STAGE_SPLITS.get(stage, ()):
            self.dataset(split)

    def overfit(self, num_batches: int) -> None:
        """Train on the same ``num_batches`` batches' worth of lines every epoch, the first ones of the split
        (``trainer.overfit_batches``: Lightning itself can only fix the batches of a loader built on a
        ``RandomSampler``), with no augmentation (memorising lines needs the same images every epoch)."""
        lines, size = num_batches * self.batch_size, self.sizes["train"]
        self.sizes["train"] = lines if size is None or self.endless_train else min(size, lines)
        self.fresh_train = False
        if self.augment is not None:
            log.info("overfitting %d batches: training images are not augmented", num_batches)
            self.augment = None
        self.datasets.pop("train", None)

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        train = split == "train"
        augment = self.augment if train else None
        rank, world_size = process_shard(self.trainer)  # data-parallel: each process takes its own shard
        indices: Iterable[int] = (
            EpochSampler(len(dataset), seed=self.seed, fresh=self.fresh_train, rank=rank, world_size=world_size)
            if train else shard_indices(len(dataset), rank, world_size)
        )
        return line_loader(dataset if augment is None else AugmentedLines(dataset, augment, self.seed), indices,
                           self.batch_size, length=self.length_key(dataset), shuffle=train,
                           group_by_length=self.group_by_length, seed=self.seed,
                           num_workers=self.num_workers if train else self.eval_num_workers,
                           tag_epoch=augment is not None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
