"""Batching of line samples: :func:`collate_lines`, the samplers (epoch-aware, length-grouped), data-parallel
sharding and :func:`line_loader`, the DataLoader every line datamodule builds; plus which splits a stage needs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    import pytorch_lightning as pl

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: SPLITS}
"""Lightning stage -> the splits its ``setup`` builds (other stages, e.g. ``predict``, need none)."""


def collate_lines(samples: Sequence[dict]) -> dict:
    """Batch samples ``{"image": (channels, H, W_i) float, "text": str, "target": (L_i,) int64}``.

    Images are right-padded with zeros to the widest one; ``widths`` says where each ends (the CRNN masks
    the padding, so its value never changes a result). A sample ``{"skipped": "where: what"}`` (a dataset that
    could not read it and skips such samples by policy) is left out of the batch and named in ``"skipped"``.

    Returns:
        dict with ``"images"`` float32 ``(B, channels, H, W_max)``, ``"widths"`` int64 ``(B,)`` (unpadded
        widths), ``"targets"`` int64 ``(B, S_max)`` (padded with 0; only the first
        ``target_lengths[b]`` entries of row ``b`` are labels), ``"target_lengths"`` int64 ``(B,)``,
        ``"texts"`` list of ``B`` str and ``"skipped"`` list of str (usually empty). If every sample was skipped,
        only ``"texts"`` (empty) and ``"skipped"``.
    """
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    if not samples:
        return {"texts": [], "skipped": skipped}
    images = [s["image"] for s in samples]
    targets = [s["target"] for s in samples]
    widths = torch.tensor([im.shape[-1] for im in images], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    channels, height = images[0].shape[:2]
    batch = torch.zeros(len(images), channels, height, int(widths.max()), dtype=images[0].dtype)
    for b, im in enumerate(images):
        batch[b, ..., : im.shape[-1]] = im
    padded_targets = torch.zeros(len(targets), int(target_lengths.max()), dtype=torch.long)
    for b, t in enumerate(targets):
        padded_targets[b, : len(t)] = t
    return {
        "images": batch,
        "widths": widths,
        "targets": padded_targets,
        "target_lengths": target_lengths,
        "texts": [s["text"] for s in samples],
        "skipped": skipped,
    }


def process_shard(trainer: pl.Trainer | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process among those splitting the data.

    The attached trainer's ``(global_rank, world_size)`` if given, else ``torch.distributed``'s if a
    process group is initialised, else ``(0, 1)``.
    """
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_indices(size: int, rank: int = 0, world_size: int = 1) -> range:
    """Evaluation indices of one process: ``rank, rank + world_size, ...`` below ``size``.

    Unlike ``torch.utils.data.DistributedSampler`` nothing is padded: the shards partition
    ``range(size)`` exactly (sizes differ by at most one), so metrics summed over processes count
    every sample once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return range(rank, size, world_size)


class EpochSampler(Sampler[int]):
    """Training indices for a :class:`SyntheticLines` of nominal length ``size``, reproducible per epoch.

    ``fresh=True``: epoch ``e`` yields ``e*size .. (e+1)*size - 1``, i.e. never-seen samples of the
    dataset's virtual stream (each index is an independent random sample, so no shuffling is needed).
    ``fresh=False``: a fixed set of ``size`` samples in a new permutation each epoch, seeded by
    ``(seed, epoch)``. Lightning calls :meth:`set_epoch` before every epoch; used elsewhere, call it yourself.

    With ``world_size > 1`` (data-parallel training) each ``rank`` gets ``ceil(size / world_size)``
    indices, the same number on every rank (so every process runs the same number of steps):
    ``fresh=True`` strides through a block of ``ceil(size / world_size) * world_size`` fresh samples
    per epoch, disjoint across ranks and epochs; ``fresh=False`` strides through the epoch's
    permutation, wrapped around to equal length like ``DistributedSampler``. ``world_size=1`` is
    exactly the single-process behaviour.
    """

    def __init__(self, size: int, seed: int = 0, fresh: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.size = size
        self.seed = seed
        self.fresh = fresh
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[int]:
        block = len(self) * self.world_size
        if self.fresh:
            start = self.epoch * block
            return iter(range(start + self.rank, start + block, self.world_size))
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        if block > self.size:
            order = np.resize(order, block)  # repeats from the start, like DistributedSampler's padding
        return iter(order[self.rank :: self.world_size].tolist())


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of samples with similar keys (e.g. text lengths), so little of a batch is padding.

    The indices of ``sampler`` are taken in pools of ``pool_batches * batch_size``; each pool is
    sorted by ``key(index)`` (stably, so ties keep the sampler's order), cut into batches, and, with
    ``shuffle``, the pool's batches are put in an order seeded by ``(seed, epoch)``. With text
    lengths spread evenly over 1..10, this roughly halves the padded width of a batch.

    Args:
        sampler: any sized iterable of indices, e.g. :class:`EpochSampler` (whose ``epoch`` seeds the
            batch order; Lightning calls its ``set_epoch`` through this sampler's ``sampler``) or ``range(n)``.
        batch_size: samples per batch; only a pool's last batch may be smaller.
        key: index -> sort key, e.g. ``lambda i: len(dataset.text(i))``.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        batch_size: int,
        key: Callable[[int], float],
        pool_batches: int = 32,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.key = key
        self.pool = pool_batches * batch_size
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        n, full = len(self.sampler), len(self.sampler) // self.pool
        return full * (self.pool // self.batch_size) + math.ceil((n - full * self.pool) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, getattr(self.sampler, "epoch", 0)])
        indices = iter(self.sampler)
        while pool := [i for _, i in zip(range(self.pool), indices)]:
            pool.sort(key=self.key)
            batches = [pool[k : k + self.batch_size] for k in range(0, len(pool), self.batch_size)]
            order = rng.permutation(len(batches)) if self.shuffle else range(len(batches))
            yield from (batches[b] for b in order)


class EpochTaggedBatches(Sampler[list[tuple[int, int]]]):
    """``batches`` (a batch sampler over an epoch-aware ``sampler``, e.g. :class:`EpochSampler`) with every index
    ``i`` turned into ``(epoch, i)``: the key of :class:`data.augment.AugmentedLines`. The epoch travels with the
    indices, so DataLoader workers (persistent ones too) need no shared state. ``.sampler`` is the epoch-aware
    sampler, where Lightning calls ``set_epoch``."""

    def __init__(self, batches: Sampler[list[int]], sampler: EpochSampler) -> None:
        self.batches = batches
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        return ([(epoch, i) for i in batch] for batch in self.batches)


def line_loader(dataset: Dataset, indices: Iterable[int], batch_size: int, length: Callable[[int], int],
                shuffle: bool, group_by_length: bool, seed: int, num_workers: int,
                tag_epoch: bool = False) -> DataLoader:
    """The DataLoader of every line datamodule: batches of ``indices`` (grouped by ``length`` of each index
    with :class:`LengthGroupedBatchSampler` if ``group_by_length``, else in order), :func:`collate_lines`.
    ``tag_epoch``: the dataset gets ``(epoch, index)`` keys (:class:`EpochTaggedBatches`; ``indices`` must be an
    :class:`EpochSampler`).

    ``generator`` seeds each worker's torch RNG as ``base_seed + worker_id``, reproducibly; the datasets'
    samples depend only on ``(seed, index)``, never on these RNGs.
    """
    if group_by_length:
        batches = LengthGroupedBatchSampler(indices, batch_size, key=length, shuffle=shuffle, seed=seed)
    else:
        batches = BatchSampler(indices, batch_size, drop_last=False)
    if tag_epoch:
        batches = EpochTaggedBatches(batches, indices)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_lines,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
