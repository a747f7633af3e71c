"""CTC loss variants (focal, re-weighted, smoothed, max-entropy) against independent references.

Expected values never come from the code under test: they are computed here from
``torch.nn.functional.ctc_loss`` (built-in CTC, focal), from the exhaustive enumeration in ``brute_force``
(posteriors, path entropy, negative log-likelihood, and, differentiable, exact gradients of both). Reduced
losses are checked against the per-sample ones combined with weights read off ``F.ctc_loss`` itself
(:func:`ctc_reduction_weights`), so the reduction rule is nowhere written out here.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import brute_force as bf
from conftest import Batch, random_batch
from losses import (
    CTCLoss,
    FocalCTCLoss,
    MaxEntropyCTCLoss,
    PythonCTCLoss,
    ReweightedCTCLoss,
    SmoothedCTCLoss,
    ctc_loss,
    ctc_alignment_targets,
    ctc_path_entropy,
)

REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------------
# Fixed batches (random ones: conftest.random_batch) and hand-written references
# ----------------------------------------------------------------------------------------------------


def fixed_batch(requires_grad: bool = False, blank: int = 0) -> Batch:
    """B = 4 with repeats, an empty target and a shorter input; every sample feasible. C = 4, T = 5."""
    other = [c for c in range(4) if c != blank]
    a, b, c = other
    labels = [[a, a], [a, b, a], [], [c]]
    generator = torch.Generator().manual_seed(1234)
    logits = torch.randn(5, 4, 4, generator=generator, dtype=torch.float64)
    return Batch(logits.requires_grad_(requires_grad), labels, [5, 4, 3, 2], blank)


def ctc_reduction_weights(batch: Batch, reduction: str) -> torch.Tensor:
    """``(B,)`` float64 weight of each sample's loss in ``F.ctc_loss``'s ``reduction`` of ``batch``'s targets.

    Read off ``F.ctc_loss`` itself: a reduction is linear in the per-sample losses, and sample ``b``'s loss
    depends on ``log_probs[:, b]`` only, so the reduced loss's gradient there is ``w_b`` times that of sample
    ``b``'s own loss. Measured on a probe with the same targets, uniform log-probs and every input long enough
    (``2S + 1`` frames), where no sample's gradient vanishes: the weights may depend on the targets only.
    """
    targets, target_lengths = batch.padded(), torch.tensor(batch.target_lengths)
    num_frames = 2 * max(batch.target_lengths, default=0) + 1
    probe = torch.zeros(num_frames, len(batch.labels), batch.num_classes, dtype=torch.float64)
    probe = probe.log_softmax(-1).requires_grad_()
    input_lengths = torch.full_like(target_lengths, num_frames)
    grads = [
        grad_of(F.ctc_loss(probe, targets, input_lengths, target_lengths, blank=batch.blank, reduction=r).sum(), probe)
        for r in ("none", reduction)
    ]
    own, reduced = (grad.transpose(0, 1).flatten(1) for grad in grads)  # (B, T * C)
    assert (own.abs().sum(1) > 0).all()
    weights = (reduced * own).sum(1) / (own * own).sum(1)
    close(reduced, weights[:, None] * own)  # linear, one weight per sample
    return weights


def reduce_like_ctc(values: torch.Tensor, batch: Batch, reduction: str) -> torch.Tensor:
    """``(B,)`` per-sample ``values`` combined the way ``F.ctc_loss``'s ``reduction`` combines per-sample losses."""
    if reduction == "none":
        return values
    return (ctc_reduction_weights(batch, reduction).to(values.dtype) * values).sum()


def close(actual: torch.Tensor, expected, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False)


def grad_of(value: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, wrt)
    return grad


# ---- alignment-target (cross-entropy) references from brute-force posteriors, plain Python loops ----


def reweight_reference(gamma: torch.Tensor, labels: list[int], blank: int, alpha: float, mode: str) -> torch.Tensor:
    """Li et al. 2019 re-weighting of one sample's (T_b, C) posteriors, written out by hand."""
    num_frames, num_classes = gamma.shape
    if mode == "none":
        return gamma.clone()
    if mode == "plain":
        out = gamma.clone()
        for t in range(num_frames):
            for c in range(num_classes):
                out[t, c] = gamma[t, c] * ((1 - alpha) if c == blank else alpha)
        return out
    assert mode == "balanced"
    if not labels:  # documented: an empty target keeps its (all-blank) posteriors
        return gamma.clone()
    total_labels = len(labels)
    wanted = [
        (1 - alpha) / alpha * total_labels if c == blank else float(labels.count(c)) for c in range(num_classes)
    ]
    mass = [sum(gamma[t, c].item() for t in range(num_frames)) for c in range(num_classes)]
    scale = [wanted[c] / mass[c] if mass[c] > 0 else 0.0 for c in range(num_classes)]
    rescaled = gamma.clone()
    for t in range(num_frames):
        for c in range(num_classes):
            rescaled[t, c] = gamma[t, c] * scale[c]
    # before renormalisation: label classes hold exactly their counts, blank (1-a)/a * L, so the
    # non-blank share of the sample's target mass is alpha (when blank has any posterior mass at all)
    if mass[blank] > 0:
        label_mass = sum(rescaled[:, c].sum().item() for c in range(num_classes) if c != blank)
        assert math.isclose(label_mass / rescaled.sum().item(), alpha, rel_tol=1e-9)
        for c in set(labels):
            assert math.isclose(rescaled[:, c].sum().item(), labels.count(c), rel_tol=1e-9)
    out = rescaled.clone()
    for t in range(num_frames):
        frame = rescaled[t].sum().item()
        if frame > 0:
            out[t] = rescaled[t] / frame
    return out


def cross_entropy(target: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """-sum q log y with 0 log 0 = 0."""
    total = torch.zeros((), dtype=log_probs.dtype)
    for t in range(target.shape[0]):
        for c in range(target.shape[1]):
            if target[t, c] > 0:
                total = total - target[t, c] * log_probs[t, c]
    return total


def alignment_loss_reference(batch: Batch, transform, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) cross-entropy against ``transform(posteriors, labels)`` per sample; inf without any alignment."""
    log_probs = batch.log_probs.detach() if log_probs is None else log_probs
    out = []
    for b, labels in enumerate(batch.labels):
        sample = batch.sample(b, log_probs)
        if math.isinf(bf.ctc_nll(sample, labels, batch.blank)):
            out.append(torch.tensor(math.inf, dtype=torch.float64))
            continue
        gamma = bf.posteriors(sample, labels, batch.blank)
        out.append(cross_entropy(transform(gamma, labels), sample.double()))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------
# 0. Built-in CTC (losses.CTCLoss, the default loss)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("blank_last", [False, True])
def test_builtin_ctc_value_and_gradient_match_functional_and_brute_force(reduction, blank_last):
    """Blank 0 or C - 1: float64 values and gradients equal F.ctc_loss's and the exhaustive enumeration's."""
    batches = [random_batch(200 + 11 * seed + blank_last, blank_last=blank_last, feasible=True, requires_grad=True)
               for seed in range(3)]
    batches.append(fixed_batch(requires_grad=True, blank=3 if blank_last else 0))  # C = 4, shorter inputs
    for batch in batches:
        got = CTCLoss(blank=batch.blank, reduction=reduction)(*batch.args())
        assert got.dtype == torch.float64 and got.shape == ((len(batch.labels),) if reduction == "none" else ())
        got_grad = grad_of(got.sum(), batch.logits)
        expected = F.ctc_loss(*batch.args(), blank=batch.blank, reduction=reduction)
        close(got.detach(), expected.detach())
        close(got_grad, grad_of(expected.sum(), batch.logits))
        # per sample, against the differentiable enumeration
        per_sample = CTCLoss(blank=batch.blank, reduction="none")(*batch.args())
        exact = torch.stack([bf.differentiable_nll_entropy(batch.sample(b), row, batch.blank)[0]
                             for b, row in enumerate(batch.labels)])
        close(per_sample.detach(), exact.detach())
        close(grad_of(per_sample.sum(), batch.logits), grad_of(exact.sum(), batch.logits))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_builtin_ctc_zero_infinity_zeroes_an_infeasible_sample(reduction):
    batch = infeasible_batch()  # sample 1 has no alignment
    assert CTCLoss(reduction="none")(*batch.args())[1] == math.inf
    got = CTCLoss(reduction=reduction, zero_infinity=True)(*batch.args())
    got_grad = grad_of(got.sum(), batch.logits)
    expected = F.ctc_loss(*batch.args(), reduction=reduction, zero_infinity=True)
    close(got.detach(), expected.detach())
    close(got_grad, grad_of(expected.sum(), batch.logits))
    log_probs = batch.log_probs.detach()
    nll = [0.0 if b == 1 else bf.ctc_nll(batch.sample(b, log_probs), row, 0) for b, row in enumerate(batch.labels)]
    close(CTCLoss(reduction="none", zero_infinity=True)(*batch.args()).detach(), nll)
    assert (got_grad[:, 1] == 0).all() and got_grad[:, [0, 2]].abs().sum() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_builtin_ctc_half_inputs_give_the_float32_computation(reduction, dtype):
    """F.ctc_loss has no half kernels on CPU: CTCLoss upcasts, so the result is F.ctc_loss of the rounded input
    in float32, and the gradient comes back in the input's dtype."""
    batch = fixed_batch()
    half = batch.log_probs.to(dtype).requires_grad_()
    got = CTCLoss(reduction=reduction)(*batch.args(half))
    assert got.dtype == torch.float32
    upcast = half.detach().float().requires_grad_()
    expected = F.ctc_loss(*batch.args(upcast), reduction=reduction)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), half)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, grad_of(expected.sum(), upcast).to(dtype))
    # and the float64 computation of the same rounded input, to float32 accuracy (per sample: the enumeration)
    rounded = half.detach().double()
    expected64 = F.ctc_loss(*batch.args(rounded), reduction=reduction)
    torch.testing.assert_close(got.detach().double(), expected64, rtol=1e-5, atol=1e-5)
    nll = [bf.ctc_nll(batch.sample(b, rounded), row, 0) for b, row in enumerate(batch.labels)]
    per_sample = CTCLoss(reduction="none")(*batch.args(half)).detach().double()
    torch.testing.assert_close(per_sample, torch.tensor(nll, dtype=torch.float64), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# 1. Focal CTC
# ----------------------------------------------------------------------------------------------------


def focal_reference(batch: Batch, alpha: float, gamma: float, reduction: str, log_probs=None, detach=False):
    """alpha * (1 - e^-L)^gamma * L computed directly from F.ctc_loss (float64)."""
    nll = F.ctc_loss(*batch.args(log_probs), blank=batch.blank, reduction="none", zero_infinity=False)
    weight = alpha * (1 - torch.exp(-nll)) ** gamma
    if detach:
        weight = weight.detach()
    return reduce_like_ctc(weight * nll, batch, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(1.0, 2.0), (0.25, 0.5), (2.0, 0.0), (0.5, 3.0)])
@pytest.mark.parametrize("blank_last", [False, True])
def test_focal_value_and_gradient_match_direct_formula(reduction, alpha, gamma, blank_last):
    for seed in range(3):
        batch = random_batch(100 * seed + 7 * blank_last, blank_last=blank_last, feasible=True, requires_grad=True)
        module = FocalCTCLoss(alpha=alpha, gamma=gamma, blank=batch.blank, reduction=reduction)
        got = module(*batch.args())
        expected = focal_reference(batch, alpha, gamma, reduction)
        close(got, expected.detach())
        assert got.dtype == torch.float64
        close(grad_of(got.sum(), batch.logits), grad_of(expected.sum(), batch.logits))


def test_focal_default_weight_is_differentiated():
    """The defaults are PaddleOCR's alpha = 1, gamma = 2, with the weight differentiated through."""
    batch = fixed_batch(requires_grad=True)
    got = FocalCTCLoss(reduction="sum")(*batch.args())
    close(got.detach(), focal_reference(batch, 1.0, 2.0, "sum").detach())
    detached = focal_reference(batch, 1.0, 2.0, "sum", detach=True)
    # the default (weight not detached) must not equal the detached-weight gradient
    difference = grad_of(got, batch.logits) - grad_of(detached, batch.logits)
    assert difference.abs().max() > 1e-3


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("blank", [0, 3])
def test_focal_detach_weight_gradient_is_weight_times_ctc_gradient(reduction, blank):
    batch = fixed_batch(requires_grad=True, blank=blank)
    alpha, gamma = 0.7, 2.0
    got = FocalCTCLoss(alpha, gamma, detach_weight=True, blank=blank, reduction=reduction)(*batch.args())
    nll = F.ctc_loss(*batch.args(), blank=blank, reduction="none")
    weight = (alpha * (1 - torch.exp(-nll)) ** gamma).detach()
    close(got, reduce_like_ctc(weight * nll, batch, reduction).detach())
    # d/dlogits of the reduced loss = sum_i (d reduce / d loss_i) * weight_i * dL_i / dlogits
    per_sample_factor = ctc_reduction_weights(batch, reduction)
    expected = torch.zeros_like(batch.logits)
    for i in range(4):
        (dl,) = torch.autograd.grad(nll[i], batch.logits, retain_graph=True)
        expected += per_sample_factor[i] * weight[i] * dl
    close(grad_of(got.sum(), batch.logits), expected)


def infeasible_batch(requires_grad: bool = True) -> Batch:
    """Sample 1 is infeasible (target [1, 1] needs 3 frames, has 2); samples 0 and 2 are fine."""
    generator = torch.Generator().manual_seed(99)
    logits = torch.randn(4, 3, 3, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
    return Batch(logits, [[1, 2], [1, 1], [2]], [4, 2, 3], blank=0)


LOSS_FACTORIES = {
    "ctc": lambda **kw: CTCLoss(**kw),
    "focal": lambda **kw: FocalCTCLoss(**kw),
    "focal_detached": lambda **kw: FocalCTCLoss(detach_weight=True, **kw),
    "reweighted_balanced": lambda **kw: ReweightedCTCLoss(alpha=0.3, mode="balanced", **kw),
    "reweighted_plain": lambda **kw: ReweightedCTCLoss(alpha=0.7, mode="plain", **kw),
    "reweighted_none": lambda **kw: ReweightedCTCLoss(mode="none", **kw),
    "smoothed": lambda **kw: SmoothedCTCLoss(epsilon=0.2, **kw),
    "max_entropy": lambda **kw: MaxEntropyCTCLoss(beta=0.3, **kw),
    "max_entropy_1": lambda **kw: MaxEntropyCTCLoss(beta=1.0, **kw),
}


def make_loss(name: str, **kwargs):
    """One loss module (by name) built with the common constructor arguments ``kwargs``."""
    return LOSS_FACTORIES[name](**kwargs)


LOSS_NAMES = list(LOSS_FACTORIES)
# F.ctc_loss's own kernels, which CTCLoss calls as they are, return NaN gradients where a log-prob is -inf
# (-1e30 is fine); every other loss guards against it.
MINUS_INF_SAFE_LOSS_NAMES = [name for name in LOSS_NAMES if name != "ctc"]


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_infeasible_sample_gives_inf_or_zero_with_zero_infinity(name, reduction):
    batch = infeasible_batch()
    plain = make_loss(name, reduction="none")(*batch.args())
    assert math.isinf(plain[1].item()) and plain[1].item() > 0
    assert plain[[0, 2]].isfinite().all()
    if reduction != "none":
        reduced = make_loss(name, reduction=reduction)(*batch.args())
        assert math.isinf(reduced.item()) and reduced.item() > 0

    zeroed = make_loss(name, reduction=reduction, zero_infinity=True)(*batch.args())
    finite = plain.detach().clone()
    finite[1] = 0.0
    close(zeroed.detach(), reduce_like_ctc(finite, batch, reduction))
    grad = grad_of(zeroed.sum(), batch.logits)
    assert grad.isfinite().all()
    assert (grad[:, 1] == 0).all()
    if reduction == "sum":  # the feasible samples' gradient is unaffected by their infeasible neighbour
        alone = Batch(batch.logits[:, [0, 2]], [batch.labels[0], batch.labels[2]], [4, 3], 0)
        without_neighbour = make_loss(name, reduction="sum")(*alone.args())
        close(grad[:, [0, 2]], grad_of(without_neighbour, batch.logits)[:, [0, 2]])


def test_focal_zero_infinity_matches_direct_formula():
    batch = infeasible_batch()
    got = FocalCTCLoss(reduction="none", zero_infinity=True)(*batch.args())
    nll = F.ctc_loss(*batch.args(), reduction="none", zero_infinity=True)
    close(got, ((1 - torch.exp(-nll)) ** 2 * nll).detach())
    assert got[1] == 0
    without = FocalCTCLoss(reduction="none")(*batch.args())
    assert without[1] == math.inf


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("blank_last", [False, True])
def test_focal_ctc_implementation_is_swappable(reduction, zero_infinity, blank_last):
    for seed in range(2):
        batch = random_batch(500 + seed + 10 * blank_last, blank_last=blank_last, feasible=not zero_infinity,
                             requires_grad=True)
        kwargs = dict(alpha=0.8, gamma=1.5, blank=batch.blank, reduction=reduction, zero_infinity=zero_infinity)
        results = []
        for ctc in (F.ctc_loss, ctc_loss, functools.partial(ctc_loss, backward="autograd")):
            value = FocalCTCLoss(ctc=ctc, **kwargs)(*batch.args())
            grad = grad_of(value.sum(), batch.logits) if value.isfinite().all() else None
            results.append((value.detach(), grad))
        for value, grad in results[1:]:
            close(value, results[0][0])
            if grad is not None:
                close(grad, results[0][1])


def test_focal_zero_loss_sample_has_finite_gradient():
    """An empty target on an empty input has L = 0 exactly; d/dL[(1-e^-L)^g L] = 0 there for any g > 0."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    batch = Batch(logits, [[1, 2], []], [3, 0], blank=0)
    for gamma in (0.5, 1.0, 2.0):
        loss = FocalCTCLoss(gamma=gamma, reduction="sum")(*batch.args())
        expected = focal_reference(batch, 1.0, gamma, "sum")
        close(loss, expected.detach())
        grad = grad_of(loss, logits)
        assert grad.isfinite().all(), f"gamma={gamma}: {grad}"
        assert (grad[:, 1] == 0).all()
        # sample 0 alone gives the same gradient
        alone = focal_reference(Batch(logits, [[1, 2]], [3], 0), 1.0, gamma, "sum",
                                log_probs=logits[:, :1].log_softmax(-1))
        close(grad[:, 0], grad_of(alone, logits)[:, 0])


@pytest.mark.parametrize(
    "kwargs", [dict(alpha=0.0), dict(alpha=-1.0), dict(gamma=-0.5), dict(reduction="avg"), dict(reduction=None)]
)
def test_focal_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        FocalCTCLoss(**kwargs)


# ----------------------------------------------------------------------------------------------------
# 2. Re-weighted CTC
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank_last", [False, True])
def test_reweighted_none_gradient_equals_ctc_and_value_is_nll_plus_entropy(blank_last):
    for seed in range(4):
        batch = random_batch(40 + seed + 10 * blank_last, blank_last=blank_last, feasible=True, requires_grad=True)
        loss = ReweightedCTCLoss(mode="none", blank=batch.blank, reduction="sum")(*batch.args())
        reference = F.ctc_loss(*batch.args(), blank=batch.blank, reduction="sum")
        close(grad_of(loss, batch.logits), grad_of(reference, batch.logits))

        per_sample = ReweightedCTCLoss(mode="none", blank=batch.blank, reduction="none")(*batch.args())
        log_probs = batch.log_probs.detach()
        expected = [
            bf.ctc_nll(batch.sample(b, log_probs), row, batch.blank)
            + bf.path_entropy(batch.sample(b, log_probs), row, batch.blank)
            for b, row in enumerate(batch.labels)
        ]
        close(per_sample.detach(), expected)


@pytest.mark.parametrize("mode,alpha", [("plain", 0.3), ("plain", 0.8), ("balanced", 0.5), ("balanced", 0.2),
                                        ("balanced", 0.9), ("none", 0.4)])
@pytest.mark.parametrize("blank_last", [False, True])
@pytest.mark.parametrize("concatenated", [False, True])
def test_reweighted_matches_hand_written_reference(mode, alpha, blank_last, concatenated):
    for seed in range(3):
        batch = random_batch(700 + 13 * seed + blank_last, blank_last=blank_last, requires_grad=True)
        module = ReweightedCTCLoss(alpha=alpha, mode=mode, blank=batch.blank, reduction="none")
        got = module(*batch.args(concatenated=concatenated))
        transform = functools.partial(reweight_reference, blank=batch.blank, alpha=alpha, mode=mode)
        expected = alignment_loss_reference(batch, transform)
        close(got.detach(), expected)
        # gradient: d/dlogits of -sum q log_softmax = softmax * sum_c q - q, with q the (detached) target
        finite = got.isfinite()
        if finite.any():  # the reference's cross-entropy is differentiable in log_probs, its target detached
            reference = alignment_loss_reference(batch, transform, log_probs=batch.log_probs)
            close(grad_of(got[finite].sum(), batch.logits), grad_of(reference[finite].sum(), batch.logits))


def test_reweighted_balanced_by_hand():
    """T = 3, target [1], blank 0, posteriors worked out on paper from the brute-force enumeration."""
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    log_probs = probs.log()[:, None, :]
    paths = bf.alignments(3, 2, [1], 0)
    assert sorted(paths) == sorted([(0, 0, 1), (0, 1, 1), (1, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0)])
    # each path equally likely: gamma[t, 1] = #paths with 1 at t / 6
    gamma1 = torch.tensor([3, 4, 3], dtype=torch.float64) / 6
    # balanced with alpha 0.5: label mass 10/6 -> 1 (scale 0.6), blank mass 8/6 -> 1 (scale 0.75)
    label = gamma1 * 0.6
    blank = (1 - gamma1) * 0.75
    target = torch.stack([blank, label], 1)
    target = target / target.sum(1, keepdim=True)
    expected = -(target * log_probs[:, 0]).sum()
    got = ReweightedCTCLoss(alpha=0.5, mode="balanced", reduction="sum")(
        log_probs, torch.tensor([[1]]), torch.tensor([3]), torch.tensor([1])
    )
    close(got, expected)
    close(target[:, 1], torch.tensor([4 / 9, 8 / 13, 4 / 9], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["balanced", "plain", "none"])
def test_reweighted_empty_target(mode):
    """An empty target's posteriors are all blank on valid frames."""
    generator = torch.Generator().manual_seed(3)
    log_probs = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64).log_softmax(-1)
    args = (log_probs, torch.tensor([[1, 2], [1, 1]]), torch.tensor([4, 3]), torch.tensor([0, 0]))
    got = ReweightedCTCLoss(alpha=0.25, mode=mode, reduction="none")(*args)
    factor = 0.75 if mode == "plain" else 1.0
    expected = [-factor * log_probs[:4, 0, 0].sum(), -factor * log_probs[:3, 1, 0].sum()]
    close(got, torch.stack(expected))
    mean = ReweightedCTCLoss(alpha=0.25, mode=mode, reduction="mean")(*args)
    close(mean, torch.stack(expected).mean())


@pytest.mark.parametrize("ctc", [F.ctc_loss, ctc_loss, functools.partial(ctc_loss, backward="autograd")])
@pytest.mark.parametrize("mode", ["balanced", "plain"])
def test_reweighted_any_ctc_implementation_gives_the_same_targets(ctc, mode):
    batch = fixed_batch(blank=3)
    got = ReweightedCTCLoss(alpha=0.6, mode=mode, blank=3, reduction="none", ctc=ctc)(*batch.args())
    transform = functools.partial(reweight_reference, blank=3, alpha=0.6, mode=mode)
    close(got, alignment_loss_reference(batch, transform))


@pytest.mark.parametrize(
    "kwargs",
    [dict(alpha=0.0), dict(alpha=1.0), dict(alpha=-0.2), dict(alpha=1.5), dict(mode="foo"), dict(mode=None),
     dict(reduction="avg")],
)
def test_reweighted_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ReweightedCTCLoss(**kwargs)


# ----------------------------------------------------------------------------------------------------
# 3. Smoothed CTC
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("blank_last", [False, True])
def test_smoothed_matches_brute_force(epsilon, blank_last):
    batches = [random_batch(900 + 7 * seed + blank_last, blank_last=blank_last, requires_grad=True) for seed in range(3)]
    batches.append(fixed_batch(requires_grad=True, blank=3 if blank_last else 0))  # shorter inputs: padded frames
    for batch in batches:
        got = SmoothedCTCLoss(epsilon=epsilon, blank=batch.blank, reduction="none")(*batch.args())

        def transform(gamma, labels):
            return (1 - epsilon) * gamma + epsilon / gamma.shape[1]

        close(got.detach(), alignment_loss_reference(batch, transform))
        finite = got.isfinite()
        if finite.any():
            # gradient w.r.t. logits of CE against a detached target q (rows summing to 1): softmax - q
            got_grad = grad_of(got[finite].sum(), batch.logits)
            softmax = batch.logits.detach().softmax(-1)
            expected = torch.zeros_like(softmax)
            for b, labels in enumerate(batch.labels):
                if not finite[b]:
                    continue
                n = batch.input_lengths[b]
                q = transform(bf.posteriors(batch.sample(b).detach(), labels, batch.blank), labels)
                expected[:n, b] = softmax[:n, b] - q
            close(got_grad, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smoothed_epsilon_zero_is_reweighted_none_and_ctc_gradient(reduction):
    batch = fixed_batch(requires_grad=True)
    smoothed = SmoothedCTCLoss(epsilon=0.0, reduction=reduction)(*batch.args())
    none = ReweightedCTCLoss(mode="none", reduction=reduction)(*batch.args())
    close(smoothed.detach(), none.detach())
    ctc = F.ctc_loss(*batch.args(), reduction=reduction)
    close(grad_of(smoothed.sum(), batch.logits), grad_of(ctc.sum(), batch.logits))


@pytest.mark.parametrize("kwargs", [dict(epsilon=-0.1), dict(epsilon=1.1), dict(reduction="avg")])
def test_smoothed_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        SmoothedCTCLoss(**kwargs)


# ----------------------------------------------------------------------------------------------------
# 4. Maximum-entropy CTC
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank_last", [False, True])
@pytest.mark.parametrize("concatenated", [False, True])
def test_ctc_path_entropy_matches_brute_force(blank_last, concatenated):
    batches = [random_batch(300 + 17 * seed + blank_last, blank_last=blank_last) for seed in range(6)]
    batches.append(fixed_batch(blank=3 if blank_last else 0))
    for batch in batches:
        log_probs = batch.log_probs.detach()
        nll, entropy = ctc_path_entropy(*batch.args(log_probs, concatenated), blank=batch.blank)
        expected_nll = [bf.ctc_nll(batch.sample(b, log_probs), row, batch.blank) for b, row in enumerate(batch.labels)]
        expected_h = [bf.path_entropy(batch.sample(b, log_probs), row, batch.blank) for b, row in enumerate(batch.labels)]
        close(nll, expected_nll)
        close(entropy, expected_h)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("blank_last", [False, True])
def test_max_entropy_beta_zero_is_ctc(reduction, blank_last):
    for seed in range(2):
        batch = random_batch(30 + seed + 5 * blank_last, blank_last=blank_last, feasible=True, requires_grad=True)
        got = MaxEntropyCTCLoss(beta=0.0, blank=batch.blank, reduction=reduction)(*batch.args())
        expected = F.ctc_loss(*batch.args(), blank=batch.blank, reduction=reduction)
        close(got, expected.detach())
        close(grad_of(got.sum(), batch.logits), grad_of(expected.sum(), batch.logits))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_max_entropy_value_and_exact_gradient(beta, reduction):
    batches = [random_batch(60 + seed, feasible=True, requires_grad=True) for seed in range(3)]
    batches.append(fixed_batch(requires_grad=True, blank=2))
    for batch in batches:
        got = MaxEntropyCTCLoss(beta=beta, blank=batch.blank, reduction=reduction)(*batch.args())
        log_probs = batch.log_probs.detach()
        expected_value = [
            (1 - beta) * bf.ctc_nll(batch.sample(b, log_probs), row, batch.blank)
            - beta * bf.path_entropy(batch.sample(b, log_probs), row, batch.blank)
            for b, row in enumerate(batch.labels)
        ]
        close(got.detach(), reduce_like_ctc(torch.tensor(expected_value, dtype=torch.float64), batch, reduction))
        # exact gradient from the differentiable enumeration
        terms = [bf.differentiable_nll_entropy(batch.sample(b), row, batch.blank) for b, row in enumerate(batch.labels)]
        exact = reduce_like_ctc(torch.stack([(1 - beta) * nll - beta * h for nll, h in terms]), batch, reduction)
        close(grad_of(got.sum(), batch.logits), grad_of(exact.sum(), batch.logits))


@pytest.mark.parametrize("beta", [0.3, 1.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_max_entropy_gradcheck(beta, reduction):
    targets = torch.tensor([[1, 2], [1, 1], [2, 0]])
    input_lengths, target_lengths = torch.tensor([4, 3, 2]), torch.tensor([2, 2, 1])
    logits = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    module = MaxEntropyCTCLoss(beta=beta, reduction=reduction)

    def loss(x):
        return module(x.log_softmax(-1), targets, input_lengths, target_lengths)

    assert torch.autograd.gradcheck(loss, (logits.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_max_entropy_double_backward_term_matters():
    """Treating gamma as a constant in H = -L - sum gamma log y gives a different (wrong) gradient."""
    batch = fixed_batch(requires_grad=True)
    beta = 0.5
    got = MaxEntropyCTCLoss(beta=beta, reduction="sum")(*batch.args())
    got_grad = grad_of(got, batch.logits)

    log_probs = batch.log_probs
    nll = F.ctc_loss(*batch.args(log_probs), reduction="none")
    approx_h = []
    for b, labels in enumerate(batch.labels):
        sample = batch.sample(b, log_probs)
        gamma = bf.posteriors(sample.detach(), labels, batch.blank)  # detached posteriors
        approx_h.append(-nll[b] - (gamma * sample).sum())
    approx = ((1 - beta) * nll - beta * torch.stack(approx_h)).sum()
    close(got.detach(), approx.detach())  # same value ...
    approx_grad = grad_of(approx, batch.logits)
    assert (got_grad - approx_grad).abs().max() > 1e-2  # ... different gradient

    terms = [bf.differentiable_nll_entropy(batch.sample(b), row, batch.blank) for b, row in enumerate(batch.labels)]
    exact = sum((1 - beta) * nll_b - beta * h for nll_b, h in terms)
    close(got_grad, grad_of(exact, batch.logits))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_max_entropy_under_no_grad(reduction):
    batch = fixed_batch(requires_grad=True)
    module = MaxEntropyCTCLoss(beta=0.4, reduction=reduction)
    with_grad = module(*batch.args())
    with torch.no_grad():
        without = module(*batch.args())
        plain = module(*batch.args(batch.log_probs.detach()))
    assert not without.requires_grad
    close(without, with_grad.detach())
    close(plain, with_grad.detach())
    # an input that does not require grad, under grad mode
    close(module(*batch.args(batch.log_probs.detach())), with_grad.detach())


def test_max_entropy_infeasible_values():
    batch = infeasible_batch()
    got = MaxEntropyCTCLoss(beta=0.5, reduction="none")(*batch.args())
    assert got[1] == math.inf
    nll, entropy = ctc_path_entropy(*batch.args())
    assert nll[1] == math.inf and entropy[1] == 0
    log_probs = batch.log_probs.detach()
    for b in (0, 2):
        sample = batch.sample(b, log_probs)
        expected = 0.5 * bf.ctc_nll(sample, batch.labels[b], 0) - 0.5 * bf.path_entropy(sample, batch.labels[b], 0)
        close(got[b].detach(), expected)


@pytest.mark.parametrize("beta", [-0.1, 1.1])
def test_max_entropy_rejects_bad_parameters(beta):
    with pytest.raises(ValueError):
        MaxEntropyCTCLoss(beta=beta)
    with pytest.raises(ValueError):
        MaxEntropyCTCLoss(reduction="avg")


# ----------------------------------------------------------------------------------------------------
# 5. Properties shared by every loss module
# ----------------------------------------------------------------------------------------------------


def masked_batch(fill: float, requires_grad: bool = True):
    """C = 5, blank 0; targets use classes 1 and 2 only; classes 3 and 4 get ``fill`` on most frames."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 3, 5, generator=generator)
    log_probs = logits.log_softmax(-1)
    mask = torch.zeros_like(log_probs, dtype=torch.bool)
    mask[:, :, 3] = True
    mask[1::2, :, 4] = True
    log_probs = log_probs.masked_fill(mask, fill).detach().requires_grad_(requires_grad)
    targets = torch.tensor([[1, 2, 1], [2, 2, 0], [1, 0, 0]])
    return log_probs, targets, torch.tensor([6, 5, 3]), torch.tensor([3, 2, 1])


@pytest.mark.parametrize(
    "name,fill",
    [(name, fill) for fill in (-math.inf, -1e30) for name in LOSS_NAMES
     if fill != -math.inf or name in MINUS_INF_SAFE_LOSS_NAMES],
)
def test_no_nan_with_minus_inf_or_huge_negative_log_probs(name, fill):
    log_probs, targets, input_lengths, target_lengths = masked_batch(fill)
    module = make_loss(name, reduction="none")
    value = module(log_probs, targets, input_lengths, target_lengths)
    assert not value.isnan().any()
    if name == "smoothed" and fill == -math.inf:
        # label smoothing puts epsilon / C on every class: cross-entropy with a zero-probability class is +inf
        assert (value == math.inf).all()
    else:
        assert value.isfinite().all()
    (grad,) = torch.autograd.grad(value.sum(), log_probs)
    assert not grad.isnan().any()
    assert grad.isfinite().all()
    # the masked classes are never on any alignment: their values must not change the loss
    clean_log_probs = masked_batch(-50.0)[0]
    if name != "smoothed":
        reference = module(clean_log_probs, targets, input_lengths, target_lengths)
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MINUS_INF_SAFE_LOSS_NAMES)
def test_no_nan_with_minus_inf_on_a_needed_class_at_some_frames(name):
    """-inf on blank at frame 0 and on label 1 at the last frame: still feasible, gradients must stay finite."""
    generator = torch.Generator().manual_seed(12)
    log_probs = torch.randn(5, 2, 3, generator=generator).log_softmax(-1)
    log_probs[0, :, 0] = -math.inf
    log_probs[4, :, 1] = -math.inf
    log_probs.requires_grad_()
    args = (log_probs, torch.tensor([[1, 2], [1, 1]]), torch.tensor([5, 4]), torch.tensor([2, 2]))
    value = make_loss(name, reduction="sum")(*args)
    if name == "smoothed":
        assert value == math.inf
    else:
        assert value.isfinite()
    (grad,) = torch.autograd.grad(value, log_probs)
    assert not grad.isnan().any(), grad


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_losses(name, dtype):
    batch = fixed_batch()
    log_probs = batch.log_probs.float()
    module = make_loss(name, reduction="none")
    half = log_probs.to(dtype).requires_grad_()
    got = module(*batch.args(half))
    assert got.dtype == torch.float32
    # same (rounded) input in float32: the same computation
    rounded = module(*batch.args(half.detach().float()))
    torch.testing.assert_close(got, rounded, rtol=1e-5, atol=1e-5)
    # and close to the unrounded float32 result
    torch.testing.assert_close(got.detach(), module(*batch.args(log_probs)), rtol=5e-2, atol=5e-2)
    (grad,) = torch.autograd.grad(got.sum(), half)
    assert grad.dtype == dtype and grad.isfinite().all()


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("blank_last", [False, True])
def test_concatenated_targets_equal_padded(name, blank_last):
    for seed in range(3):
        batch = random_batch(1000 + seed + 50 * blank_last, blank_last=blank_last, requires_grad=True)
        module = make_loss(name, blank=batch.blank, reduction="none", zero_infinity=True)
        padded = module(*batch.args())
        concatenated = module(*batch.args(concatenated=True))
        close(concatenated, padded)
        close(grad_of(concatenated.sum(), batch.logits), grad_of(padded.sum(), batch.logits))
        # lengths given as plain Python lists
        log_probs, targets, _, _ = batch.args()
        close(module(log_probs, targets, batch.input_lengths, batch.target_lengths), padded)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_reductions_are_consistent(name, zero_infinity):
    if zero_infinity:
        batch = infeasible_batch()
    else:  # mixed target lengths, including an empty target on an empty input (mean divides by max(len, 1))
        base = random_batch(77, feasible=True, batch=(1, 4))
        generator = torch.Generator().manual_seed(78)
        extra = torch.randn(base.logits.shape[0], 1, base.num_classes, generator=generator, dtype=torch.float64)
        batch = Batch(torch.cat([base.logits, extra], 1), base.labels + [[]], base.input_lengths + [0], base.blank)
    kwargs = dict(blank=batch.blank, zero_infinity=zero_infinity)
    none = make_loss(name, reduction="none", **kwargs)(*batch.args())
    total = make_loss(name, reduction="sum", **kwargs)(*batch.args())
    mean = make_loss(name, reduction="mean", **kwargs)(*batch.args())
    assert none.shape == (len(batch.labels),) and total.shape == mean.shape == ()
    close(total, none.sum())
    close(mean, reduce_like_ctc(none, batch, "mean"))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_frames_past_input_length_are_ignored(name):
    """Changing log-probs past each sample's input length changes neither the loss nor the other gradients."""
    batch = fixed_batch(requires_grad=True)  # input lengths 5, 4, 3, 2 of T = 5
    padding = torch.arange(5)[:, None] >= torch.tensor(batch.input_lengths)  # (T, B)
    noise = torch.randn(batch.logits.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    changed = torch.where(padding[..., None], 5 * noise, batch.logits.detach()).requires_grad_()
    module = make_loss(name, reduction="none")
    value = module(*batch.args())
    other = module(*Batch(changed, batch.labels, batch.input_lengths, 0).args())
    close(other.detach(), value.detach())
    grad, other_grad = grad_of(value.sum(), batch.logits), grad_of(other.sum(), changed)
    assert (grad[padding] == 0).all() and (other_grad[padding] == 0).all()
    close(other_grad, grad)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_modules_reject_bad_reduction(name):
    with pytest.raises(ValueError):
        make_loss(name, reduction="avg")


# ----------------------------------------------------------------------------------------------------
# Evaluation under inference_mode, and samples whose every alignment has probability 0
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_NAMES)
def test_losses_work_under_inference_mode(name):
    batch = fixed_batch()
    module = make_loss(name, reduction="mean", zero_infinity=True)
    expected = module(*batch.args())
    with torch.inference_mode():
        got = module(*batch.args())
    close(got, expected)


def zero_probability_batch(requires_grad: bool = True):
    """Sample 0 (target [1], 3 frames) is long enough but class 1 has log-prob -inf on every frame: p(l|x) = 0."""
    generator = torch.Generator().manual_seed(21)
    log_probs = torch.randn(3, 2, 3, generator=generator, dtype=torch.float64).log_softmax(-1)
    log_probs[:, 0, 1] = -math.inf
    args = (torch.tensor([[1], [2]]), torch.tensor([3, 3]), torch.tensor([1, 1]))
    return log_probs.requires_grad_(requires_grad), args


def zero_probability_params():
    for name in LOSS_NAMES:
        for zero_infinity in (False, True):
            yield pytest.param(name, zero_infinity, id=f"{name}-zero_infinity={zero_infinity}")


@pytest.mark.parametrize("name,zero_infinity", list(zero_probability_params()))
def test_zero_probability_sample_behaves_like_ctc(name, zero_infinity):
    """No alignment with positive probability: like F.ctc_loss, inf, or 0 with zero gradient (never NaN)."""
    log_probs, args = zero_probability_batch()
    expected = F.ctc_loss(log_probs, *args, reduction="none", zero_infinity=zero_infinity)
    assert expected[0] == (0 if zero_infinity else math.inf)
    value = make_loss(name, reduction="none", zero_infinity=zero_infinity)(log_probs, *args)
    assert value[0] == expected[0], value
    assert value[1].isfinite()
    if zero_infinity:
        (grad,) = torch.autograd.grad(value.sum(), log_probs)
        assert not grad.isnan().any(), grad
        assert (grad[:, 0] == 0).all()


@pytest.mark.parametrize("make", [
    lambda **kw: FocalCTCLoss(**kw), lambda **kw: ReweightedCTCLoss(**kw), lambda **kw: SmoothedCTCLoss(**kw),
    lambda **kw: MaxEntropyCTCLoss(**kw), lambda **kw: PythonCTCLoss(**kw),
    lambda **kw: PythonCTCLoss(backward="autograd", **kw),
], ids=["focal", "reweighted", "smoothed", "maxent", "python_ctc", "python_ctc_autograd"])
def test_every_loss_keeps_a_corrupt_sample_to_itself(make):
    """A NaN in sample 1's log-probs: its loss is inf (0 under zero_infinity) with zero gradient; the other samples
    get exactly the losses and gradients the module gives them in a batch without sample 1."""
    batch = random_batch(11, frames=8, classes=5, batch=4, max_label_len=3, feasible=True, min_input_length=1)
    log_probs, targets, input_lengths, target_lengths = batch.args()
    log_probs = log_probs.detach()
    keep = [0, 2, 3]
    alone = log_probs[:, keep].clone().requires_grad_()
    expected = make(reduction="none")(alone, targets[keep], input_lengths[keep], target_lengths[keep])
    (expected_grad,) = torch.autograd.grad(expected.sum(), alone)
    for zero_infinity in (False, True):
        broken = log_probs.clone()
        broken[0, 1, 1] = float("nan")
        leaf = broken.requires_grad_()
        losses = make(reduction="none", zero_infinity=zero_infinity)(leaf, targets, input_lengths, target_lengths)
        assert losses[1].item() == (0.0 if zero_infinity else math.inf)
        close(losses[keep].detach(), expected.detach())
        (grad,) = torch.autograd.grad(losses.masked_fill(losses.isinf(), 0.0).sum(), leaf)
        assert grad.isfinite().all() and (grad[:, 1] == 0).all()
        close(grad[:, keep], expected_grad)


# ----------------------------------------------------------------------------------------------------
# State-space targets: the same numbers as the dense (T, B, C) formulation they replaced
# ----------------------------------------------------------------------------------------------------
# The dense formulas below are the pre-state-space implementation, kept here as the reference: γ (T, B, C)
# read off the built-in F.ctc_loss's gradient (ctc_alignment_targets), modified per class, cross-entropy
# against every class.


def kept_grad_of(value: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """Gradient that keeps the graph: a loss and its reference share ``batch.args()``'s log_softmax."""
    return torch.autograd.grad(value, wrt, retain_graph=True)[0]


def dense_reweight(gamma, padded, target_lengths, blank, alpha, mode):
    if mode == "none":
        return gamma
    is_blank = torch.arange(gamma.shape[2]) == blank
    if mode == "plain":
        weights = torch.tensor([1.0 - alpha, alpha], dtype=gamma.dtype)
        return gamma * torch.where(is_blank, weights[0], weights[1])
    inside = torch.arange(padded.shape[1]) < target_lengths[:, None]
    counts = torch.zeros(padded.shape[0], gamma.shape[2], dtype=gamma.dtype).scatter_add_(1, padded, inside.to(gamma.dtype))
    wanted = torch.where(is_blank, ((1.0 - alpha) / alpha * target_lengths.to(gamma.dtype))[:, None], counts)
    mass = gamma.sum(0)
    scale = torch.where(mass > 0, wanted / mass.clamp_min(1e-300), torch.zeros_like(mass))
    scale = torch.where((target_lengths > 0)[:, None], scale, torch.ones_like(scale))
    reweighted = gamma * scale
    frame_mass = reweighted.sum(2, keepdim=True)
    return torch.where(frame_mass > 0, reweighted / frame_mass.clamp_min(1e-300), reweighted)


def dense_smooth(gamma, epsilon):
    has_target = gamma.sum(2, keepdim=True) > 0
    return torch.where(has_target, (1.0 - epsilon) * gamma + epsilon / gamma.shape[2], gamma)


def dense_alignment_loss(log_probs, padded, input_lengths, target_lengths, blank, target_of, zero_infinity):
    """(B,) dense cross-entropy against ``target_of(γ)``; inf (0 with zero_infinity) where p(target) = 0."""
    gamma = ctc_alignment_targets(log_probs, padded, input_lengths, target_lengths, blank=blank, ctc_loss=F.ctc_loss)
    nll = F.ctc_loss(log_probs.detach().log_softmax(-1), padded, input_lengths, target_lengths, blank=blank,
                     reduction="none")
    target = target_of(gamma)
    cross_entropy = -torch.where(target > 0, target * log_probs, torch.zeros_like(log_probs)).sum((0, 2))
    losses = torch.where(nll.isfinite(), cross_entropy, torch.full_like(cross_entropy, math.inf))
    return torch.where(losses.isinf(), torch.zeros_like(losses), losses) if zero_infinity else losses


def dense_path_entropy(log_probs, padded, input_lengths, target_lengths, blank):
    """The pre-state-space ctc_path_entropy: γ (T, B, C) from the autograd-mode CTC by double backward."""
    nll = ctc_loss(log_probs, padded, input_lengths, target_lengths, blank=blank, reduction="none", backward="autograd")
    feasible = nll.isfinite()
    finite_nll = torch.where(feasible, nll, torch.zeros_like(nll))
    (neg_gamma,) = torch.autograd.grad(finite_nll.sum(), log_probs, create_graph=True)
    products = neg_gamma * torch.where(neg_gamma < 0, log_probs, torch.zeros_like(log_probs))
    return nll, torch.where(feasible, products.sum((0, 2)) - finite_nll, torch.zeros_like(nll))


def state_space_batches():
    """Random float64 batches: repeats, blank 0 and C - 1, shorter inputs, infeasible samples, and one with
    C = 8000 classes (the large-charset path: emissions gathered once) at a small T."""
    batches = [random_batch(4100 + seed, frames=(3, 9), classes=(3, 7), batch=(2, 5), max_label_len=4,
                            repeats=seed % 2 == 0, blank_last=seed % 3 == 1, requires_grad=True) for seed in range(6)]
    big = random_batch(4200, frames=10, classes=8000, batch=4, max_label_len=5, repeats=True, blank_last=True,
                       requires_grad=True)
    return batches + [big]


STATE_SPACE_CASES = [
    ("reweighted balanced", lambda **k: ReweightedCTCLoss(alpha=0.3, mode="balanced", **k),
     lambda g, p, tl, blank: dense_reweight(g, p, tl, blank, 0.3, "balanced")),
    ("reweighted plain", lambda **k: ReweightedCTCLoss(alpha=0.7, mode="plain", **k),
     lambda g, p, tl, blank: dense_reweight(g, p, tl, blank, 0.7, "plain")),
    ("reweighted none", lambda **k: ReweightedCTCLoss(mode="none", **k), lambda g, p, tl, blank: g),
    ("smoothed", lambda **k: SmoothedCTCLoss(epsilon=0.2, **k), lambda g, p, tl, blank: dense_smooth(g, 0.2)),
    ("smoothed eps 0", lambda **k: SmoothedCTCLoss(epsilon=0.0, **k), lambda g, p, tl, blank: dense_smooth(g, 0.0)),
    ("smoothed eps 1", lambda **k: SmoothedCTCLoss(epsilon=1.0, **k), lambda g, p, tl, blank: dense_smooth(g, 1.0)),
]


@pytest.mark.parametrize("name,make,dense_target", STATE_SPACE_CASES, ids=[case[0] for case in STATE_SPACE_CASES])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_state_space_targets_equal_the_dense_implementation(name, make, dense_target, zero_infinity):
    for batch in state_space_batches():
        log_probs, padded, input_lengths, target_lengths = batch.args()
        module = make(blank=batch.blank, reduction="none", zero_infinity=zero_infinity)
        assert not module.uses_dense_targets()
        got = module(log_probs, padded, input_lengths, target_lengths)
        expected = dense_alignment_loss(
            log_probs, padded, input_lengths, target_lengths, batch.blank,
            lambda gamma: dense_target(gamma, padded[:, : max(batch.target_lengths, default=0)],
                                       torch.tensor(batch.target_lengths), batch.blank),
            zero_infinity,
        )
        close(got.detach(), expected.detach(), rtol=1e-9)
        finite = got.isfinite()
        if finite.any():
            close(kept_grad_of(got[finite].sum(), batch.logits), kept_grad_of(expected[finite].sum(), batch.logits), rtol=1e-9)


def test_max_entropy_in_state_space_equals_the_dense_double_backward():
    for batch in state_space_batches():
        args = batch.args()
        nll, entropy = ctc_path_entropy(*args, blank=batch.blank)
        dense_nll, dense_entropy = dense_path_entropy(*args, blank=batch.blank)
        close(nll.detach(), dense_nll.detach())
        close(entropy.detach(), dense_entropy.detach(), rtol=1e-9)
        finite = nll.isfinite()
        if finite.any():
            got = kept_grad_of(entropy[finite].sum(), batch.logits)
            close(got, kept_grad_of(dense_entropy[finite].sum(), batch.logits), rtol=1e-9)


@pytest.mark.parametrize("name", ["python_ctc", "python_ctc_autograd", "focal_ctc"])
def test_large_charset_ctc_losses_match_the_builtin(name):
    """C = 8000 (the gather-once emission path) against F.ctc_loss, value and gradient, float64."""
    batch = random_batch(4300, frames=12, classes=8000, batch=5, max_label_len=5, repeats=True, blank_last=True,
                         requires_grad=True)
    options = dict(blank=batch.blank, reduction="none", zero_infinity=True)  # the built-in's inf loss has NaN gradient
    make = {"python_ctc": lambda: PythonCTCLoss(**options),
            "python_ctc_autograd": lambda: PythonCTCLoss(backward="autograd", **options),
            "focal_ctc": lambda: FocalCTCLoss(gamma=0.0, **options)}[name]
    got = make()(*batch.args())
    expected = F.ctc_loss(*batch.args(), **options)
    assert (expected == 0).any() and (expected > 0).any()  # an infeasible sample and feasible ones
    close(got.detach(), expected.detach(), rtol=1e-9)
    close(kept_grad_of(got.sum(), batch.logits), kept_grad_of(expected.sum(), batch.logits), rtol=1e-7)


def test_a_transform_override_takes_the_dense_path_with_the_same_numbers():
    class Identity(ReweightedCTCLoss):
        def transform(self, gamma, checked):
            return gamma

    batch = state_space_batches()[0]
    dense = Identity(mode="none", blank=batch.blank, reduction="none")
    assert dense.uses_dense_targets()
    assert ReweightedCTCLoss(ctc=F.ctc_loss).uses_dense_targets()
    state = ReweightedCTCLoss(mode="none", blank=batch.blank, reduction="none")
    got, expected = dense(*batch.args()), state(*batch.args())
    close(got.detach(), expected.detach(), rtol=1e-9)
    close(kept_grad_of(got[got.isfinite()].sum(), batch.logits), kept_grad_of(expected[got.isfinite()].sum(), batch.logits))
