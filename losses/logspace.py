"""Log-space sums that stay NaN-free where every term is ``-inf`` (value ``-inf``, gradient 0), twice differentiable."""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``logsumexp`` over ``dim`` that is ``-inf`` with zero gradient (not NaN) where every input is ``-inf``.

    Differentiable any number of times (the running max is a detached constant).
    """
    peak = x.detach().amax(dim, keepdim=True)
    alive = peak > NEG_INF
    peak = torch.where(alive, peak, torch.zeros_like(peak))
    return _guarded_log((x - peak).exp().sum(dim), peak.squeeze(dim), alive.squeeze(dim))


def safe_logaddexp3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log(e^a + e^b + e^c)``; ``-inf`` with zero gradient (not NaN) where all three are ``-inf``.

    Three same-shape tensors rather than one reduction over a size-3 axis: elementwise kernels on
    contiguous rows are several times faster on CPU than a strided reduction. Exponents are clamped at
    ``log(tiny)`` so ``exp`` never makes denormals (~7x slower on CPU; what that drops is below the
    dtype's resolution).
    """
    peak = torch.maximum(torch.maximum(a, b), c).detach()
    alive = peak > NEG_INF
    peak = torch.where(alive, peak, torch.zeros_like(peak))
    floor = math.log(torch.finfo(a.dtype).tiny) + 1.0
    total = sum((x - peak).clamp_min(floor).exp() for x in (a, b, c))
    return _guarded_log(total, peak, alive)


def _guarded_log(total: torch.Tensor, peak: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``log(total) + peak`` where ``alive``, else ``-inf``; the gradient is zero (not NaN) where not alive."""
    safe_total = torch.where(alive, total, torch.ones_like(total))
    return torch.where(alive, safe_total.log() + peak, torch.full_like(total, NEG_INF))
