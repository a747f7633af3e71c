"""Why a run failed: one-line errors that ``train.py`` reports without a traceback and with exit status 1.

They derive from Hydra's ``CompactHydraException``, which ``@hydra.main`` prints as its message alone and turns
into exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback); called in-process (tests, notebooks) they are
ordinary exceptions.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class RunFailed(CompactHydraException):
    """A run that produced no result worth using; the message says why and what to try."""


class ConfigError(RunFailed):
    """A composed config that cannot start a run, found before any work: names the key and the value."""


class CheckpointError(RunFailed):
    """A checkpoint file that cannot be read or does not fit the configured model: names the file."""


class TrainingDiverged(RunFailed):
    """Training produced non-finite losses, outputs or gradients for too many steps in a row."""
