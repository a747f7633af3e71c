"""Inference from a checkpoint file alone: load the recogniser, read images, recognise batches with confidences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image

from crnn.decoding import Decoder, GreedyDecoder
from crnn.checkpoints import read_checkpoint
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
