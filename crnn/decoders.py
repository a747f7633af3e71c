"""Decoder objects for configs: ``decoder(log_probs (T, B, C), input_lengths (B,), blank) -> B lists of ids``."""

from __future__ import annotations

from torch import Tensor

from crnn.decoding import beam_search, greedy_decode


class GreedyDecoder:
    """Best-path decoding (:func:`crnn.decoding.greedy_decode`)."""

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> list[list[int]]:
        return greedy_decode(log_probs, input_lengths, blank=blank)


class BeamSearchDecoder:
    """Prefix beam search (:func:`crnn.decoding.beam_search`), keeping ``beam_width`` prefixes per frame."""

    def __init__(self, beam_width: int = 10):
        self.beam_width = beam_width

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> list[list[int]]:
        return beam_search(log_probs, input_lengths, beam_width=self.beam_width, blank=blank)[0]
