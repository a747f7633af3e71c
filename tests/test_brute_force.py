"""The enumeration reference itself, on cases small enough to work out by hand."""

import math

import pytest
import torch

import brute_force as bf

# T = 2, C = 2, blank 0: P(class 1) is 0.6 at frame 0 and 0.3 at frame 1.
PROBS = torch.tensor([[0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
# Alignments of target [1]: (0,1): 0.4*0.3 = 0.12, (1,0): 0.6*0.7 = 0.42, (1,1): 0.6*0.3 = 0.18; total 0.72.
PATH_PROBS = {(0, 1): 0.12, (1, 0): 0.42, (1, 1): 0.18}


def test_collapse():
    assert bf.collapse([0, 1, 1, 0, 1, 2, 2, 0], blank=0) == [1, 1, 2]
    assert bf.collapse([2, 2, 0, 2], blank=2) == [0]
    assert bf.collapse([], blank=0) == []


def test_alignments_by_hand():
    assert set(bf.alignments(2, 2, [1], blank=0)) == set(PATH_PROBS)
    assert bf.alignments(3, 2, [1, 1], blank=0) == [(1, 0, 1)]
    assert bf.alignments(2, 2, [1, 1], blank=0) == []
    assert bf.alignments(2, 3, [], blank=0) == [(0, 0)]
    assert bf.alignments(0, 3, [], blank=0) == [()]


def test_ctc_nll_by_hand():
    assert bf.ctc_nll(PROBS.log(), [1], blank=0) == pytest.approx(-math.log(0.72))
    assert bf.ctc_nll(PROBS.log(), [1, 1], blank=0) == math.inf
    assert bf.ctc_nll(PROBS.log(), [], blank=0) == pytest.approx(-math.log(0.4 * 0.7))
    assert bf.ctc_nll(torch.zeros(0, 3), [], blank=0) == 0.0


def test_posteriors_by_hand():
    expected = torch.tensor([[0.12, 0.42 + 0.18], [0.42, 0.12 + 0.18]], dtype=torch.float64) / 0.72
    torch.testing.assert_close(bf.posteriors(PROBS.log(), [1], blank=0), expected)
    torch.testing.assert_close(bf.posteriors(PROBS.log(), [1, 1], blank=0), torch.zeros(2, 2, dtype=torch.float64))


def test_path_entropy_by_hand():
    probs = [p / 0.72 for p in PATH_PROBS.values()]
    assert bf.path_entropy(PROBS.log(), [1], blank=0) == pytest.approx(-sum(p * math.log(p) for p in probs))
    assert bf.path_entropy(PROBS.log(), [], blank=0) == 0.0
    assert bf.path_entropy(PROBS.log(), [1, 1], blank=0) == 0.0


def test_state_sequence():
    assert bf.state_sequence([0, 1, 1, 0, 1, 2], blank=0) == [0, 1, 1, 2, 3, 5]
    assert bf.state_sequence([1, 0, 0], blank=0) == [1, 2, 2]


def test_viterbi_by_hand():
    path, score = bf.viterbi(PROBS.log(), [1], blank=0)
    assert path == [1, 0] and score == pytest.approx(math.log(0.42))
    assert bf.viterbi(PROBS.log(), [1, 1], blank=0) == ([0, 0], -math.inf)


def test_viterbi_tie_rule():
    # All paths score 0: the reversed state sequence decides. T=2: (1,0) -> states (2,1) reversed beats (1,1), (1,0).
    assert bf.viterbi(torch.zeros(2, 2), [1], blank=0) == ([1, 0], 0.0)
    # T=3: end on the blank, then stay there as long as possible: (1,0,0).
    assert bf.viterbi(torch.zeros(3, 2), [1], blank=0) == ([1, 0, 0], 0.0)
    # The label scores 1 at the last frame: (0,0,1), (0,1,1), (1,1,1) tie at 1; largest reversed states (1,1,1).
    log_probs = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert bf.viterbi(log_probs, [1], blank=0) == ([1, 1, 1], 1.0)


def test_differentiable_nll_entropy_by_hand():
    log_probs = PROBS.log().requires_grad_()
    nll, entropy = bf.differentiable_nll_entropy(log_probs, [1], blank=0)
    assert nll.item() == pytest.approx(-math.log(0.72))
    assert entropy.item() == pytest.approx(bf.path_entropy(PROBS.log(), [1], blank=0))
    # d nll / d log_probs[t, c] = -P(path_t = c | target), the posteriors
    (grad,) = torch.autograd.grad(nll, log_probs)
    torch.testing.assert_close(grad, -bf.posteriors(PROBS.log(), [1], blank=0))
    nll, entropy = bf.differentiable_nll_entropy(PROBS.log(), [1, 1], blank=0)
    assert nll.item() == math.inf and entropy.item() == 0.0


def test_fewest_frames_is_the_shortest_alignment():
    assert bf.fewest_frames([], blank=0) == 0
    assert bf.fewest_frames([1, 1, 2, 2, 2, 1], blank=0) == 9
    assert bf.fewest_frames([0, 0], blank=2) == 3
    for target in ([1], [1, 2], [1, 1], [2, 1, 1], [1, 1, 1]):
        shortest = bf.fewest_frames(target, blank=0)
        assert bf.alignments(shortest, 3, target, blank=0) and not bf.alignments(shortest - 1, 3, target, blank=0)


@pytest.mark.parametrize("blank", [0, 2])
def test_labelling_log_probs_partition_all_paths_and_agree_with_the_nll(blank):
    log_probs = torch.randn(4, 3, generator=torch.Generator().manual_seed(blank), dtype=torch.float64).log_softmax(-1)
    totals = bf.labelling_log_probs(log_probs, blank)
    assert math.fsum(math.exp(v) for v in totals.values()) == pytest.approx(1.0, abs=1e-12)
    for labelling, log_prob in totals.items():
        assert log_prob == pytest.approx(-bf.ctc_nll(log_probs, labelling, blank), abs=1e-12)


def test_best_path_is_the_per_frame_argmax():
    log_probs = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    path, score = bf.best_path(log_probs)
    assert list(path) == log_probs.argmax(1).tolist()
    assert score == pytest.approx(log_probs.amax(1).sum().item(), abs=1e-12)
