"""CTC forward/backward timing: built-in vs. the pure-PyTorch CTC in both backward modes.

Reproduces the table of the primer this project grew from (``T=128, B=256, C=32``, target length 60,
time-major, ``randint(1, C)`` targets). For each implementation: forward and backward time (one warm-up
round, then the median of ``--repeats`` rounds; the implementations take turns within each round, so a
slow spell of a shared machine hits all alike; CUDA synchronised), whether loss and gradient w.r.t. the
logits match the float64 built-in (max abs error printed), whether cross-entropy against the alignment
targets has CTC's gradient, and each time as a ratio to the built-in measured in the same run.

    python scripts/bench_ctc.py                 # CPU, and CUDA when present
    python scripts/bench_ctc.py --device cpu --repeats 9
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from losses import ctc_alignment_targets, ctc_loss

LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-3
IMPLEMENTATIONS = {
    "built-in": F.ctc_loss,
    "autograd": functools.partial(ctc_loss, backward="autograd"),
    "alpha-beta": functools.partial(ctc_loss, backward="alpha_beta"),
}


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(args.frames, args.batch, args.classes, generator=generator).to(device)
    targets = torch.randint(1, args.classes, (args.batch, args.target_length), generator=generator).to(device)
    input_lengths = torch.full((args.batch,), args.frames, dtype=torch.long, device=device)
    target_lengths = torch.full((args.batch,), args.target_length, dtype=torch.long, device=device)
    return logits, targets, input_lengths, target_lengths


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(loss_fn, log_probs, rest, device):
    """Forward and backward seconds of one ``loss_fn(log_probs, *rest)`` (reduction sum) w.r.t. ``log_probs``."""
    leaf = log_probs.detach().requires_grad_()
    synchronize(device)
    start = time.perf_counter()
    loss = loss_fn(leaf, *rest, reduction="sum")
    synchronize(device)
    middle = time.perf_counter()
    loss.backward()
    synchronize(device)
    return middle - start, time.perf_counter() - middle


def time_all(log_probs, rest, device, repeats):
    """``{name: (median fwd s, median bwd s)}``, the implementations timed round-robin (one warm-up round),
    so a slow spell of a shared machine hits all of them alike and the ratios stay fair."""
    times = {name: [] for name in IMPLEMENTATIONS}
    for run in range(repeats + 1):
        for name, loss_fn in IMPLEMENTATIONS.items():
            measured = time_once(loss_fn, log_probs, rest, device)
            if run:
                times[name].append(measured)
    return {name: tuple(statistics.median(column) for column in zip(*runs)) for name, runs in times.items()}


def logits_gradient(loss_fn, logits, rest):
    """Loss (sum) and its gradient w.r.t. the logits, through ``log_softmax`` (convention-free)."""
    leaf = logits.detach().requires_grad_()
    loss = loss_fn(leaf.log_softmax(-1), *rest, reduction="sum")
    return loss.detach(), torch.autograd.grad(loss, leaf)[0]


def cross_entropy_gradient(loss_fn, logits, rest):
    """Gradient w.r.t. the logits of ``-sum gamma * log_softmax(logits)``, gamma from ``loss_fn``'s gradient."""
    gamma = ctc_alignment_targets(logits.log_softmax(-1), *rest, ctc_loss=loss_fn)
    leaf = logits.detach().requires_grad_()
    loss = -(gamma * leaf.log_softmax(-1)).sum()
    return torch.autograd.grad(loss, leaf)[0]


def run(device, args):
    logits, *rest = make_inputs(args, device)
    log_probs = logits.log_softmax(-1)
    # float64 built-in as the reference: the float32 built-in itself is off by ~2e-4 in the gradient here
    reference_loss, reference_grad = logits_gradient(F.ctc_loss, logits.double(), rest)
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})"
    print(f"\nDevice: {device}{threads}")
    print(f"Log-probs shape (time x batch x classes): {tuple(logits.shape)}, target length {args.target_length}")
    print(f"matches: loss rtol {LOSS_RTOL:g}, gradients w.r.t. logits atol {GRAD_ATOL:g}, vs. float64 built-in")
    header = (f"{'implementation':<12} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} {'ratio':>7}  "
              f"{'loss':<5} {'grad':<5} {'CE-grad':<7} {'max grad err':>12}")
    print(header)
    print("-" * len(header))
    times = time_all(log_probs, rest, device, args.repeats)
    builtin_total = sum(times["built-in"])
    for name, loss_fn in IMPLEMENTATIONS.items():
        fwd, bwd = times[name]
        loss, grad = logits_gradient(loss_fn, logits, rest)
        grad_error = (grad.double() - reference_grad).abs().max().item()
        loss_ok = torch.allclose(loss.double(), reference_loss, rtol=LOSS_RTOL)
        ce_grad = cross_entropy_gradient(loss_fn, logits, rest).double()
        ce_ok = torch.allclose(ce_grad, reference_grad, atol=GRAD_ATOL)
        print(
            f"{name:<12} {fwd * 1e3:9.2f} {bwd * 1e3:9.2f} {(fwd + bwd) * 1e3:11.2f} "
            f"{(fwd + bwd) / builtin_total:6.2f}x  {loss_ok!s:<5} {grad_error <= GRAD_ATOL!s:<5} {ce_ok!s:<7} "
            f"{grad_error:12.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--target-length", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    print(f"torch {torch.__version__}")
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("\nDevice: cuda not available, skipped")
            continue
        run(torch.device(name), args)


if __name__ == "__main__":
    main()
