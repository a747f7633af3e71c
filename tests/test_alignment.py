"""Forced alignment, token spans and γ targets against the enumeration reference in ``brute_force``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import brute_force as bf
from conftest import random_batch
from host_sync import value_reads
from losses import TokenSpan, required_frames
from losses.alignment import ctc_alignment_targets, forced_align, path_to_spans


def tiny_batch(seed, blank_last=False, integer=False, **kwargs):
    """T 1..6, C 2..4, B 1..3, 0..3 labels, input lengths 0..T, junk in the target padding; ``integer``
    log-probs in {-2, -1, 0} make path scores exact and ties common."""
    return random_batch(seed, frames=(1, 6), blank_last=blank_last, integer=integer, scale=1.0, **kwargs)


def assert_matches_viterbi(batch, log_probs=None, concatenated=False, exact_path=True):
    """forced_align agrees with brute-force Viterbi: path (if ``exact_path``), per-frame and total scores."""
    log_probs, *args = batch.args(log_probs, concatenated)
    paths, scores = forced_align(log_probs, *args, batch.blank)
    assert paths.shape == scores.shape == (log_probs.shape[1], log_probs.shape[0]) and paths.dtype == torch.long
    assert not scores.isnan().any()
    for b, target in enumerate(batch.labels):
        n = batch.input_lengths[b]
        best_path, best_score = bf.viterbi(batch.sample(b, log_probs), target, batch.blank)
        path = paths[b, :n]
        is_feasible = bf.collapse(best_path, batch.blank) == target
        assert bf.collapse(path.tolist(), batch.blank) == (target if is_feasible else [])
        if exact_path:
            assert path.tolist() == best_path
        assert (paths[b, n:] == batch.blank).all() and (scores[b, n:] == 0).all()
        frame_scores = log_probs[:n, b].gather(1, path[:, None]).squeeze(1).to(scores.dtype)
        expected = frame_scores if is_feasible else torch.full_like(frame_scores, -math.inf)
        torch.testing.assert_close(scores[b, :n], expected, rtol=0, atol=0)
        if n or is_feasible:  # an infeasible sample without frames has no scores to sum
            assert math.isclose(scores[b, :n].double().sum().item(), best_score, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("blank_last", [False, True])
@pytest.mark.parametrize("concatenated", [False, True])
def test_forced_align_matches_brute_force(blank_last, concatenated):
    for seed in range(25):
        assert_matches_viterbi(tiny_batch(1000 + 100 * blank_last + seed, blank_last), concatenated=concatenated)


@pytest.mark.parametrize("blank_last", [False, True])
def test_forced_align_tie_rule_on_exact_ties(blank_last):
    """Integer log-probs make many alignments score exactly the same; the documented rule picks one."""
    for seed in range(40):
        assert_matches_viterbi(tiny_batch(2000 + 100 * blank_last + seed, blank_last, integer=True))


def test_tie_rule_by_hand():
    zeros = torch.zeros(3, 1, 2, dtype=torch.float64)
    # Every alignment of [1] in 3 frames scores 0: end on the blank, as far along as possible -> (1, 0, 0).
    assert forced_align(zeros, torch.tensor([[1]]), [3], [1])[0].tolist() == [[1, 0, 0]]
    # Final label and final blank tie at the last frame (both score 0): the blank wins.
    log_probs = torch.tensor([[[-1.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)
    assert forced_align(log_probs, torch.tensor([[1]]), [2], [1])[0].tolist() == [[1, 0]]
    # [1, 2] in 3 frames, the last frame forced onto label 2: (1,2,2), (1,0,2), (1,1,2), (0,1,2) all score 0.
    # Reversed state sequences (3,3,1) > (3,2,1) > (3,1,1) > (3,1,0): label 2 starts as early as possible.
    log_probs = torch.zeros(3, 1, 3, dtype=torch.float64)
    log_probs[2, 0, 0] = -5.0
    assert forced_align(log_probs, torch.tensor([[1, 2]]), [3], [2])[0].tolist() == [[1, 2, 2]]
    # Forbid label 2 at frame 1 as well: the blank in between (previous state) beats skipping from 1 to 2.
    log_probs[1, 0, 2] = -5.0
    assert forced_align(log_probs, torch.tensor([[1, 2]]), [3], [2])[0].tolist() == [[1, 0, 2]]

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fill", [-math.inf, -1e30])
def test_forced_align_survives_extreme_log_probs(dtype, fill):
    for seed in range(20):
        batch = tiny_batch(3000 + seed)
        mask = torch.rand(batch.logits.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
        assert_matches_viterbi(batch, batch.log_probs.masked_fill(mask, fill).to(dtype), exact_path=False)


def test_forced_align_all_minus_inf_gives_a_valid_alignment():
    log_probs = torch.full((4, 1, 3), -math.inf)
    paths, scores = forced_align(log_probs, torch.tensor([[1, 1]]), [4], [2])
    assert bf.collapse(paths[0].tolist(), 0) == [1, 1]
    assert (scores == -math.inf).all()


def test_forced_align_infeasible_and_empty():
    log_probs = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(31)).log_softmax(-1)
    # [1, 1] needs 3 frames; 2 given. Empty target with 0 frames; label with 0 frames; empty target, 3 frames.
    targets = torch.tensor([[1, 1], [0, 0], [2, 0], [0, 0]])
    paths, scores = forced_align(log_probs, targets, [2, 0, 0, 3], [2, 0, 1, 0])
    assert (paths == 0).all()
    assert scores[0, :2].eq(-math.inf).all() and scores[0, 2] == 0
    assert (scores[1:3] == 0).all()
    torch.testing.assert_close(scores[3], log_probs[:, 3, 0])
    paths, scores = forced_align(torch.zeros(0, 2, 3), torch.zeros(2, 0, dtype=torch.long), [0, 0], [0, 0])
    assert paths.shape == scores.shape == (2, 0)
    no_lengths = torch.zeros(0, dtype=torch.long)
    paths, scores = forced_align(torch.zeros(5, 0, 3), torch.zeros(0, 0, dtype=torch.long), no_lengths, no_lengths)
    assert paths.shape == scores.shape == (0, 5)


def test_forced_align_half_precision_and_no_grad_leak():
    log_probs = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(32)).log_softmax(-1).requires_grad_()
    paths, scores = forced_align(log_probs.half(), torch.tensor([[1, 2], [3, 0]]), [5, 4], [2, 1])
    assert scores.dtype == torch.float32 and not scores.requires_grad
    assert bf.collapse(paths[1, :4].tolist(), 0) == [3]


@pytest.mark.parametrize(
    "log_probs, targets, input_lengths, target_lengths, blank",
    [
        (torch.zeros(3, 1, 3), torch.tensor([[0]]), [3], [1], 0),  # blank inside the target
        (torch.zeros(3, 1, 3), torch.tensor([[3]]), [3], [1], 0),  # label id >= C
        (torch.zeros(3, 1, 3), torch.tensor([[1]]), [4], [1], 0),  # input length > T
        (torch.zeros(3, 1, 3), torch.tensor([[1]]), [3], [2], 0),  # target length > S
        (torch.zeros(3, 1, 3), torch.tensor([[1]]), [-1], [1], 0),  # negative length
        (torch.zeros(3, 1, 3), torch.tensor([1, 2]), [3], [1], 0),  # concatenated size mismatch
        (torch.zeros(3, 3), torch.tensor([[1]]), [3], [1], 0),  # log_probs not 3-D
        (torch.zeros(3, 1, 3), torch.tensor([[1]]), [3], [1], 3),  # blank outside [0, C)
        (torch.zeros(3, 1, 3), torch.tensor([[1.0]]), [3], [1], 0),  # float targets
    ],
)
@pytest.mark.parametrize("function", [forced_align, ctc_alignment_targets])
def test_bad_arguments_raise(function, log_probs, targets, input_lengths, target_lengths, blank):
    with pytest.raises(ValueError):
        function(log_probs, targets, input_lengths, target_lengths, blank)


def test_path_to_spans():
    assert path_to_spans([0, 3, 3, 0, 3, 5]) == [TokenSpan(3, 1, 3, None), TokenSpan(3, 4, 5, None),
                                                 TokenSpan(5, 5, 6, None)]
    assert path_to_spans(torch.tensor([1, 1, 2, 2, 2, 1])) == [(1, 0, 2, None), (2, 2, 5, None), (1, 5, 6, None)]
    assert path_to_spans([2, 0, 0, 2], blank=2) == [(0, 1, 3, None)]
    assert path_to_spans([0, 0]) == [] and path_to_spans([]) == []
    # scores: each span's score is the sum of its frames' scores; blank frames belong to no span
    spans = path_to_spans([0, 3, 3, 0, 3, 5], scores=[-8.0, -0.5, -0.25, -4.0, -1.0, -2.0])
    assert spans == [TokenSpan(3, 1, 3, -0.75), TokenSpan(3, 4, 5, -1.0), TokenSpan(5, 5, 6, -2.0)]
    assert path_to_spans(torch.tensor([1, 1]), scores=torch.tensor([-1.5, -0.25]))[0].score == -1.75
    with pytest.raises(ValueError, match="scores"):
        path_to_spans([0, 1], scores=[0.0])


def test_spans_of_forced_alignments_add_up_to_the_path_score():
    for seed in range(10):
        batch = tiny_batch(6000 + seed, blank_last=True, integer=True)
        paths, scores = forced_align(*batch.args(), batch.blank)
        for b, target in enumerate(batch.labels):
            n = batch.input_lengths[b]
            if bf.fewest_frames(target, batch.blank) > n:
                continue
            spans = path_to_spans(paths[b, :n], batch.blank, scores=scores[b, :n])
            assert [span.token for span in spans] == target
            assert all(span.end > span.start for span in spans)
            blank_frames = paths[b, :n] == batch.blank
            total = sum(span.score for span in spans) + scores[b, :n][blank_frames].sum().item()
            assert total == scores[b, :n].sum().item()  # integer log-probs: exact


@pytest.mark.parametrize("blank_last", [False, True])
def test_required_frames_matches_brute_force(blank_last):
    """Fewest frames an alignment needs, for padded targets with junk past each length."""
    for seed in range(20):
        batch = tiny_batch(7000 + seed, blank_last, max_label_len=6)
        needed = required_frames(batch.padded(), torch.tensor(batch.target_lengths))
        assert needed.dtype == torch.long
        assert needed.tolist() == [bf.fewest_frames(target, batch.blank) for target in batch.labels]
    # any integer ids, e.g. code points, and lengths as a list; junk past the length is ignored
    words = ["hello", "aa", "", "abba"]
    padded = torch.tensor([[ord(c) for c in word.ljust(5, "a")] for word in words])
    needed = required_frames(padded, [len(word) for word in words])
    assert needed.tolist() == [bf.fewest_frames([ord(c) for c in word], blank=0) for word in words] == [6, 3, 0, 5]


@pytest.mark.parametrize("blank_last", [False, True])
@pytest.mark.parametrize("concatenated", [False, True])
def test_alignment_targets_match_brute_force_posteriors(blank_last, concatenated):
    for seed in range(15):
        batch = tiny_batch(5000 + 100 * blank_last + seed, blank_last)
        log_probs = batch.log_probs
        gamma = ctc_alignment_targets(*batch.args(concatenated=concatenated), batch.blank)
        assert gamma.shape == log_probs.shape and gamma.dtype == torch.float64 and not gamma.requires_grad
        for b, target in enumerate(batch.labels):
            n = batch.input_lengths[b]
            expected = bf.posteriors(batch.sample(b), target, batch.blank)
            torch.testing.assert_close(gamma[:n, b], expected, rtol=0, atol=1e-10)
            assert (gamma[n:, b] == 0).all()


def test_alignment_targets_rows_sum_to_one_on_valid_frames():
    log_probs = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(33)).log_softmax(-1)
    targets = torch.tensor([[1, 2, 2], [3, 0, 0], [1, 1, 1], [4, 4, 0]])
    input_lengths, target_lengths = torch.tensor([6, 4, 4, 0]), torch.tensor([3, 1, 3, 0])  # sample 2 infeasible
    gamma = ctc_alignment_targets(log_probs.half(), targets, input_lengths, target_lengths)
    assert gamma.dtype == torch.float32
    valid = (torch.arange(6)[:, None] < input_lengths) & torch.tensor([True, True, False, True])
    torch.testing.assert_close(gamma.sum(-1), valid.float())
    with torch.no_grad():  # works inside evaluation loops too
        gamma = ctc_alignment_targets(log_probs, targets, input_lengths, target_lengths)
    torch.testing.assert_close(gamma.sum(-1), valid.float())


def test_alignment_cross_entropy_has_the_ctc_gradient():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, 2, 3, 5], [4, 4, 4, 0, 0], [5, 1, 5, 2, 0], [0, 0, 0, 0, 0]])
    input_lengths, target_lengths = torch.tensor([20, 17, 12, 8]), torch.tensor([5, 3, 4, 0])
    log_probs = logits.log_softmax(-1)
    gamma = ctc_alignment_targets(log_probs, targets, input_lengths, target_lengths)
    (ce_grad,) = torch.autograd.grad(-(gamma * log_probs).sum(), logits, retain_graph=True)
    ctc = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="sum")
    (ctc_grad,) = torch.autograd.grad(ctc, logits)
    torch.testing.assert_close(ce_grad, ctc_grad, rtol=0, atol=1e-10)


def enumerated_ctc(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="none", zero_infinity=False):
    """CTC by exhaustive enumeration, differentiable (``brute_force``): its autograd gradient w.r.t. log_probs is
    -γ, not the built-in's exp(lp) - γ. ``reduction="none"`` only, as ``ctc_alignment_targets`` calls it."""
    assert reduction == "none" and not zero_infinity
    return torch.stack([
        bf.differentiable_nll_entropy(log_probs[:n, b], targets[b, :length].tolist(), blank)[0]
        for b, (n, length) in enumerate(zip(input_lengths.tolist(), target_lengths.tolist()))
    ])


def test_both_gradient_conventions_give_the_same_targets():
    log_probs = torch.randn(7, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).log_softmax(-1)
    targets = torch.tensor([[1, 2, 2], [3, 0, 0], [1, 1, 1], [2, 3, 0]])
    input_lengths, target_lengths = [7, 5, 4, 3], [3, 1, 3, 2]  # sample 2 is infeasible
    arguments = (log_probs, targets, input_lengths, target_lengths)
    builtin = ctc_alignment_targets(*arguments, ctc_loss=lambda lp, *a, **k: F.ctc_loss(lp, *a, **k))
    autograd = ctc_alignment_targets(*arguments, ctc_loss=enumerated_ctc)
    torch.testing.assert_close(autograd, builtin, rtol=0, atol=1e-10)
    torch.testing.assert_close(builtin[:, 0], bf.posteriors(log_probs[:, 0], [1, 2, 2], 0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("function", [forced_align, ctc_alignment_targets])
def test_no_host_sync_per_time_step(function):
    """Tensor values are read back to Python (a host sync on CUDA) a fixed number of times, whatever T."""

    def align(frames):
        log_probs = torch.randn(frames, 3, 5, generator=torch.Generator().manual_seed(frames)).log_softmax(-1)
        function(log_probs, torch.tensor([[1, 2, 2], [3, 0, 0], [4, 4, 0]]), [frames, frames - 1, frames - 3], [3, 1, 2])

    assert value_reads(lambda: align(8)) == value_reads(lambda: align(40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for seed in range(10):
        batch = tiny_batch(11000 + seed, blank_last=True)
        log_probs, targets, input_lengths, target_lengths = batch.args(concatenated=True)
        cpu_args = (log_probs, targets, input_lengths, target_lengths, batch.blank)
        cuda_args = (log_probs.cuda(), targets.cuda(), input_lengths, target_lengths, batch.blank)
        for expected, actual in zip(forced_align(*cpu_args), forced_align(*cuda_args)):
            torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0)
        torch.testing.assert_close(ctc_alignment_targets(*cuda_args).cpu(), ctc_alignment_targets(*cpu_args))
