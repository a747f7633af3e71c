"""CTC forward/backward timing: built-in vs. the pure-PyTorch CTC in both backward modes, or every loss module.

Reproduces the table of the primer this project grew from (``T=128, B=256, C=32``, target length 60,
time-major, ``randint(1, C)`` targets). Every timing is of ``loss(logits.log_softmax(-1), ...)`` forward and
backward w.r.t. the logits (``log_softmax`` included in every row; one warm-up round, then the median of
``--repeats`` rounds; the implementations take turns within each round, so a slow spell of a shared machine
hits all alike; CUDA synchronised), each time also as a ratio to the built-in measured in the same run.

``--losses primer`` (default): the built-in, ``ctc_loss(backward="autograd")`` and ``ctc_loss(backward=
"alpha_beta")``; whether loss and gradient w.r.t. the logits match the float64 built-in (max abs error printed)
and whether cross-entropy against the alignment targets has CTC's gradient.

``--losses all``: every loss module (the ``conf/loss`` options, ``reduction="sum"``), and the peak resident
memory its forward + backward adds (``VmHWM`` of a fresh subprocess per loss, reset after the inputs are made;
Linux), as a ratio to the built-in's. ``--profile`` prints where alpha-beta's time goes (``torch.profiler``).

    python scripts/bench_ctc.py                 # CPU, and CUDA when present
    python scripts/bench_ctc.py --device cpu --repeats 9
    python scripts/bench_ctc.py --device cpu --logit-scale 10   # sharp logits: some samples fall back to log space
    python scripts/bench_ctc.py --device cpu --losses all --classes 8000 --frames 100 --batch 32 --target-length 30
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from losses import (
    CTCLoss,
    FocalCTCLoss,
    MaxEntropyCTCLoss,
    PythonCTCLoss,
    ReweightedCTCLoss,
    SmoothedCTCLoss,
    ctc_alignment_targets,
    ctc_loss,
)
from losses.scaled_alpha_beta import scaled_state_posteriors
from losses.targets import extended_targets

LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-3
IMPLEMENTATIONS = {
    "built-in": functools.partial(F.ctc_loss, reduction="sum"),
    "autograd": functools.partial(ctc_loss, backward="autograd", reduction="sum"),
    "alpha-beta": functools.partial(ctc_loss, backward="alpha_beta", reduction="sum"),
}
LOSS_MODULES = {  # named like their conf/loss options; the built-in first (the reference)
    "ctc": lambda: CTCLoss(reduction="sum"),
    "python_ctc": lambda: PythonCTCLoss(reduction="sum"),
    "python_ctc_autograd": lambda: PythonCTCLoss(backward="autograd", reduction="sum"),
    "focal_ctc": lambda: FocalCTCLoss(reduction="sum"),
    "reweighted_ctc": lambda: ReweightedCTCLoss(reduction="sum"),
    "smoothed_ctc": lambda: SmoothedCTCLoss(reduction="sum"),
    "maxent_ctc": lambda: MaxEntropyCTCLoss(reduction="sum"),
}
ROOT = Path(__file__).resolve().parents[1]


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(args.frames, args.batch, args.classes, generator=generator).mul_(args.logit_scale).to(device)
    targets = torch.randint(1, args.classes, (args.batch, args.target_length), generator=generator).to(device)
    input_lengths = torch.full((args.batch,), args.frames, dtype=torch.long, device=device)
    target_lengths = torch.full((args.batch,), args.target_length, dtype=torch.long, device=device)
    return logits, targets, input_lengths, target_lengths


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(loss_fn, logits, rest, device):
    """Forward and backward seconds of ``loss_fn(logits.log_softmax(-1), *rest)`` (a scalar) w.r.t. the logits."""
    leaf = logits.detach().requires_grad_()
    synchronize(device)
    start = time.perf_counter()
    loss = loss_fn(leaf.log_softmax(-1), *rest)
    synchronize(device)
    middle = time.perf_counter()
    loss.backward()
    synchronize(device)
    return middle - start, time.perf_counter() - middle


def time_all(implementations, logits, rest, device, repeats):
    """``{name: (median fwd s, median bwd s)}``, the implementations timed round-robin (one warm-up round),
    so a slow spell of a shared machine hits all of them alike and the ratios stay fair."""
    times = {name: [] for name in implementations}
    for run in range(repeats + 1):
        for name, loss_fn in implementations.items():
            measured = time_once(loss_fn, logits, rest, device)
            if run:
                times[name].append(measured)
    return {name: tuple(statistics.median(column) for column in zip(*runs)) for name, runs in times.items()}


def logits_gradient(loss_fn, logits, rest):
    """Loss (sum) and its gradient w.r.t. the logits, through ``log_softmax`` (convention-free)."""
    leaf = logits.detach().requires_grad_()
    loss = loss_fn(leaf.log_softmax(-1), *rest)
    return loss.detach(), torch.autograd.grad(loss, leaf)[0]


def cross_entropy_gradient(loss_fn, logits, rest):
    """Gradient w.r.t. the logits of ``-sum gamma * log_softmax(logits)``, gamma from ``loss_fn``'s gradient."""
    gamma = ctc_alignment_targets(logits.log_softmax(-1), *rest, ctc_loss=loss_fn)
    leaf = logits.detach().requires_grad_()
    loss = -(gamma * leaf.log_softmax(-1)).sum()
    return torch.autograd.grad(loss, leaf)[0]


def describe(device, logits, args):
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})"
    print(f"\nDevice: {device}{threads}")
    print(f"Log-probs shape (time x batch x classes): {tuple(logits.shape)}, target length {args.target_length}")


def run_primer(device, args):
    logits, *rest = make_inputs(args, device)
    # float64 built-in as the reference: the float32 built-in itself is off by ~2e-4 in the gradient here
    reference_loss, reference_grad = logits_gradient(IMPLEMENTATIONS["built-in"], logits.double(), rest)
    describe(device, logits, args)
    print(f"matches: loss rtol {LOSS_RTOL:g}, gradients w.r.t. logits atol {GRAD_ATOL:g}, vs. float64 built-in")
    header = (f"{'implementation':<12} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} {'ratio':>7}  "
              f"{'loss':<5} {'grad':<5} {'CE-grad':<7} {'max grad err':>12}")
    print(header)
    print("-" * len(header))
    times = time_all(IMPLEMENTATIONS, logits, rest, device, args.repeats)
    builtin_total = sum(times["built-in"])
    for name, loss_fn in IMPLEMENTATIONS.items():
        fwd, bwd = times[name]
        loss, grad = logits_gradient(loss_fn, logits, rest)
        grad_error = (grad.double() - reference_grad).abs().max().item()
        loss_ok = torch.allclose(loss.double(), reference_loss, rtol=LOSS_RTOL)
        ce_grad = cross_entropy_gradient(functools.partial(loss_fn, reduction="none"), logits, rest).double()
        ce_ok = torch.allclose(ce_grad, reference_grad, atol=GRAD_ATOL)
        print(
            f"{name:<12} {fwd * 1e3:9.2f} {bwd * 1e3:9.2f} {(fwd + bwd) * 1e3:11.2f} "
            f"{(fwd + bwd) / builtin_total:6.2f}x  {loss_ok!s:<5} {grad_error <= GRAD_ATOL!s:<5} {ce_ok!s:<7} "
            f"{grad_error:12.2e}"
        )
    print(f"alpha-beta: {recomputed_in_log_space(logits, rest)} of {logits.shape[1]} samples recomputed in log space "
          "(scaled recursion's underflow bound above eps)")


def recomputed_in_log_space(logits, rest) -> int:
    """How many samples :func:`losses.alpha_beta.ctc_state_posteriors` does not trust to the scaled recursion."""
    targets, input_lengths, target_lengths = rest
    states, can_skip = extended_targets(targets, 0)
    _, _, trusted = scaled_state_posteriors(logits.log_softmax(-1), states, can_skip, input_lengths, target_lengths)
    return int((~trusted).sum())


def shape_options(args) -> list[str]:
    threads = [f"--threads={args.threads}"] if args.threads else []
    return threads + [f"--logit-scale={args.logit_scale}", f"--frames={args.frames}", f"--batch={args.batch}", f"--classes={args.classes}",
            f"--target-length={args.target_length}", f"--seed={args.seed}"]


def peak_rss_added_mib(name: str, args) -> float:
    """MiB of peak resident memory that one forward + backward of loss ``name`` adds, on the CPU, measured in a
    fresh interpreter (no allocator caches or earlier peaks of other losses)."""
    command = [sys.executable, "-m", "scripts.bench_ctc", "--memory-of", name, *shape_options(args)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(result.stdout.split()[-1])


def peak_rss_kib() -> int:
    """This process's peak resident set size (``VmHWM``), KiB. Not ``ru_maxrss``: that keeps the peak of the
    parent that forked this process (Linux carries it across ``exec``), which can mask what the loss adds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def report_memory_of(name: str, args) -> None:
    """The subprocess side of :func:`peak_rss_added_mib`: prints the MiB added by one forward + backward.

    The peak is reset once the inputs exist (``5 > /proc/self/clear_refs`` resets ``VmHWM`` to the current RSS),
    so neither importing torch (a transient peak above what the losses add) nor making the inputs counts.
    """
    logits, *rest = make_inputs(args, torch.device("cpu"))
    loss_fn = LOSS_MODULES[name]()
    leaf = logits.requires_grad_()
    Path("/proc/self/clear_refs").write_text("5")
    before = peak_rss_kib()
    loss_fn(leaf.log_softmax(-1), *rest).backward()
    print((peak_rss_kib() - before) / 1024)


def run_all_losses(device, args):
    logits, *rest = make_inputs(args, device)
    describe(device, logits, args)
    modules = {name: make() for name, make in LOSS_MODULES.items()}
    times = time_all(modules, logits, rest, device, args.repeats)
    memory = {name: peak_rss_added_mib(name, args) for name in modules} if device.type == "cpu" else {}
    header = (f"{'loss':<20} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} {'time':>7} "
              f"{'peak MiB':>9} {'memory':>7}")
    print("fwd+bwd of log_softmax + loss; time and memory as ratios to the built-in (ctc); memory: peak RSS added")
    print(header)
    print("-" * len(header))
    builtin_total, builtin_mib = sum(times["ctc"]), memory.get("ctc", float("nan"))
    for name in modules:
        fwd, bwd = times[name]
        mib = memory.get(name, float("nan"))
        memory_ratio = mib / builtin_mib if builtin_mib > 0 else float("nan")
        print(f"{name:<20} {fwd * 1e3:9.2f} {bwd * 1e3:9.2f} {(fwd + bwd) * 1e3:11.2f} "
              f"{(fwd + bwd) / builtin_total:6.2f}x {mib:9.1f} {memory_ratio:6.2f}x")


def profile_alpha_beta(device, args):
    """Where one forward + backward of alpha-beta mode spends its time, by PyTorch op (self time)."""
    from torch.profiler import ProfilerActivity, profile

    logits, *rest = make_inputs(args, device)
    loss_fn = IMPLEMENTATIONS["alpha-beta"]
    time_once(loss_fn, logits, rest, device)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        time_once(loss_fn, logits, rest, device)
    print(f"\nProfile of alpha-beta fwd+bwd ({tuple(logits.shape)}, {device}), by self CPU time:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--losses", choices=["primer", "all"], default="primer",
                        help="primer: built-in vs. our two CTC modes, with correctness columns; all: every loss "
                             "module, with peak memory")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--target-length", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="logits are N(0, 1) times this; sharp logits and random labels make the scaled "
                             "alpha-beta fall back to log space for more samples")
    parser.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also profile alpha-beta mode by op")
    parser.add_argument("--memory-of", choices=list(LOSS_MODULES), help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        report_memory_of(args.memory_of, args)
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    print(f"torch {torch.__version__}")
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("\nDevice: cuda not available, skipped")
            continue
        (run_all_losses if args.losses == "all" else run_primer)(torch.device(name), args)
        if args.profile:
            profile_alpha_beta(torch.device(name), args)


if __name__ == "__main__":
    main()
