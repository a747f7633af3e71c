"""Inference from a checkpoint file alone: load the recogniser, read images, recognise batches with confidences."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image

from crnn.decoding import Decoder, GreedyDecoder
from crnn.errors import CheckpointError
from crnn.module import CRNNModule
from data import collate_lines, image_to_tensor


class Recognition(NamedTuple):
    """A recognised line: its text and the model's probability of it (see :func:`recognize`)."""

    text: str
    confidence: float


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: the available accelerator (CUDA, MPS, ...), else the CPU; any other name as ``torch.device``."""
    if name == "auto":
        return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    return torch.device(name)


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


def load_recognizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> CRNNModule:
    """The :class:`CRNNModule` of a training checkpoint, in eval mode on ``device``.

    Reads the file with ``torch.load(weights_only=True)`` (tensors and plain containers only: no pickled code
    runs) and rebuilds the module from its hyper-parameters (charset, blank, image height, network config), so
    nothing but the file is needed. Only the network's weights are loaded; training state (loss, optimizer,
    loops, callbacks) is ignored. A file that is not a readable checkpoint raises
    :class:`crnn.errors.CheckpointError` naming it.
    """
    checkpoint = read_checkpoint(path)
    module = CRNNModule(**checkpoint["hyper_parameters"])
    prefix = "model."
    module.model.load_state_dict(
        {key.removeprefix(prefix): value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    )
    return module.eval().to(device)


def read_image(path: str | os.PathLike, module: CRNNModule) -> torch.Tensor:
    """The image file at ``path`` as the module's input: float32 ``(channels, height, W)`` in ``[0, 1]``, its
    aspect ratio kept (the same preprocessing as the folder/LMDB datasets, :func:`data.image_to_tensor`)."""
    channels, height = module.input_format
    with Image.open(path) as image:
        return image_to_tensor(image, height, channels)


@torch.no_grad()
def recognize(module: CRNNModule, images: Sequence[torch.Tensor], decoder: Decoder | None = None) -> list[Recognition]:
    """Recognise images ``(channels, height, W_i)`` float in ``[0, 1]`` as one padded batch (padded like training
    batches, :func:`data.collate_lines`; padding does not change the result of an image).

    ``decoder`` is any :class:`crnn.decoding.Decoder` (default :class:`crnn.decoding.GreedyDecoder`); the
    confidence is ``exp`` of its score, the model's probability of the returned text as that decoder measures
    it: :class:`crnn.decoding.BeamSearchDecoder` gives ``P(text | image)`` summed over all alignments of the text
    (exact unless the beam pruned some); greedy the probability of the single best alignment,
    ``prod_t max_c p_t(c)`` over the image's frames, a lower bound of the same quantity. Both are per line, so
    they shrink with line length.
    """
    decoder = decoder if decoder is not None else GreedyDecoder()
    empty = torch.empty(0, dtype=torch.long)
    batch = collate_lines([{"image": image, "text": "", "target": empty} for image in images])
    log_probs, lengths = module(batch["images"].to(module.device), batch["widths"])  # (T, B, C), (B,)
    labels, scores = decoder(log_probs, lengths, module.charset.blank)
    return [Recognition(module.charset.decode(ids), p) for ids, p in zip(labels, scores.float().exp().tolist())]
