"""The CTC core and the CRNN on a CUDA device: same numbers as on the CPU, no host sync per time step.

Skipped where no CUDA device exists (the decoders, forced alignment and predict have their own CUDA tests).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import random_batch
from crnn.model import CRNN
from losses import FocalCTCLoss, MaxEntropyCTCLoss, ReweightedCTCLoss, SmoothedCTCLoss, ctc_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODES = ["alpha_beta", "autograd"]


def batch(frames=40, seed=0):
    """float64 logits (T, B, C) on the CPU, then padded targets (blank 0, junk in the padding) and lengths of a
    feasible batch with B = 5, C = 7, up to 8 labels."""
    made = random_batch(seed, frames=frames, batch=5, classes=7, max_label_len=8, feasible=True, min_input_length=1,
                        repeats=True, scale=2.0)
    return made.logits, *made.args()[1:]


def value_and_grad(loss_fn, logits, *args):
    leaf = logits.detach().requires_grad_()
    loss = loss_fn(leaf.log_softmax(-1), *args)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ctc_loss_on_cuda_matches_the_builtin_on_cpu(mode, dtype):
    logits, *args = batch()
    expected = value_and_grad(lambda lp, *a: F.ctc_loss(lp, *a, reduction="sum"), logits, *args)
    on_cuda = [a.cuda() for a in args]
    got = value_and_grad(lambda lp, *a: ctc_loss(lp, *a, reduction="sum", backward=mode), logits.cuda().to(dtype),
                         *on_cuda)
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for actual, reference in zip(got, expected):
        torch.testing.assert_close(actual.cpu().double(), reference, **tolerance)


@pytest.mark.parametrize("make_loss", [
    lambda: FocalCTCLoss(), lambda: ReweightedCTCLoss(), lambda: SmoothedCTCLoss(), lambda: MaxEntropyCTCLoss(),
], ids=["focal", "reweighted", "smoothed", "maxent"])
def test_loss_modules_on_cuda_match_cpu(make_loss):
    logits, *args = batch(seed=1)
    expected = value_and_grad(make_loss(), logits, *args)
    got = value_and_grad(make_loss(), logits.cuda(), *(a.cuda() for a in args))
    for actual, reference in zip(got, expected):
        torch.testing.assert_close(actual.cpu(), reference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_per_time_step_on_cuda(mode):
    """CUDA's sync debug mode warns at every synchronising call: the count must not grow with T."""

    def syncs(frames):
        logits, *args = batch(frames=frames)
        logits = logits.float().cuda().requires_grad_()
        args = [a.cuda() for a in args]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ctc_loss(logits.log_softmax(-1), *args, backward=mode).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(24) == syncs(96)


def test_crnn_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = CRNN(num_classes=11).eval()
    images, widths = torch.rand(3, 1, 32, 90), torch.tensor([90, 41, 5])
    with torch.no_grad():
        expected, lengths = model(images, widths)
        got, cuda_lengths = model.cuda()(images.cuda(), widths.cuda())
    assert cuda_lengths.cpu().tolist() == lengths.tolist()
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
