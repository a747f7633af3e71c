"""The probability-space alpha-beta (`losses.scaled_alpha_beta`) and its fallback to log space, against the float64
built-in F.ctc_loss: where the scaled result is trusted it is right, and where underflow makes it wrong it is not
trusted (and `ctc_loss` recomputes it)."""

import pytest
import torch
import torch.nn.functional as F

from losses import ctc_loss
from losses.scaled_alpha_beta import scaled_state_posteriors
from losses.targets import extended_targets


def flushed_alignment():
    """Target "ab" over frames that say b (x10, margin 20), a (x10, margin 30), b (x10, margin 20).

    The best alignment is blank for the first ten frames, then "a", then "b" (cost ~200 nats); the path that reads
    "b" early costs ~20 at first but ~300 in total. Alpha's blank state trails that early "b" by more than float32's
    range (e^-87) after a few frames, so the scaled recursion flushes it and gets ~320.
    """
    logits = torch.zeros(30, 1, 3)
    logits[:10, 0, 2], logits[10:20, 0, 1], logits[20:, 0, 2] = 20.0, 30.0, 20.0
    return logits, torch.tensor([[1, 2]]), torch.tensor([30]), torch.tensor([2])


def scaled(log_probs, targets, input_lengths, target_lengths, blank=0):
    states, can_skip = extended_targets(targets, blank)
    return scaled_state_posteriors(log_probs, states, can_skip, input_lengths, target_lengths)


def builtin_posteriors(log_probs, targets, input_lengths, target_lengths, blank=0):
    """Float64 built-in: ``(-log p (B,), class posteriors (T, B, C))``, the posteriors 0 past each input length (its
    gradient w.r.t. the log-probs is ``exp(log_probs) - gamma`` on valid frames, 0 elsewhere)."""
    leaf = log_probs.detach().double().requires_grad_()
    loss = F.ctc_loss(leaf, targets, input_lengths, target_lengths, blank=blank, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    valid = torch.arange(log_probs.shape[0])[:, None] < input_lengths
    return loss.detach(), (leaf.detach().exp() - grad) * valid[..., None]


def class_posteriors(gamma, targets, num_classes, blank=0):
    """State posteriors ``(T, B, N)`` summed per class: ``(T, B, C)``."""
    states, _ = extended_targets(targets, blank)
    index = states.expand(gamma.shape[0], -1, -1)
    return gamma.new_zeros(*gamma.shape[:2], num_classes).scatter_add_(2, index, gamma)


def test_flushed_alignment_is_not_trusted_and_ctc_loss_recomputes_it():
    logits, targets, input_lengths, target_lengths = flushed_alignment()
    log_probs = logits.log_softmax(2)
    reference, reference_gamma = builtin_posteriors(log_probs, targets, input_lengths, target_lengths)
    log_likelihood, _, trusted = scaled(log_probs, targets, input_lengths, target_lengths)
    assert abs(-log_likelihood.item() - reference.item()) > 50  # the flush matters here ...
    assert not trusted.item()  # ... and the check sees it
    leaf = log_probs.detach().requires_grad_()
    loss = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(-grad.double(), reference_gamma, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logit_scale", [0.5, 3.0, 10.0, 40.0])
def test_trusted_samples_match_the_float64_builtin(dtype, logit_scale):
    """Random labels under random logits: the sharper the logits, the more the labels disagree with them and the more
    samples the check rejects; every sample it accepts has the built-in's likelihood and posteriors."""
    generator = torch.Generator().manual_seed(int(logit_scale * 10))
    frames, batch, classes, max_len = 40, 64, 9, 12
    logits = torch.randn(frames, batch, classes, generator=generator, dtype=torch.float64) * logit_scale
    log_probs = logits.log_softmax(2).to(dtype)
    input_lengths = torch.randint(1, frames + 1, (batch,), generator=generator)
    target_lengths = torch.minimum(torch.randint(0, max_len + 1, (batch,), generator=generator), input_lengths // 2)
    targets = torch.randint(1, classes, (batch, max_len), generator=generator)
    targets[:4, :4] = 3  # repeats need a blank between them
    reference, reference_gamma = builtin_posteriors(log_probs, targets, input_lengths, target_lengths)
    log_likelihood, gamma, trusted = scaled(log_probs, targets, input_lengths, target_lengths)
    assert trusted.any()
    if logit_scale <= 3.0:
        assert trusted.float().mean() > 0.5
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(-log_likelihood[trusted].double(), reference[trusted], rtol=tolerance, atol=tolerance)
    gamma = class_posteriors(gamma.double(), targets, classes)
    torch.testing.assert_close(gamma[:, trusted], reference_gamma[:, trusted], rtol=0, atol=10 * tolerance)


def test_a_sharp_model_with_right_and_wrong_labels_stays_on_the_fast_path():
    """Outputs peaked on an alignment of the label (logit margin 20), a tenth of the labels' characters wrong: what
    training sees. Every sample is trusted, so the log-space recomputation is the exception it should be."""
    generator = torch.Generator().manual_seed(0)
    frames, batch, classes, length = 64, 32, 20, 20
    targets = torch.randint(1, classes, (batch, length), generator=generator)
    logits = torch.randn(frames, batch, classes, generator=generator)
    shown = targets.clone()
    wrong = torch.rand(batch, length, generator=generator) < 0.1
    shown[wrong] = torch.randint(1, classes, (int(wrong.sum()),), generator=generator)
    logits[torch.arange(0, 2 * length, 2)[:, None], torch.arange(batch), shown.T] += 20.0  # labels on even frames
    logits[torch.arange(1, 2 * length, 2)[:, None], torch.arange(batch), 0] += 20.0  # blanks between
    logits[2 * length:, :, 0] += 20.0
    log_probs = logits.log_softmax(2)
    input_lengths, target_lengths = torch.full((batch,), frames), torch.full((batch,), length)
    _, _, trusted = scaled(log_probs, targets, input_lengths, target_lengths)
    assert bool(trusted.all())


def test_ctc_loss_merges_trusted_and_recomputed_samples():
    """One batch holding the flushed alignment beside ordinary samples: each sample gets the built-in's loss and
    gradient, whichever way it was computed."""
    logits, targets, _, _ = flushed_alignment()
    generator = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randn(30, 3, 3, generator=generator), logits, torch.randn(30, 2, 3, generator=generator)], 1)
    targets = torch.tensor([[1, 1], [2, 1], [1, 2], [1, 2], [2, 2], [1, 0]])
    input_lengths, target_lengths = torch.tensor([30, 25, 7, 30, 30, 12]), torch.tensor([2, 2, 2, 2, 2, 1])
    log_probs = logits.log_softmax(2)
    reference, reference_gamma = builtin_posteriors(log_probs, targets, input_lengths, target_lengths)
    _, _, trusted = scaled(log_probs, targets, input_lengths, target_lengths)
    assert trusted.tolist() == [True, True, True, False, True, True]
    leaf = log_probs.detach().requires_grad_()
    loss = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(-grad.double(), reference_gamma, rtol=0, atol=1e-5)
