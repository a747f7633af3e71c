"""Where each recognised character and word is in the image, and how sure the model is of it.

A decoded line is aligned to its frames by Viterbi (:func:`losses.forced_align`); each character's frames
(:func:`losses.path_to_spans`) map to pixels through the network's width stride and the resize back to the
original image. A CTC network emits a character on one or a few frames, usually near the glyph's centre, so the
x-range is where the model saw the character, not the glyph's full ink extent.

A character's confidence is the model's probability of it where the alignment places it:
``sum_t γ[t, c] p_t(c) / sum_t γ[t, c]`` over the frames between its neighbours' Viterbi spans, with
``γ[t, c] = P(frame t emits c | text, image)`` (:func:`losses.ctc_alignment_targets`) and ``p_t(c)`` the
network's frame posterior. A word's confidence is the product of its characters' (all of them right).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from crnn.decoding import Decoder, GreedyDecoder
from crnn.module import CRNNModule
from data import collate_lines
from losses import ctc_alignment_targets, forced_align, path_to_spans

__all__ = ["Box", "LinePositions", "frame_stride", "recognize_with_positions", "word_boxes"]


class Box(NamedTuple):
    """A character or word: its text, x-range ``[x0, x1)`` in the original image's pixels, and confidence."""

    text: str
    x0: float
    x1: float
    confidence: float


class LinePositions(NamedTuple):
    """A recognised line: text, ``log P(text | image)`` by the decoder, its ``exp``, and one :class:`Box` per
    character."""

    text: str
    log_prob: float
    confidence: float
    chars: list[Box]


def frame_stride(model: nn.Module) -> int:
    """Input pixels per output frame: the product of the width strides of the network's layers."""
    stride = 1
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            value = layer.stride
            stride *= value[-1] if isinstance(value, tuple) else value
    return stride


def word_boxes(chars: Sequence[Box]) -> list[Box]:
    """Space-separated words of a line's characters: each spans its first to last character, its confidence the
    product of theirs."""
    words, current = [], []
    for box in [*chars, Box(" ", 0.0, 0.0, 1.0)]:
        if box.text != " ":
            current.append(box)
        elif current:
            confidence = torch.tensor([b.confidence for b in current], dtype=torch.float64).prod().item()
            words.append(Box("".join(b.text for b in current), current[0].x0, current[-1].x1, confidence))
            current = []
    return words


@torch.no_grad()
def recognize_with_positions(module: CRNNModule, images: Sequence[torch.Tensor], original_widths: Sequence[int],
                             decoder: Decoder | None = None) -> list[LinePositions]:
    """Recognise images ``(channels, height, W_i)`` (as :func:`crnn.inference.recognize`) and locate their
    characters; ``original_widths[i]`` is image ``i``'s width before it was resized to the model's height."""
    decoder = decoder if decoder is not None else GreedyDecoder()
    empty = torch.empty(0, dtype=torch.long)
    batch = collate_lines([{"image": image, "text": "", "target": empty} for image in images])
    log_probs, lengths = module(batch["images"].to(module.device), batch["widths"])  # (T, B, C), (B,)
    blank = module.charset.blank
    labels, scores = decoder(log_probs, lengths, blank)
    targets = torch.tensor([ids + [blank] * (max(map(len, labels), default=0) - len(ids)) for ids in labels],
                           dtype=torch.long).reshape(len(labels), -1)
    target_lengths = torch.tensor([len(ids) for ids in labels], dtype=torch.long)
    log_probs = log_probs.float()
    paths, _ = forced_align(log_probs, targets.to(log_probs.device), lengths, target_lengths.to(lengths.device), blank)
    gamma = ctc_alignment_targets(log_probs, targets.to(log_probs.device), lengths, target_lengths.to(lengths.device),
                                  blank)
    weighted = (gamma * log_probs.exp()).cpu()  # (T, B, C)
    gamma, paths, lengths = gamma.cpu(), paths.cpu(), lengths.cpu().tolist()
    stride = frame_stride(module.model)
    results = []
    for b, (ids, score) in enumerate(zip(labels, scores.float().tolist())):
        spans = path_to_spans(paths[b, : lengths[b]], blank)
        scale = original_widths[b] / images[b].shape[-1]  # resized px -> original px
        chars = []
        for i, span in enumerate(spans):
            window = slice(spans[i - 1].end if i else 0, spans[i + 1].start if i + 1 < len(spans) else lengths[b])
            mass = gamma[window, b, span.token].sum().item()
            confidence = weighted[window, b, span.token].sum().item() / mass if mass > 0 else 0.0
            x0 = min(span.start * stride, images[b].shape[-1]) * scale
            x1 = min(span.end * stride, images[b].shape[-1]) * scale
            chars.append(Box(module.charset.decode([span.token]), x0, x1, confidence))
        results.append(LinePositions(module.charset.decode(ids), score, float(torch.tensor(score).exp()), chars))
    return results
