"""Pure-PyTorch CTC (`losses.ctc_loss`) against the built-in F.ctc_loss, exhaustive enumeration and gradcheck."""

import dataclasses

import brute_force
import pytest
import torch
import torch.nn.functional as F

from conftest import random_batch
from host_sync import value_reads
from losses import PythonCTCLoss, ctc_alignment_targets, ctc_loss

MODES = ["alpha_beta", "autograd"]


def ctc_batch(seed, frames=30, batch=6, classes=7, max_label_len=9, **kwargs):
    """A mid-sized feasible batch: varied lengths (every input at least 1 frame), a run of repeated labels,
    junk in the target padding; logits ``2 * randn``."""
    return random_batch(seed, frames=frames, batch=batch, classes=classes, max_label_len=max_label_len,
                        feasible=True, min_input_length=1, repeats=True, scale=2.0, **kwargs)


def loss_and_logit_grad(loss_fn, logits, *args, **kwargs):
    """Loss and gradient w.r.t. the logits (through log_softmax: the built-in's gradient convention cancels)."""
    leaf = logits.detach().requires_grad_()
    loss = loss_fn(leaf.log_softmax(-1), *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blank_last", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_format", ["padded", "concatenated"])
def test_matches_builtin_float64(mode, blank_last, reduction, target_format):
    for seed in range(3):
        batch = ctc_batch(seed, blank_last=blank_last)
        args = batch.args(concatenated=target_format == "concatenated")[1:]
        kwargs = dict(blank=batch.blank, reduction=reduction)
        expected, expected_grad = loss_and_logit_grad(F.ctc_loss, batch.logits, *args, **kwargs)
        got, grad = loss_and_logit_grad(ctc_loss, batch.logits, *args, backward=mode, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_matches_builtin_float32_long_sequences(mode):
    batch = ctc_batch(7, frames=120, batch=8, classes=20, max_label_len=40, dtype=torch.float32)
    args = batch.args()[1:]
    expected, expected_grad = loss_and_logit_grad(F.ctc_loss, batch.logits, *args, reduction="none")
    got, grad = loss_and_logit_grad(ctc_loss, batch.logits, *args, reduction="none", backward=mode)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blank_last", [False, True])
def test_matches_brute_force_enumeration(mode, blank_last):
    for seed in range(15):
        batch = random_batch(100 * blank_last + seed, frames=5, classes=4, batch=3, blank_last=blank_last)
        got = ctc_loss(*batch.args(), blank=batch.blank, reduction="none", backward=mode)
        for b, target in enumerate(batch.labels):
            expected = brute_force.ctc_nll(batch.sample(b), target, batch.blank)
            assert got[b].item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (seed, b)


def test_autograd_mode_gradcheck_and_gradgradcheck():
    batch = ctc_batch(3, frames=8, batch=3, classes=4, max_label_len=3)
    _, targets, input_lengths, target_lengths = batch.args()

    def loss(x):
        return ctc_loss(x.log_softmax(-1), targets, input_lengths, target_lengths, reduction="none", backward="autograd")

    logits = batch.logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(loss, (logits,))
    assert torch.autograd.gradgradcheck(loss, (logits,))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_on_raw_log_probs(mode):
    """The true gradient w.r.t. unnormalised log_probs (-gamma), not the built-in's exp(lp) - gamma convention."""
    batch = ctc_batch(4, frames=7, batch=3, classes=4, max_label_len=3)
    log_probs, targets, input_lengths, target_lengths = batch.args()

    def loss(x):
        return ctc_loss(x, targets, input_lengths, target_lengths, reduction="sum", backward=mode)

    assert torch.autograd.gradcheck(loss, (log_probs.detach().requires_grad_(),))


@pytest.mark.parametrize("mode", MODES)
def test_zero_gradient_beyond_input_length(mode):
    batch = ctc_batch(5)
    log_probs = batch.log_probs.requires_grad_()
    ctc_loss(*batch.args(log_probs), backward=mode).backward()
    for b, length in enumerate(batch.input_lengths):
        assert torch.all(log_probs.grad[length:, b] == 0)
        assert torch.any(log_probs.grad[:length, b] != 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infeasible_targets(mode, dtype):
    """T < L + repeats: loss inf (grad 0, no NaN), or 0 with zero gradient under zero_infinity."""
    log_probs = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(21), dtype=dtype).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3, 4, 1], [2, 2, 2, 0, 0], [1, 2, 0, 0, 0]])
    target_lengths = torch.tensor([5, 3, 2])  # needs 5 frames, 5 frames (3 labels + 2 blanks), 2 frames
    input_lengths = torch.tensor([4, 4, 4])
    for zero_infinity in (False, True):
        leaf = log_probs.clone().requires_grad_()
        loss = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none",
                        zero_infinity=zero_infinity, backward=mode)
        loss.sum().backward()
        expected_bad = 0.0 if zero_infinity else float("inf")
        assert loss[0].item() == expected_bad and loss[1].item() == expected_bad
        assert torch.isfinite(loss[2])
        assert not leaf.grad.isnan().any()
        assert torch.all(leaf.grad[:, :2] == 0)
        reference = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none", zero_infinity=True)
        assert loss[2].item() == pytest.approx(reference[2].item(), rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_zero_length_targets_and_inputs(mode):
    log_probs = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(22), dtype=torch.float64).log_softmax(-1)
    targets = torch.tensor([[1, 2], [3, 0], [1, 0], [2, 2]])
    input_lengths = torch.tensor([6, 0, 0, 3])
    target_lengths = torch.tensor([0, 0, 1, 0])
    leaf = log_probs.clone().requires_grad_()
    loss = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none", backward=mode)
    loss[torch.isfinite(loss)].sum().backward()
    expected_0 = -log_probs[:, 0, 0].sum()  # all blanks
    expected_3 = -log_probs[:3, 3, 0].sum()
    torch.testing.assert_close(loss, torch.stack([expected_0, torch.tensor(0.0, dtype=torch.float64),
                                                  torch.tensor(float("inf"), dtype=torch.float64), expected_3]))
    assert not leaf.grad.isnan().any()
    torch.testing.assert_close(leaf.grad[:, 0, 0], -torch.ones(6, dtype=torch.float64))
    assert torch.all(leaf.grad[:, 1:3] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_log_probs_never_nan(mode, dtype):
    """-inf and -1e30 log-probs (where the built-in can return NaN) give finite or inf losses, never NaN."""
    batch = ctc_batch(6, frames=12, batch=4, classes=5, max_label_len=4, dtype=dtype)
    log_probs, targets, input_lengths, target_lengths = batch.args()
    log_probs[:, 0, 2] = float("-inf")  # a class some targets need, on every frame
    log_probs[3:, 1, :] = -1e30  # every class nearly impossible on later frames
    log_probs[:, 2, 0] = float("-inf")  # the blank never allowed
    for zero_infinity in (False, True):
        leaf = log_probs.clone().requires_grad_()
        loss = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none",
                        zero_infinity=zero_infinity, backward=mode)
        loss.sum().backward()
        assert not loss.isnan().any()
        assert not leaf.grad.isnan().any() and leaf.grad.isfinite().all()


def test_extreme_log_probs_match_builtin_when_it_is_finite():
    batch = ctc_batch(8, frames=12, batch=4, classes=5, max_label_len=4)
    batch = dataclasses.replace(batch, labels=[[1 if c == 3 else c for c in row] for row in batch.labels])
    log_probs, targets, input_lengths, target_lengths = batch.args()
    log_probs[:, :, 3] = float("-inf")  # a class no target uses
    expected = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none")
    for mode in MODES:
        got = ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none", backward=mode)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(mode, dtype):
    batch = ctc_batch(9, dtype=torch.float32)
    log_probs, targets, input_lengths, target_lengths = batch.args(batch.log_probs.to(dtype))
    leaf = log_probs.clone().requires_grad_()
    loss = ctc_loss(leaf, targets, input_lengths, target_lengths, backward=mode)
    loss.backward()
    assert loss.dtype == torch.float32 and leaf.grad.dtype == dtype
    expected = F.ctc_loss(log_probs.float(), targets, input_lengths, target_lengths)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_alignment_targets_agree_with_builtin(mode):
    """gamma read off this implementation's gradient equals the one read off the built-in's."""
    log_probs, targets, input_lengths, target_lengths = ctc_batch(10).args()
    expected = ctc_alignment_targets(log_probs, targets, input_lengths, target_lengths)
    ours = lambda *a, **k: ctc_loss(*a, backward=mode, **k)  # noqa: E731
    got = ctc_alignment_targets(log_probs, targets, input_lengths, target_lengths, ctc_loss=ours)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_value_read_counter_sees_a_read_per_step():
    """The probe the next test relies on: a data-dependent branch per step is counted once per step."""
    scores = torch.randn(50, generator=torch.Generator().manual_seed(23))

    def loop(frames):
        return [bool(scores[t] > 0) for t in range(frames)]

    assert value_reads(lambda: loop(8))["__bool__"] == 8 and value_reads(lambda: loop(40))["__bool__"] == 40


@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_per_time_step(mode):
    """Forward and backward read tensor values back to Python (a host sync on CUDA) a fixed number of times,
    however many frames the loop runs: argument checks only, nothing per step."""

    def forward_backward(batch):
        logits = batch.logits.requires_grad_()
        ctc_loss(*batch.args(logits.log_softmax(-1)), backward=mode).backward()

    short, long = ctc_batch(13, frames=8, max_label_len=3), ctc_batch(13, frames=40, max_label_len=3)
    assert value_reads(lambda: forward_backward(short)) == value_reads(lambda: forward_backward(long))


def test_module_wraps_function():
    log_probs, targets, input_lengths, target_lengths = ctc_batch(11).args()
    for mode in MODES:
        module = PythonCTCLoss(blank=0, reduction="sum", zero_infinity=True, backward=mode)
        expected = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="sum", zero_infinity=True)
        torch.testing.assert_close(module(log_probs, targets, input_lengths, target_lengths), expected)


def test_accepts_python_lists_for_lengths():
    log_probs, targets, input_lengths, target_lengths = ctc_batch(12).args()
    expected = F.ctc_loss(log_probs, targets, input_lengths, target_lengths)
    torch.testing.assert_close(ctc_loss(log_probs, targets, input_lengths.tolist(), target_lengths.tolist()), expected)


GOOD = dict(
    log_probs=torch.zeros(5, 2, 4).log_softmax(-1),
    targets=torch.tensor([[1, 2], [3, 0]]),
    input_lengths=torch.tensor([5, 4]),
    target_lengths=torch.tensor([2, 1]),
)


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(log_probs=torch.zeros(5, 4)), "log_probs"),
        (dict(log_probs=torch.zeros(5, 2, 4, dtype=torch.long)), "log_probs"),
        (dict(targets=torch.tensor([[1.0, 2.0], [3.0, 0.0]])), "targets"),
        (dict(targets=torch.zeros(2, 2, 2, dtype=torch.long)), "targets"),
        (dict(targets=torch.tensor([[1, 2]])), "targets"),
        (dict(targets=torch.tensor([[1, 4], [3, 0]])), "targets"),
        (dict(targets=torch.tensor([[1, -1], [3, 0]])), "targets"),
        (dict(targets=torch.tensor([[1, 0], [3, 0]])), "targets"),  # blank inside the target length
        (dict(targets=torch.tensor([1, 2])), "targets"),  # concatenated, too short
        (dict(input_lengths=torch.tensor([5.0, 4.0])), "input_lengths"),
        (dict(input_lengths=torch.tensor([6, 4])), "input_lengths"),
        (dict(input_lengths=torch.tensor([-1, 4])), "input_lengths"),
        (dict(input_lengths=torch.tensor([5, 4, 3])), "input_lengths"),
        (dict(target_lengths=torch.tensor([3, 1])), "target_lengths"),
        (dict(target_lengths=torch.tensor([2, -1])), "target_lengths"),
        (dict(target_lengths=torch.tensor([2.0, 1.0])), "target_lengths"),
        (dict(blank=4), "blank"),
        (dict(reduction="avg"), "reduction"),
        (dict(backward="beta"), "backward"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(change, argument):
    kwargs = {**GOOD, **change}
    with pytest.raises(ValueError, match=argument):
        ctc_loss(**kwargs)


def corrupted(log_probs, value, frame, sample=1, klass=2):
    """A copy of ``log_probs (T, B, C)`` with ``value`` (NaN, +inf) at one entry."""
    broken = log_probs.detach().clone()
    broken[frame, sample, klass] = value
    return broken


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "posinf"])
def test_one_corrupt_sample_stays_one_corrupt_sample(mode, value):
    """NaN / +inf on a valid frame of sample 1: its loss is inf (0 under zero_infinity) with zero gradient; every
    other sample's loss is the float64 built-in's on the clean batch and its gradient that of the clean batch.
    Past a sample's input length the value is ignored like any other there."""
    batch = ctc_batch(5, dtype=torch.float64)
    log_probs, targets, input_lengths, target_lengths = batch.args()
    log_probs = log_probs.detach()
    others = torch.arange(log_probs.shape[1]) != 1
    reference = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none")
    clean = log_probs.clone().requires_grad_()
    clean_losses = ctc_loss(clean, targets, input_lengths, target_lengths, reduction="none", backward=mode)
    (clean_grad,) = torch.autograd.grad(clean_losses[others].sum(), clean)
    for zero_infinity in (False, True):
        leaf = corrupted(log_probs, value, frame=0).requires_grad_()
        losses = ctc_loss(leaf, targets, input_lengths, target_lengths, reduction="none",
                          zero_infinity=zero_infinity, backward=mode)
        assert losses[1].item() == (0.0 if zero_infinity else float("inf"))
        torch.testing.assert_close(losses[others], reference[others])
        (grad,) = torch.autograd.grad(losses.masked_fill(losses.isinf(), 0.0).sum(), leaf)
        assert grad.isfinite().all() and (grad[:, 1] == 0).all()
        torch.testing.assert_close(grad, clean_grad)
    short = int(input_lengths[1])
    assert short < log_probs.shape[0]  # sample 1 is shorter than the batch: frame `short` is past its end
    losses = ctc_loss(corrupted(log_probs, value, frame=short), targets, input_lengths, target_lengths,
                      reduction="none", backward=mode)
    torch.testing.assert_close(losses, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_beta_three_way_log_sum_exp_matches_logaddexp_and_never_gives_nan(dtype):
    """The exp/log step of the alpha-beta loop against torch.logaddexp (log1p form), with -inf, huge negative and
    all--inf triples: -inf - -inf must not give NaN."""
    from losses.alpha_beta import _LogSumExp3Scratch

    generator = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(3, 4000, generator=generator, dtype=torch.float64) * 30).to(dtype)
    for x, fill in ((a, float("-inf")), (b, float("-inf")), (c, -1e30)):
        x[torch.randperm(4000, generator=generator)[:1500]] = fill
    a[:10] = b[:10] = c[:10] = float("-inf")
    bias = torch.where(torch.rand(4000, generator=generator) < 0.3, float("-inf"), 0.0).to(dtype)
    out = torch.empty(4000, dtype=dtype)
    _LogSumExp3Scratch(4000, dtype, torch.device("cpu"))(a, b, c, bias, out=out)
    expected = torch.logaddexp(torch.logaddexp(a.double(), b.double()), c.double() + bias.double())
    assert not out.isnan().any()
    assert (out[:10] == float("-inf")).all() and torch.equal(out.isneginf(), expected.isneginf())
    finite = expected.isfinite()
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out[finite].double(), expected[finite], rtol=4 * ulp, atol=4 * ulp)
