"""CRNN text-line recogniser: model, Lightning module, CTC decoding and metrics."""

from crnn.decoding import BeamSearchDecoder, Decoded, Decoder, GreedyDecoder, beam_search, greedy_decode
from crnn.metrics import TextMetrics
from crnn.model import CRNN
from crnn.module import CRNNModule

__all__ = [
    "CRNN",
    "BeamSearchDecoder",
    "CRNNModule",
    "Decoded",
    "Decoder",
    "GreedyDecoder",
    "TextMetrics",
    "beam_search",
    "greedy_decode",
]
