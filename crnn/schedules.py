"""Learning-rate schedules."""

from __future__ import annotations

import torch


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's ``OneCycleLR`` (the default ``scheduler``), except that a warm-up of exactly one step works.

    torch ends the warm-up at step ``pct_start * total_steps - 1`` and divides by that length, so
    ``pct_start * total_steps == 1`` (a 10-step smoke run with the default ``pct_start=0.1``) raised
    ``ZeroDivisionError``; there ``pct_start`` grows by a millionth of a step, giving the rates torch gives for any
    ``pct_start`` just above it (step 0 at ``max_lr / div_factor``, then annealing from ``max_lr``).
    """

    def __init__(self, optimizer, max_lr, total_steps=None, pct_start=0.3, **kwargs):
        if total_steps and float(pct_start * total_steps) == 1.0:
            pct_start += 1e-6 / total_steps
        super().__init__(optimizer, max_lr, total_steps=total_steps, pct_start=pct_start, **kwargs)
