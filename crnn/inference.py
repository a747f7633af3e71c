"""Inference from a checkpoint file alone: load the recogniser, read images, recognise batches with confidences."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image

from crnn.decoding import beam_search, greedy_decode
from crnn.module import CRNNModule
from data import collate_lines, image_to_tensor

DECODERS = ("greedy", "beam")


class Recognition(NamedTuple):
    """A recognised line: its text and the model's probability of it (see :func:`recognize`)."""

    text: str
    confidence: float


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_recognition_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The options every recognition script shares: ``--decoder``, ``--beam-width``, ``--batch-size``, ``--device``."""
    parser.add_argument("--decoder", choices=DECODERS, default="greedy")
    parser.add_argument("--beam-width", type=positive_int, default=10, help="prefixes kept per frame by --decoder beam")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--device", default="auto", help="auto (accelerator if available), cpu, cuda, cuda:1, ...")


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
    loops, callbacks) is ignored.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module = CRNNModule(**checkpoint["hyper_parameters"])
    prefix = "model."
    module.model.load_state_dict(
        {key.removeprefix(prefix): value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    )
    return module.eval().to(device)


def read_image(path: str | os.PathLike, module: CRNNModule) -> torch.Tensor:
    """The image file at ``path`` as the module's input: float32 ``(channels, height, W)`` in ``[0, 1]``, its
    aspect ratio kept (the same preprocessing as the folder/LMDB datasets, :func:`data.image_to_tensor`)."""
    with Image.open(path) as image:
        return image_to_tensor(image, module.hparams.height, module.hparams.model.get("in_channels", 1))


@torch.no_grad()
def recognize(
    module: CRNNModule, images: Sequence[torch.Tensor], decoder: str = "greedy", beam_width: int = 10
) -> list[Recognition]:
    """Recognise images ``(channels, height, W_i)`` float in ``[0, 1]`` as one padded batch (padded like training
    batches, :func:`data.collate_lines`; padding does not change the result of an image).

    The confidence is the model's probability of the returned text. ``decoder="beam"``: the prefix beam search's
    ``P(text | image)``, summed over all alignments of the text (exact unless the beam pruned some).
    ``"greedy"``: the probability of the single best alignment, ``prod_t max_c p_t(c)`` over the image's
    frames, a lower bound of the same quantity. Both are per line, so they shrink with line length.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    empty = torch.empty(0, dtype=torch.long)
    batch = collate_lines([{"image": image, "text": "", "target": empty} for image in images])
    log_probs, lengths = module(batch["images"].to(module.device), batch["widths"])  # (T, B, C), (B,)
    blank = module.charset.blank
    if decoder == "beam":
        labels, scores = beam_search(log_probs, lengths, beam_width=beam_width, blank=blank)
    else:
        labels = greedy_decode(log_probs, lengths, blank=blank)
        valid = torch.arange(log_probs.shape[0], device=log_probs.device)[:, None] < lengths  # (T, B)
        scores = torch.where(valid, log_probs.amax(-1), 0.0).sum(0)
    return [Recognition(module.charset.decode(ids), p) for ids, p in zip(labels, scores.float().exp().tolist())]
