"""Character and word positions and confidences against hand-worked pixel ranges and brute-force posteriors."""

import math

import pytest
import torch
from torch import nn

import brute_force as bf
from crnn.decoding import BeamSearchDecoder
from crnn.positions import Box, frame_stride, recognize_with_positions, word_boxes
from data import Charset


class FixedModule(nn.Module):
    """Stands in for a CRNNModule: a width stride of 4 (``model``) and fixed ``(T, B, C)`` log-probs."""

    def __init__(self, log_probs, charset):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d((2, 2)), nn.MaxPool2d((2, 2)),
                                   nn.MaxPool2d((2, 1)))
        self.log_probs, self.charset = log_probs, charset
        self.device = torch.device("cpu")

    def forward(self, images, widths):
        lengths = torch.div(widths, 4, rounding_mode="floor")
        return self.log_probs, lengths


def frame_log_probs(paths, num_classes=4, peak=0.85):
    """``(T, B, C)`` log-probs with ``peak`` on each frame's class of each line's path."""
    probs = torch.full((len(paths[0]), len(paths), num_classes), (1 - peak) / (num_classes - 1), dtype=torch.float64)
    for b, path in enumerate(paths):
        probs[torch.arange(len(path)), b, path] = peak
    return probs.log()


def test_frame_stride_multiplies_the_width_strides():
    assert frame_stride(FixedModule(None, None).model) == 4


def test_characters_get_their_viterbi_frames_in_original_pixels_and_posterior_weighted_confidence():
    """Charset "ab " (a=1, b=2, space=3); line 0's frames a a _ space b _ read "a b": "a" on frames [0, 2) ->
    resized px [0, 8) -> original px [0, 20) at 2.5x; space [3, 4) -> [30, 40); b [4, 5) -> [40, 50)."""
    charset = Charset("ab ")
    log_probs = frame_log_probs([[1, 1, 0, 3, 2, 0], [0, 2, 2, 0, 0, 0]])
    module = FixedModule(log_probs, charset)
    images = [torch.zeros(1, 32, 24), torch.zeros(1, 32, 24)]
    lines = recognize_with_positions(module, images, [60, 24], BeamSearchDecoder(364, token_min_logp=None))  # exact
    assert [line.text for line in lines] == ["a b", "b"]
    assert [(box.text, box.x0, box.x1) for box in lines[0].chars] == [("a", 0, 20), (" ", 30, 40), ("b", 40, 50)]
    assert [(box.text, box.x0, box.x1) for box in lines[1].chars] == [("b", 4, 12)]
    for b, line in enumerate(lines):
        labels = charset.encode(line.text)
        totals = bf.labelling_log_probs(log_probs[:, b], charset.blank)
        assert line.log_prob == pytest.approx(totals[tuple(labels)], abs=1e-5)
        assert line.confidence == pytest.approx(math.exp(totals[tuple(labels)]), rel=1e-5)
        gamma, p = bf.posteriors(log_probs[:, b], labels, charset.blank), log_probs[:, b].exp()
        spans = [(0, 2), (3, 4), (4, 5)] if b == 0 else [(1, 3)]
        for i, (box, label) in enumerate(zip(line.chars, labels)):
            window = slice(spans[i - 1][1] if i else 0, spans[i + 1][0] if i + 1 < len(spans) else 6)
            expected = (gamma[window, label] * p[window, label]).sum() / gamma[window, label].sum()
            assert box.confidence == pytest.approx(expected.item(), rel=1e-5)
            assert 0.5 < box.confidence < 0.85


def test_empty_lines_have_no_characters():
    module = FixedModule(frame_log_probs([[0, 0, 0], [0, 0, 0]]), Charset("ab "))
    lines = recognize_with_positions(module, [torch.zeros(1, 32, 12)] * 2, [12, 30])
    assert [(line.text, line.chars) for line in lines] == [("", []), ("", [])]


def test_words_span_their_characters_with_the_product_of_their_confidences():
    chars = [Box("a", 0, 4, 0.5), Box("b", 4, 8, 0.8), Box(" ", 8, 12, 0.9), Box("c", 12, 20, 0.7)]
    assert word_boxes(chars) == [Box("ab", 0, 8, pytest.approx(0.4)), Box("c", 12, 20, 0.7)]
    assert word_boxes([]) == []
