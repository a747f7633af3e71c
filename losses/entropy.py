"""Maximum-entropy CTC (Liu et al., NeurIPS 2018, "Connectionist Temporal Classification with Maximum
Entropy Regularization", EnCTC): ``(1 - beta) · L - beta · H``.

``H`` is the entropy of the path posterior ``P(π | l, x)``. Since ``log P(π|l,x) = Σ_t log y_t(π_t) + L``,

    H = -L - Σ_t Σ_c γ_tc · log y_tc

with ``γ`` the per-frame posteriors. ``γ`` is itself ``-dL/dlog y``, so the exact gradient of ``H`` needs
``γ``'s derivative: we take ``γ`` from the autograd-mode CTC with ``create_graph=True`` (double backward), per
state of the blank-interleaved target (``Σ_c γ_tc log y_tc = Σ_s γ_t(s) log y_t(z_s)``), so neither ``γ`` nor its
graph is ever ``(T, B, C)``: only the log-probs' own gradient is.
"""

from __future__ import annotations

import torch

from losses.base import CTCLossBase, compute_dtype
from losses.ctc import alpha_recursion_autograd, corrupt_samples
from losses.logspace import NEG_INF
from losses.targets import CheckedTargets, check_ctc_arguments, extended_targets


def ctc_path_entropy(log_probs, targets, input_lengths, target_lengths, blank: int = 0):
    """CTC negative log-likelihood and path-posterior entropy per sample, both differentiable twice over.

    Args:
        log_probs: ``(T, B, C)`` log-probabilities (normalised per frame).
        targets, input_lengths, target_lengths, blank: as for :func:`torch.nn.functional.ctc_loss`.
    Returns:
        ``(nll, entropy)``, each ``(B,)``; infeasible samples give ``nll = inf`` and ``entropy = 0``.
    """
    checked = check_ctc_arguments(log_probs, targets, input_lengths, target_lengths, blank)
    states, can_skip = extended_targets(checked.padded, blank)
    differentiable = torch.is_grad_enabled() and log_probs.requires_grad
    with torch.inference_mode(False), torch.enable_grad():
        if not differentiable:  # e.g. validation under no_grad / inference_mode: values only
            log_probs = log_probs.detach().clone().requires_grad_()  # clones: inference tensors can't be saved
            checked = CheckedTargets(*(tensor.clone() for tensor in checked))
            states, can_skip = states.clone(), can_skip.clone()
        # γ per state: -dL/d(state log-probs), (T, B, N); never a (T, B, C) γ or its graph
        state_log_probs = log_probs.gather(2, states.expand(log_probs.shape[0], -1, -1))
        log_likelihood = alpha_recursion_autograd(
            state_log_probs.nan_to_num(0.0, 0.0, NEG_INF), can_skip, checked.input_lengths, checked.target_lengths
        )  # state_log_probs itself is needed below (γ is the gradient w.r.t. it)
        corrupt = corrupt_samples(log_probs, checked.input_lengths)
        nll = torch.where(corrupt, torch.inf, -log_likelihood)
        feasible = nll.isfinite()
        finite_nll = torch.where(feasible, nll, torch.zeros_like(nll))
        (neg_gamma,) = torch.autograd.grad(finite_nll.sum(), state_log_probs, create_graph=differentiable)
    # -γ·log y, with 0·log 0 = 0; masking log y (not the product) keeps its gradient w.r.t. γ finite too
    finite_log_probs = torch.where(neg_gamma < 0, state_log_probs, torch.zeros_like(state_log_probs))
    products = neg_gamma * finite_log_probs
    entropy = torch.where(feasible, products.sum((0, 2)) - finite_nll, torch.zeros_like(nll))
    return nll, entropy


class MaxEntropyCTCLoss(CTCLossBase):
    """EnCTC: ``(1 - beta) · L - beta · H`` per sample; ``beta = 0`` is plain CTC.

    Rewarding entropy spreads the path posterior over more alignments, countering CTC's peaky,
    over-confident alignments. ``forward`` takes :func:`torch.nn.functional.ctc_loss`'s tensors;
    ``reduction`` and ``zero_infinity`` behave as there. Costs one double backward through the
    autograd-mode CTC, so it is several times slower than plain CTC.
    """

    def __init__(self, beta: float = 0.2, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"MaxEntropyCTCLoss beta must be in [0, 1], got {beta}")
        super().__init__(blank, reduction, zero_infinity)
        self.beta = beta

    def forward(self, log_probs, targets, input_lengths, target_lengths) -> torch.Tensor:
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        nll, entropy = ctc_path_entropy(log_probs, targets, input_lengths, target_lengths, self.blank)
        finite_nll = torch.where(nll.isfinite(), nll, torch.zeros_like(nll))
        losses = torch.where(nll.isfinite(), (1.0 - self.beta) * finite_nll - self.beta * entropy, nll)
        return self.finish(losses, target_lengths)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, {super().extra_repr()}"
