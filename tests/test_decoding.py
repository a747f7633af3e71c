"""Greedy and prefix-beam CTC decoding against hand-worked cases and brute-force enumeration."""

import argparse
import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import brute_force as bf
from crnn import decoding
from crnn.decoding import BeamSearchDecoder, Decoded, Fusion, GreedyDecoder, beam_search, greedy_decode
from crnn.lexicon import Lexicon
from crnn.lm import witten_bell
from crnn.module import CRNNModule
from data import Charset
from host_sync import value_reads


@pytest.fixture(autouse=True, params=["tensor", "numba"])
def backend(request, monkeypatch):
    """Every test here runs on both backends of the beam search, the batched tensor search and the compiled
    search one line at a time: within a test, ``beam_search`` is the backend's."""
    monkeypatch.setitem(globals(), "beam_search", functools.partial(decoding.beam_search, backend=request.param))
    return request.param


def logaddexp(a, b):
    """log(exp(a) + exp(b)) for Python floats, -inf included."""
    high = max(a, b)
    return high if high == -math.inf else high + math.log(math.exp(a - high) + math.exp(b - high))


def reference_beam_search(log_probs, length, beam_width, blank):
    """Textbook dict-based prefix beam search on ``(T, C)`` log-probs: (labelling, log-prob)."""
    rows = log_probs.tolist()
    beams = {(): (0.0, -math.inf)}  # prefix -> (log p ends in blank, log p ends in last label)
    for row in rows[:length]:
        following = {}
        for prefix, (p_blank, p_label) in beams.items():
            total = logaddexp(p_blank, p_label)
            for c, log_prob in enumerate(row):
                if c == blank:
                    key, add_blank, add_label = prefix, total + log_prob, -math.inf
                elif prefix and c == prefix[-1]:
                    b, n = following.get(prefix, (-math.inf, -math.inf))
                    following[prefix] = (b, logaddexp(n, p_label + log_prob))
                    key, add_blank, add_label = prefix + (c,), -math.inf, p_blank + log_prob
                else:
                    key, add_blank, add_label = prefix + (c,), -math.inf, total + log_prob
                b, n = following.get(key, (-math.inf, -math.inf))
                following[key] = (logaddexp(b, add_blank), logaddexp(n, add_label))
        ranked = sorted(following.items(), key=lambda item: -logaddexp(*item[1]))
        beams = dict(ranked[:beam_width])
    best, (p_blank, p_label) = max(beams.items(), key=lambda item: logaddexp(*item[1]))
    return list(best), logaddexp(p_blank, p_label)


def peaky(labels_per_frame, num_classes, dtype=torch.float32):
    """``(T, 1, C)`` log-probs putting ~0.9 on the given class of each frame."""
    probs = torch.full((len(labels_per_frame), 1, num_classes), 0.1 / (num_classes - 1), dtype=dtype)
    probs[torch.arange(len(labels_per_frame)), 0, labels_per_frame] = 0.9
    return probs.log()


def random_log_probs(shape, seed, scale=2.0, dtype=torch.float64):
    """``shape`` = ``(T, B, C)`` log_softmax of seeded normal logits times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=dtype) * scale).log_softmax(-1)


# ---------------------------------------------------------------- greedy


def test_greedy_collapses_repeats_and_drops_blanks():
    log_probs = peaky([1, 1, 0, 1, 2, 2, 0, 0, 3], num_classes=4)
    assert greedy_decode(log_probs, torch.tensor([9])).labels == [[1, 1, 2, 3]]


def test_greedy_respects_lengths_and_blank_index():
    log_probs = torch.cat([peaky([2, 1, 1, 0, 2], 3), peaky([0, 0, 1, 2, 2], 3)], dim=1)
    assert greedy_decode(log_probs, torch.tensor([3, 5]), blank=2).labels == [[1], [0, 1]]
    assert greedy_decode(log_probs, torch.tensor([0, 2]), blank=2).labels == [[], [0]]


@pytest.mark.parametrize("blank", [0, 3])
def test_greedy_matches_per_frame_argmax(blank):
    log_probs = random_log_probs((12, 6, 5), seed=1)
    lengths = torch.tensor([12, 0, 1, 7, 12, 3])
    expected = [bf.collapse(log_probs[:n, b].argmax(-1).tolist(), blank) for b, n in enumerate(lengths.tolist())]
    assert greedy_decode(log_probs, lengths, blank=blank).labels == expected


@pytest.mark.parametrize("blank", [0, 2])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_score_is_the_best_paths_log_prob(blank, seed):
    """The score is the largest path log-prob of all ``C**T`` paths (brute force), which collapses to the labels."""
    log_probs = random_log_probs((4, 3, 3), seed=seed)
    lengths = torch.tensor([4, 2, 0])
    labellings, scores = greedy_decode(log_probs, lengths, blank=blank)
    assert scores.dtype == torch.float64 and scores.shape == (3,)
    for b, length in enumerate(lengths.tolist()):
        path, score = bf.best_path(log_probs[:length, b])
        assert scores[b].item() == pytest.approx(score, abs=1e-12)
        assert labellings[b] == bf.collapse(path, blank)


def test_greedy_score_of_half_input_is_float32():
    log_probs = random_log_probs((5, 2, 4), seed=0, dtype=torch.float32)
    _, scores = greedy_decode(log_probs.half(), torch.tensor([5, 3]))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, log_probs.half().float().amax(-1).masked_fill(
        torch.arange(5)[:, None] >= torch.tensor([5, 3]), 0.0).sum(0))


# ---------------------------------------------------------------- beam search


@pytest.mark.parametrize("blank", [0, 1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_full_beam_finds_most_probable_labelling_with_exact_score(blank, seed):
    num_frames, num_classes = 5, 4
    log_probs = random_log_probs((num_frames, 3, num_classes), seed=seed)
    lengths = torch.tensor([5, 4, 2])
    everything = sum((num_classes - 1) ** n for n in range(num_frames + 1))  # all prefixes up to T
    labellings, scores = beam_search(log_probs, lengths, beam_width=everything, blank=blank)
    for b, length in enumerate(lengths.tolist()):
        totals = bf.labelling_log_probs(log_probs[:length, b], blank)
        best = max(totals, key=totals.get)
        assert labellings[b] == list(best)
        assert scores[b].item() == pytest.approx(totals[best], abs=1e-9)


@pytest.mark.parametrize(("beam_width", "blank"), [(1, 0), (3, 2), (8, 4)])
def test_narrow_beam_matches_textbook_prefix_beam_search(beam_width, blank):
    log_probs = random_log_probs((12, 6, 5), seed=beam_width, scale=1.5)
    lengths = torch.tensor([12, 11, 9, 5, 1, 0])
    labellings, scores = beam_search(log_probs, lengths, beam_width=beam_width, blank=blank)
    for b, length in enumerate(lengths.tolist()):
        labelling, score = reference_beam_search(log_probs[:, b], length, beam_width, blank)
        assert labellings[b] == labelling
        assert scores[b].item() == pytest.approx(score, abs=1e-9)


def test_repeated_label_needs_a_blank_in_between():
    log_probs = torch.cat([peaky([1, 0, 1], 3), peaky([1, 1, 1], 3)], dim=1)
    labellings, _ = beam_search(log_probs, torch.tensor([3, 3]), beam_width=4)
    assert labellings == [[1, 1], [1]]


def test_score_sums_paths_of_a_known_case():
    # T=2, C=2 (blank 0, "a" 1): "a" has paths aa, a_, _a.
    probs = torch.tensor([[0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
    labellings, scores = beam_search(probs.log()[:, None], torch.tensor([2]), beam_width=3)
    assert labellings == [[1]]
    assert scores.exp().item() == pytest.approx(0.6 * 0.3 + 0.6 * 0.7 + 0.4 * 0.3)


def test_lines_decode_alike_alone_and_in_a_padded_batch():
    log_probs = random_log_probs((10, 5, 6), seed=7, scale=3.0)
    lengths = torch.tensor([10, 3, 0, 7, 1])
    batched, batched_scores = beam_search(log_probs, lengths, beam_width=5, blank=2)
    for b, length in enumerate(lengths.tolist()):
        line = log_probs[:length, b : b + 1]
        alone, alone_score = beam_search(line, torch.tensor([length]), beam_width=5, blank=2)
        assert batched[b] == alone[0]
        assert batched_scores[b].item() == pytest.approx(alone_score.item(), abs=1e-12)
    assert batched[2] == [] and batched_scores[2].item() == 0.0


@pytest.mark.parametrize("blank", [0, 1, 2])
@pytest.mark.parametrize("beam_width", [2, 3, 9])
def test_ties_break_towards_the_lower_class(blank, beam_width):
    """Uniform T = 2, C = 3: both one-label labellings have 3/9 (paths cc, c_, _c), the best there is; the
    documented rule (lower (slot, class) index first) picks the lower of the two non-blank classes."""
    uniform = torch.full((2, 2, 3), 1 / 3, dtype=torch.float64).log()
    labellings, scores = beam_search(uniform, torch.tensor([2, 2]), beam_width=beam_width, blank=blank)
    winner = min(c for c in range(3) if c != blank)
    assert labellings == [[winner], [winner]]
    if beam_width >= 3:  # all three one-frame prefixes kept: no path pruned, the score is exact
        torch.testing.assert_close(scores.exp(), torch.full((2,), 3 / 9, dtype=torch.float64))
    # swapping the two labels' log-probs changes nothing: the choice is by class index, not by input order
    other = max(c for c in range(3) if c != blank)
    swapped = uniform.clone()
    swapped[..., [winner, other]] = uniform[..., [other, winner]]
    assert beam_search(swapped, torch.tensor([2, 2]), beam_width=beam_width, blank=blank)[0] == [[winner], [winner]]


@pytest.mark.parametrize("blank", [0, 1, 2])
def test_pruning_ties_keep_the_lowest_class(blank):
    """One uniform frame, beam width 1: the three candidates (blank = empty prefix, class 0, ...) all have 1/3;
    the one kept is the lowest class index, i.e. the empty labelling exactly when the blank is class 0."""
    uniform = torch.full((1, 1, 3), 1 / 3).log()
    labellings, scores = beam_search(uniform, torch.tensor([1]), beam_width=1, blank=blank)
    assert labellings == [[] if blank == 0 else [0]]
    assert scores.exp().item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("beam_width", [0, -1])
def test_beam_width_below_one_is_rejected(beam_width):
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(random_log_probs((3, 1, 4), seed=0), torch.tensor([3]), beam_width=beam_width)


def test_survives_huge_negative_log_probs_and_half_precision():
    log_probs = random_log_probs((6, 4, 5), seed=3, dtype=torch.float32)
    log_probs[:, :, 2] = -1e30
    labellings, scores = beam_search(log_probs.half(), torch.tensor([6, 6, 2, 5]), beam_width=4)
    assert torch.isfinite(scores).all() and scores.dtype == torch.float32
    assert all(2 not in labelling for labelling in labellings)


def test_narrow_beam_agrees_with_greedy_on_peaky_input():
    log_probs = random_log_probs((32, 64, 11), seed=5, scale=5.0, dtype=torch.float32)
    lengths = torch.randint(1, 33, (64,), generator=torch.Generator().manual_seed(0))
    greedy = greedy_decode(log_probs, lengths).labels
    labellings, _ = beam_search(log_probs, lengths, beam_width=10)
    agreement = sum(g == b for g, b in zip(greedy, labellings)) / len(greedy)
    assert agreement > 0.8


def test_beam_scores_are_an_ordinary_tensor_outside_the_search():
    """The search runs in inference mode; its scores must still take in-place updates and autograd inputs."""
    log_probs = random_log_probs((6, 3, 5), seed=4, dtype=torch.float32).requires_grad_()
    _, scores = beam_search(log_probs, torch.tensor([6, 4, 5]), beam_width=3, token_min_logp=-3.0)
    assert not scores.is_inference() and not scores.requires_grad
    scores.mul_(2.0)
    (scores.detach() * log_probs[0, :, 0]).sum().backward()  # an inference tensor could not be saved for this


def test_empty_batch_and_zero_frames():
    assert beam_search(torch.zeros(3, 0, 4), torch.zeros(0, dtype=torch.int64))[0] == []
    labellings, scores = beam_search(torch.zeros(0, 2, 4), torch.zeros(2, dtype=torch.int64))
    assert labellings == [[], []] and scores.tolist() == [0.0, 0.0]
    labellings, scores = greedy_decode(torch.zeros(0, 2, 4), torch.zeros(2, dtype=torch.int64))
    assert labellings == [[], []] and scores.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("decode", [greedy_decode, functools.partial(beam_search, backend="tensor"),
                                    functools.partial(beam_search, token_min_logp=-1.0, backend="tensor")],
                         ids=["greedy", "beam", "beam pruned"])
def test_no_host_sync_per_time_step(decode):
    """Decoding reads tensor values back to Python (a host sync on CUDA) a fixed number of times, whatever T (the
    tensor search: the numba one runs on the host)."""

    def run(frames):
        decode(random_log_probs((frames, 3, 6), seed=frames), torch.tensor([frames, frames - 2, 1]))

    assert value_reads(lambda: run(8)) == value_reads(lambda: run(40))


# ---------------------------------------------------------------- pruning (token_min_logp)


def pruned(log_probs, threshold, blank):
    """``log_probs`` ``(T, B, C)`` with every non-blank class below ``threshold`` set to ``-inf``, unless it is its
    frame's most likely class: the rule :func:`beam_search` prunes by, written out frame by frame."""
    out = log_probs.clone()
    for t in range(log_probs.shape[0]):
        for b in range(log_probs.shape[1]):
            row = log_probs[t, b].tolist()
            top = row.index(max(row))
            for c, value in enumerate(row):
                if c != blank and c != top and value < threshold:
                    out[t, b, c] = -math.inf
    return out


def sparse_log_probs(shape, seed, blank, blank_only=0.4):
    """``(T, B, C)`` float64 log-values where every class is either above -30 or ``-inf``: per frame the blank and
    a random subset of the other classes, and with probability ``blank_only`` the blank alone with a log-value
    below 0 (not normalised: a frame that a pruned search skips, yet multiplies every path by its blank)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 - 1.0
    keep = torch.rand(shape, generator=generator) < 0.6
    keep[..., blank] = True
    keep &= ~((torch.rand(shape[:2], generator=generator) < blank_only)[..., None] & (torch.arange(shape[2]) != blank))
    return values.masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("seed", range(3))
def test_pruned_search_with_an_unbounded_beam_finds_the_exhaustive_argmax(blank, seed):
    """Where pruning cuts nothing (every class above the threshold or -inf), the pruned search, which also skips the
    blank-only frames and extends by the surviving classes only, still finds the most probable labelling of the
    exhaustive enumeration, with its exact log-probability (the skipped frames' blank log-values included)."""
    log_probs = sparse_log_probs((6, 4, 4), seed, blank)
    lengths = torch.tensor([6, 5, 2, 0])
    labellings, scores = beam_search(log_probs, lengths, unbounded(6, 4), blank=blank, token_min_logp=-30.0)
    for b, length in enumerate(lengths.tolist()):
        totals = bf.labelling_log_probs(log_probs[:length, b], blank)
        best = max(totals, key=totals.get)
        assert labellings[b] == list(best)
        assert scores[b].item() == pytest.approx(totals[best], abs=1e-9)


@pytest.mark.parametrize("blank", [0, 2])
def test_pruned_fused_search_with_an_unbounded_beam_finds_the_exhaustive_argmax(blank):
    charset = Charset("ab ", blank=blank)
    lexicon = Lexicon(["a", "ab", "ba", "b"], "word")
    fusion = Fusion.build(charset, witten_bell(TOY_CORPUS, order=3), 0.8, 0.4, lexicon)
    log_probs = sparse_log_probs((6, 5, 4), seed=blank, blank=blank)
    lengths = torch.tensor([6, 6, 4, 1, 0])
    labellings, scores = beam_search(log_probs, lengths, unbounded(6, 4), blank, fusion, token_min_logp=-30.0)
    for b, length in enumerate(lengths.tolist()):
        text, log_p = exhaustive_best(log_probs[:length, b], charset, witten_bell(TOY_CORPUS, order=3), 0.8, 0.4,
                                      allowed=lexicon.__contains__)
        assert charset.decode(labellings[b]) == text
        assert scores[b].item() == pytest.approx(log_p, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("beam_width", "blank", "threshold"),
                         [(1, 0, -1.0), (3, 2, -2.0), (6, 4, -3.0), (6, 0, -math.inf)])
def test_pruned_search_is_the_exact_search_on_the_pruned_log_probs(beam_width, blank, threshold, dtype):
    """Narrow beams on random (not peaky) log-probs: pruning changes the result only through the classes it cuts."""
    log_probs = random_log_probs((12, 7, 5), seed=beam_width, scale=2.0, dtype=dtype)
    lengths = torch.tensor([12, 11, 9, 5, 1, 0, 12])
    charset = Charset("abcd", blank=blank)
    lm_fusion = Fusion.build(charset, witten_bell(["ab cd", "dab", "a", "bad"], 3), 0.7, 0.3,
                             Lexicon(["ab", "cd", "dab", "a"]))
    for fusion in (None, lm_fusion):
        got = beam_search(log_probs, lengths, beam_width, blank, fusion, token_min_logp=threshold)
        expected = beam_search(pruned(log_probs, threshold, blank), lengths, beam_width, blank, fusion)
        assert got.labels == expected.labels
        torch.testing.assert_close(got.scores, expected.scores)


@pytest.mark.parametrize("seed", range(3))
def test_pruning_keeps_the_best_text_on_peaky_log_probs(seed):
    """On peaky log-probs (frames mostly a near-certain blank or label) pruning at pyctcdecode's -5 skips many
    frames and classes, and every line's text is still the unpruned search's."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, 64, 11, generator=generator) * 5.0
    logits[..., 0] += 15.0 * (torch.rand(32, 64, generator=generator) < 0.6)  # most frames: a near-certain blank
    log_probs = logits.log_softmax(-1)
    lengths = torch.randint(1, 33, (64,), generator=generator)
    assert (log_probs[..., 1:] < -5).all(-1).float().mean() > 0.3  # the pruning has frames to skip
    for beam_width in (4, 10):
        assert beam_search(log_probs, lengths, beam_width, token_min_logp=-5.0).labels == \
            beam_search(log_probs, lengths, beam_width).labels


def test_pruned_search_edge_cases():
    """No lines, no frames, only blank-only frames (the score: their blank log-probs summed), half precision."""
    assert beam_search(torch.zeros(3, 0, 4), torch.zeros(0, dtype=torch.int64), token_min_logp=-5.0)[0] == []
    labellings, scores = beam_search(torch.zeros(0, 2, 4), torch.zeros(2, dtype=torch.int64), token_min_logp=-5.0)
    assert labellings == [[], []] and scores.tolist() == [0.0, 0.0]
    blanks = torch.tensor([0.99, 0.005, 0.003, 0.002]).log().expand(5, 2, 4)
    labellings, scores = beam_search(blanks, torch.tensor([5, 2]), 3, token_min_logp=-5.0)
    assert labellings == [[], []]
    torch.testing.assert_close(scores, torch.tensor([5, 2]) * math.log(0.99))
    log_probs = random_log_probs((6, 4, 5), seed=3, dtype=torch.float32)
    labellings, scores = beam_search(log_probs.half(), torch.tensor([6, 6, 2, 5]), 4, token_min_logp=-2.0)
    assert scores.dtype == torch.float32
    assert labellings == beam_search(pruned(log_probs.half().float(), -2.0, 0), torch.tensor([6, 6, 2, 5]), 4).labels


# ---------------------------------------------------------------- fusion: LM, insertion bonus, lexicon, allow

TOY_CORPUS = ["ab a", "ba", "aab", "b ab", "a", "bb a b"]


def exhaustive_best(log_probs, charset, lm=None, lm_weight=0.0, bonus=0.0, allowed=lambda text: True):
    """The text maximising ``log P_ctc + lm_weight * log P_lm + bonus * |text|`` over every labelling of the
    ``(T, C)`` log-probs (brute force) that ``allowed`` accepts, with its ``log P_ctc``; ``("", -inf)`` if none."""
    candidates = []
    for labelling, log_p in bf.labelling_log_probs(log_probs, charset.blank).items():
        text = charset.decode(labelling)
        if allowed(text):
            fused = log_p + (lm_weight * lm.score(text) if lm is not None else 0.0) + bonus * len(text)
            candidates.append((fused, text, log_p))
    if not candidates:
        return "", -math.inf
    _, text, log_p = max(candidates)
    return text, log_p


def unbounded(num_frames, num_classes):
    return sum((num_classes - 1) ** n for n in range(num_frames + 1))


@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize(("lm_weight", "bonus"), [(0.0, 1.5), (1.0, 0.0), (2.0, 1.0), (0.7, -0.5)])
def test_lm_fusion_with_an_unbounded_beam_finds_the_exhaustive_argmax(blank, lm_weight, bonus):
    charset = Charset("ab ", blank=blank)
    lm = witten_bell(TOY_CORPUS, order=3)
    fusion = Fusion.build(charset, lm, lm_weight, bonus)
    log_probs = random_log_probs((6, 4, 4), seed=int(10 * lm_weight + bonus) + blank, scale=1.5)
    lengths = torch.tensor([6, 5, 3, 0])
    labellings, scores = beam_search(log_probs, lengths, unbounded(6, 4), blank=blank, fusion=fusion)
    for b, length in enumerate(lengths.tolist()):
        text, log_p = exhaustive_best(log_probs[:length, b], charset, lm, lm_weight, bonus)
        assert charset.decode(labellings[b]) == text
        assert scores[b].item() == pytest.approx(log_p, abs=1e-9)


def test_a_strong_lm_changes_the_decision():
    """The test above must be able to fail: a weighted LM picks another text than plain CTC on some lines."""
    charset = Charset("ab ")
    lm = witten_bell(TOY_CORPUS, order=3)
    log_probs = random_log_probs((6, 8, 4), seed=0, scale=1.5)
    plain = beam_search(log_probs, torch.full((8,), 6), 50).labels
    fused = beam_search(log_probs, torch.full((8,), 6), 50, fusion=Fusion.build(charset, lm, 2.0))
    assert plain != fused.labels


@pytest.mark.parametrize(("mode", "entries", "blank", "lm_weight"), [
    ("word", ["a", "ab", "ba"], 0, 0.0), ("word", ["a", "ab", "ba"], 2, 1.0), ("word", ["b"], 0, 1.0),
    ("line", ["ab a", "b", "aab", "bab"], 2, 0.0), ("line", ["ab a", "b", "aab", "bab"], 0, 1.0),
    ("line", ["aaaa"], 0, 1.0)])
def test_lexicon_output_is_the_best_lexicon_text(blank, mode, entries, lm_weight):
    charset = Charset("ab ", blank=blank)
    lexicon = Lexicon(entries, mode)
    lm = witten_bell(TOY_CORPUS, order=2)
    fusion = Fusion.build(charset, lm, lm_weight, 0.3, lexicon=lexicon)
    log_probs = random_log_probs((6, 5, 4), seed=blank + len(entries), scale=1.5)
    lengths = torch.tensor([6, 6, 4, 2, 0])
    labellings, scores = beam_search(log_probs, lengths, unbounded(6, 4), blank=blank, fusion=fusion)
    for b, length in enumerate(lengths.tolist()):
        text, log_p = exhaustive_best(log_probs[:length, b], charset, lm, lm_weight, 0.3, allowed=lexicon.__contains__)
        decoded = charset.decode(labellings[b])
        assert decoded == text
        assert decoded in lexicon or (decoded == "" and log_p == -math.inf)
        assert scores[b].item() == pytest.approx(log_p, abs=1e-9)


def test_lexicon_keeps_a_narrow_beam_on_lexicon_prefixes():
    """Width 1, the image says "ab" but the words are "a" and "b": the search must not spend its one slot on "ab"
    (no lexicon prefix, rejected only at the end); it keeps "a", which "a" + blank/repeat (0.06) beats "a "."""
    charset = Charset("ab ")
    fusion = Fusion.build(charset, lexicon=Lexicon(["a", "b"], "word"))
    labellings, scores = beam_search(peaky([1, 2], num_classes=4), torch.tensor([2]), 1, fusion=fusion)
    assert labellings == [[1]]
    assert scores.exp().item() == pytest.approx(0.9 * (0.1 / 3) * 2)


def test_word_lexicon_with_a_narrow_beam_can_end_empty_with_probability_0():
    """Word mode too: the image says "a" then blanks, the only word is "ab". Width 1 keeps "a" (inside the word,
    not an entry) over "ab" at every frame and ends on no entry: the empty labelling with -inf, although "ab" has
    a finite probability and a beam as wide as all prefixes returns the exhaustive best lexicon text."""
    charset = Charset("ab ")
    lexicon = Lexicon(["ab"], "word")
    fusion = Fusion.build(charset, lexicon=lexicon)
    log_probs = peaky([1, 0, 0], num_classes=4).double()
    labellings, scores = beam_search(log_probs, torch.tensor([3]), 1, fusion=fusion)
    assert labellings == [[]] and scores.item() == -math.inf
    text, log_p = exhaustive_best(log_probs[:, 0], charset, allowed=lexicon.__contains__)
    labellings, scores = beam_search(log_probs, torch.tensor([3]), unbounded(3, 4), fusion=fusion)
    assert text == "ab" and charset.decode(labellings[0]) == "ab"
    assert scores.item() == pytest.approx(log_p, abs=1e-9)


def test_word_lexicon_semantics():
    lexicon = Lexicon(["ab", "b a"], "word")  # an entry with a space adds its words
    assert lexicon.entries == ["a", "ab", "b"]
    assert "ab b a" in lexicon and "" in lexicon
    assert "ab  b" not in lexicon and " ab" not in lexicon and "ab " not in lexicon and "ba" not in lexicon
    assert "b a" in Lexicon(["b a"], "line") and "b" not in Lexicon(["b a"], "line")


def test_lexicon_entries_outside_the_charset_are_left_out_with_a_count():
    with pytest.warns(UserWarning, match="1 of 3 lexicon entries"):
        Fusion.build(Charset("ab "), lexicon=Lexicon(["ab", "b", "abc"], "word"))


@pytest.mark.parametrize("allow", ["a", "b ", ""])
def test_allow_masks_the_other_characters(allow):
    charset = Charset("ab ")
    fusion = Fusion.build(charset, allow=allow)
    log_probs = random_log_probs((5, 3, 4), seed=len(allow), scale=1.0)
    labellings, scores = beam_search(log_probs, torch.tensor([5, 4, 1]), unbounded(5, 4), fusion=fusion)
    for b, length in enumerate([5, 4, 1]):
        text, log_p = exhaustive_best(log_probs[:length, b], charset, allowed=lambda t: set(t) <= set(allow))
        assert charset.decode(labellings[b]) == text
        assert scores[b].item() == pytest.approx(log_p, abs=1e-9)
    with pytest.raises(ValueError, match="'9'"):
        Fusion.build(charset, allow="a9")


def test_fused_lines_decode_alike_alone_and_in_a_padded_batch():
    charset = Charset("ab ", blank=1)
    fusion = Fusion.build(charset, witten_bell(TOY_CORPUS, 4), 0.8, 0.5, Lexicon(["a", "ab", "bb"]))
    log_probs = random_log_probs((10, 5, 4), seed=7, scale=2.0)
    lengths = torch.tensor([10, 3, 0, 7, 1])
    batched, batched_scores = beam_search(log_probs, lengths, beam_width=5, blank=1, fusion=fusion)
    for b, length in enumerate(lengths.tolist()):
        alone, alone_score = beam_search(log_probs[:length, b : b + 1], torch.tensor([length]), 5, 1, fusion)
        assert batched[b] == alone[0]
        assert batched_scores[b].item() == pytest.approx(alone_score.item(), abs=1e-12)


def test_fusion_adds_no_host_sync_per_time_step():
    charset = Charset("abcde")
    fusion = Fusion.build(charset, witten_bell(["abc de", "cab"], 3), 0.5, 0.2, Lexicon(["abc", "de", "cab"]), "abcd")

    def run(frames):
        decoding.beam_search(random_log_probs((frames, 3, 6), seed=frames), torch.tensor([frames, frames - 2, 1]),
                             4, fusion=fusion, backend="tensor")

    assert value_reads(lambda: run(8)) == value_reads(lambda: run(40))


def test_beam_lm_config_builds_a_fused_decoder_that_a_module_binds(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    witten_bell(TOY_CORPUS, 3).write_arpa(tmp_path / "lm.arpa")
    (tmp_path / "words.txt").write_text("0\n1\n10\n", encoding="utf-8")
    config = OmegaConf.load("conf/decoder/beam_lm.yaml")
    config.lm_path, config.lexicon_path, config.allow = str(tmp_path / "lm.arpa"), str(tmp_path / "words.txt"), "01"
    model = {"_target_": "crnn.model.CRNN", "channels": [4, 4, 4, 4, 4], "rnn_hidden": 8, "dropout": 0.0}
    module = CRNNModule(charset="0123456789", model=model, decoder=instantiate(config))
    assert module.decoder.fusion is not None
    log_probs = torch.cat([peaky([2, 0, 1, 0, 3], 11), peaky([2, 2, 1, 1, 0], 11)], dim=1)  # "102", "10"
    assert module.decode(log_probs, torch.tensor([5, 5])) == ["10", "10"]
    with pytest.raises(TypeError, match="quote"):
        BeamSearchDecoder(allow=123)


def test_beam_configs_prune_at_minus_5_and_null_is_the_exact_search():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for name in ("beam", "beam_lm"):
        config = OmegaConf.load(f"conf/decoder/{name}.yaml")
        assert instantiate(config).token_min_logp == -5.0
        config.token_min_logp = None
        assert instantiate(config).token_min_logp is None
    with pytest.raises(ValueError, match="token_min_logp"):
        BeamSearchDecoder(token_min_logp=1.0)


def test_token_min_logp_command_line_option():
    from scripts.options import add_recognition_arguments, decoder_from_args

    parser = argparse.ArgumentParser()
    add_recognition_arguments(parser, batch_size=8)
    assert parser.parse_args([]).token_min_logp == -5.0
    assert parser.parse_args(["--token-min-logp=-inf"]).token_min_logp == -math.inf
    args = parser.parse_args(["--decoder", "beam", "--token-min-logp", "none"])
    assert decoder_from_args(args, Charset("ab")).token_min_logp is None
    args = parser.parse_args(["--decoder", "beam", "--token-min-logp", "-8"])
    assert decoder_from_args(args, Charset("ab")).token_min_logp == -8.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--token-min-logp", "0.5"])


def test_fused_decoder_needs_a_charset(tmp_path):
    witten_bell(TOY_CORPUS, 2).write_arpa(tmp_path / "lm.arpa")
    decoder = BeamSearchDecoder(4, lm_path=str(tmp_path / "lm.arpa"))
    with pytest.raises(RuntimeError, match="charset"):
        decoder(random_log_probs((3, 1, 4), seed=0), torch.tensor([3]))
    decoded = decoder.bind(Charset("ab "))(random_log_probs((3, 1, 4), seed=0), torch.tensor([3]))
    assert len(decoded.labels) == 1


def test_same_best_text_as_flashlight_with_the_same_char_lm(tmp_path):
    """flashlight-text's lexicon-free CTC decoder (torchaudio's ``ctc_decoder`` without a lexicon) with the same
    ARPA file through its KenLM wrapper, prefixes merged by log-add and nothing pruned (threshold 1e9, every
    token), ranks by the same ``log P_ctc + w * ln P_lm(text </s>)`` (its ``lm_weight`` is ``w ln 10``: KenLM
    scores are log10). On peaky random log-probs (40 lines, T = 7, width 16) the best texts agree on most lines;
    where they differ, ours is the exhaustive argmax of that score and theirs scores lower."""
    text_decoder = pytest.importorskip("flashlight.lib.text.decoder")
    dictionary = pytest.importorskip("flashlight.lib.text.dictionary")
    charset, weight = Charset("ab "), 0.7
    lm = witten_bell(TOY_CORPUS, order=3)
    lm.write_arpa(tmp_path / "lm.arpa")
    ours = BeamSearchDecoder(16, lm_path=str(tmp_path / "lm.arpa"), lm_weight=weight, charset=charset,
                             token_min_logp=None)
    their_lm = text_decoder.KenLM(str(tmp_path / "lm.arpa"), dictionary.Dictionary(["<blank>", "a", "b", "<space>"]))
    options = text_decoder.LexiconFreeDecoderOptions(
        beam_size=16, beam_size_token=4, beam_threshold=1e9, lm_weight=weight * math.log(10), sil_score=0.0,
        log_add=True, criterion_type=text_decoder.CriterionType.CTC)
    theirs = text_decoder.LexiconFreeDecoder(options, their_lm, 0, 0, [])
    generator = torch.Generator().manual_seed(0)
    num_frames, lines = 7, 40
    peaks = torch.randint(0, 4, (num_frames, lines), generator=generator)
    logits = torch.randn(num_frames, lines, 4, generator=generator)
    logits.scatter_add_(2, peaks[..., None], torch.full((num_frames, lines, 1), 4.0))
    log_probs = logits.log_softmax(-1)
    labels = ours(log_probs, torch.full((lines,), num_frames)).labels
    same = 0
    for b in range(lines):
        line = log_probs[:, b].contiguous()
        tokens = theirs.decode(line.data_ptr(), num_frames, 4)[0].tokens
        text, their_text = charset.decode(labels[b]), charset.decode([k for k, _ in itertools.groupby(tokens) if k])
        if text == their_text:
            same += 1
            continue
        best, _ = exhaustive_best(line.double(), charset, lm, weight)
        fused = {t: p + weight * lm.score(t) for t, p in
                 ((charset.decode(k), p) for k, p in bf.labelling_log_probs(line.double(), 0).items())}
        assert text == best and fused[text] > fused[their_text]
    assert same >= 30


# ---------------------------------------------------------------- decoder objects


@pytest.mark.parametrize("decoder", [GreedyDecoder(), BeamSearchDecoder(beam_width=3),
                                     BeamSearchDecoder(beam_width=3, token_min_logp=None)], ids=repr)
def test_decoder_objects_return_the_functions_labels_and_scores(decoder):
    log_probs = random_log_probs((9, 4, 5), seed=2)
    lengths = torch.tensor([9, 5, 1, 0])
    decoded = decoder(log_probs, lengths, blank=1)
    if isinstance(decoder, GreedyDecoder):
        expected = greedy_decode(log_probs, lengths, blank=1)
    else:
        expected = beam_search(log_probs, lengths, beam_width=3, blank=1, token_min_logp=decoder.token_min_logp)
    assert isinstance(decoded, Decoded) and decoded.labels == expected.labels
    torch.testing.assert_close(decoded.scores, expected.scores)


def test_beam_decoder_rejects_a_width_below_one_when_built():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchDecoder(beam_width=0)


# ---------------------------------------------------------------- through the LightningModule


@pytest.mark.parametrize("decoder", [None, BeamSearchDecoder(beam_width=4)], ids=["default", "beam"])
def test_module_with_blank_last_decodes_and_computes_its_loss_with_that_blank(decoder):
    """Digits with blank 10: ids 0..9 are the characters '0'..'9', class 10 is dropped."""
    model = {"_target_": "crnn.model.CRNN", "channels": [4, 4, 4, 4, 4], "rnn_hidden": 8, "dropout": 0.0}
    module = CRNNModule(charset="0123456789", model=model, blank=10, decoder=decoder)
    assert module.charset.blank == module.loss.blank == 10
    blank_everywhere = peaky([10] * 6, num_classes=11).expand(6, 2, 11)
    assert module.decode(blank_everywhere, torch.tensor([6, 2])) == ["", ""]
    log_probs = torch.cat([peaky([0, 10, 0, 9, 9, 10], 11), peaky([1, 10, 10, 10, 10, 10], 11)], dim=1)
    assert module.decode(log_probs, torch.tensor([6, 4])) == ["009", "1"]
    # the default loss is CTC with that blank (and zero_infinity): targets may use class 0
    targets, lengths = torch.tensor([[0, 0, 9], [1, 0, 0]]), torch.tensor([6, 4])
    batch = {"targets": targets, "target_lengths": torch.tensor([3, 1])}
    expected = F.ctc_loss(log_probs, targets, lengths, batch["target_lengths"], blank=10, zero_infinity=True)
    torch.testing.assert_close(module.compute_loss(log_probs, lengths, batch), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    log_probs = random_log_probs((20, 16, 7), seed=11, scale=3.0)
    lengths = torch.randint(0, 21, (16,), generator=torch.Generator().manual_seed(1))
    cpu = beam_search(log_probs, lengths, beam_width=8, blank=3)
    cuda = beam_search(log_probs.cuda(), lengths.cuda(), beam_width=8, blank=3)
    assert cuda[0] == cpu[0]
    torch.testing.assert_close(cuda[1].cpu(), cpu[1])
    greedy_cpu, greedy_cuda = greedy_decode(log_probs, lengths), greedy_decode(log_probs.cuda(), lengths.cuda())
    assert greedy_cuda.labels == greedy_cpu.labels
    torch.testing.assert_close(greedy_cuda.scores.cpu(), greedy_cpu.scores)
