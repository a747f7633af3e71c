"""Callbacks that make a resumed run continue exactly where the interrupted one stopped."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states in every checkpoint and restores them when training resumes from one.

    Lightning restores weights, optimizer, scheduler, loop counters and callback states, but not the global
    generators: without this, dropout masks (torch) after a resume differ from those of an uninterrupted run.
    Covers ``torch`` (CPU and, when available, the current CUDA device), ``numpy.random`` and ``random``. The
    checkpoint holds rank 0's states; every process restores them, the CUDA one onto its own device (so a
    checkpoint also resumes on a machine with fewer GPUs). Exact for one process; under DDP the ranks are seeded
    alike, so exact as far as their draws are alike too (same batch shapes). The states
    are stored as tensors, ints and strings only, so checkpoints still load with ``torch.load(weights_only=True)``.
    Data order needs nothing here: the samplers derive it from ``(seed, epoch)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        return {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"][0])
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, state, gauss = state_dict["python"]
        random.setstate((version, tuple(state), gauss))
