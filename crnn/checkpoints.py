"""Reading training checkpoint files: one error naming the file for anything missing, damaged or foreign."""

from __future__ import annotations

import os
import zipfile

import torch

from crnn.errors import CheckpointError


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The contents of a training checkpoint file, read with ``torch.load(weights_only=True)`` (tensors and plain
    containers only: no pickled code runs).

    Raises :class:`crnn.errors.CheckpointError` naming the file if it is missing, truncated or corrupted (not a
    readable ``torch.save`` archive), or not a checkpoint of this project (no ``state_dict`` and
    ``hyper_parameters``).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save archive: truncated, or another "
                              f"kind of file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile, pickle, unicode and torch errors, depending on where the damage is
        text = str(err).strip()
        # torch's weights-only refusal suggests weights_only=False: wrong advice for a damaged file; keep the cause
        reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        reason = (reason.strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged? {type(err).__name__}: {reason})") from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        found = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a ctc-crnn training checkpoint (no state_dict and hyper_parameters; "
                              f"found {found})")
    return checkpoint


def check_resumable(checkpoint: dict, module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Raise :class:`crnn.errors.CheckpointError` naming ``path`` unless ``checkpoint`` (from
    :func:`read_checkpoint`) holds a training state whose weights have the names and shapes of ``module``'s."""
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(f"{path}: holds weights only, no training state (optimizer, loops) to resume from")
    saved, expected = checkpoint["state_dict"], module.state_dict()
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    reshaped = [f"{name} {tuple(saved[name].shape)} vs {tuple(expected[name].shape)}"
                for name in sorted(set(saved) & set(expected)) if saved[name].shape != expected[name].shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in
                 (("weights missing", missing), ("unexpected weights", unexpected),
                  ("weights of another shape, checkpoint vs configured", reshaped)) if items]
        raise CheckpointError(f"{path}: does not fit the configured model: {'; '.join(parts)}; resume with the "
                              f"overrides (model, data, charset) the checkpoint was trained with")
