"""Time greedy and prefix beam-search CTC decoding against pyctcdecode (no language model).

Example::

    python scripts/bench_decode.py --lines 256 --frames 32 --classes 11 --beam-width 10 --repeats 5

pyctcdecode is a benchmark-only dependency (``pip install pyctcdecode``, or the ``bench`` extra);
without it only our decoders are timed. Its pruning is made permissive so that it, like ours,
considers every class at every frame: ``token_min_logp=-inf`` (no class is skipped) and
``beam_prune_logp=-inf`` (no beam is dropped for trailing the best by a margin).
"""

from __future__ import annotations

import argparse
import statistics
import string
import time
from collections.abc import Callable

import torch

from crnn.decoding import beam_search, greedy_decode

SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256, help="text lines in the batch (B)")
    parser.add_argument("--frames", type=int, default=32, help="frames per line (T)")
    parser.add_argument("--classes", type=int, default=11, help="classes including the blank (C)")
    parser.add_argument("--beam-width", type=int, default=10)
    parser.add_argument("--blank", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--scale", type=float, default=5.0, help="logit scale: larger is peakier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def make_log_probs(frames: int, lines: int, classes: int, scale: float, seed: int) -> torch.Tensor:
    """``(T, B, C)`` float32 log-probs: log_softmax of standard-normal logits times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(frames, lines, classes, generator=generator) * scale).log_softmax(-1)


def median_seconds(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def vocabulary(classes: int, blank: int) -> list[str]:
    """One character per class, ``""`` for the blank (pyctcdecode's convention)."""
    if classes - 1 > len(SYMBOLS):
        raise ValueError(f"at most {len(SYMBOLS) + 1} classes supported")
    symbols = iter(SYMBOLS)
    return ["" if c == blank else next(symbols) for c in range(classes)]


def pyctcdecode_decoder(labels: list[str]):
    """A pyctcdecode decoder without LM, or None if the package is missing."""
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        return None
    return build_ctcdecoder(labels)


def decode_with_pyctcdecode(decoder, log_probs: torch.Tensor, beam_width: int) -> list[str]:
    """Top text of each line of ``(T, B, C)`` log-probs, one ``decode_beams`` call per line."""
    return [
        decoder.decode_beams(
            line, beam_width=beam_width, beam_prune_logp=float("-inf"), token_min_logp=float("-inf")
        )[0][0]
        for line in log_probs.transpose(0, 1).double().numpy()
    ]


def report(name: str, seconds: float, lines: int) -> None:
    print(f"{name:<28}{seconds * 1e3:10.2f} ms total{seconds * 1e3 / lines:10.4f} ms/line")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log_probs = make_log_probs(args.frames, args.lines, args.classes, args.scale, args.seed)
    on_device = log_probs.to(args.device)
    lengths = torch.full((args.lines,), args.frames, dtype=torch.int64, device=args.device)
    print(
        f"B={args.lines} T={args.frames} C={args.classes} beam_width={args.beam_width} "
        f"device={args.device} torch_threads={torch.get_num_threads()}"
    )

    greedy_s, _ = median_seconds(lambda: greedy_decode(on_device, lengths, args.blank), args.repeats, args.device)
    report("greedy_decode", greedy_s, args.lines)
    beam_s, (ours, _) = median_seconds(
        lambda: beam_search(on_device, lengths, args.beam_width, args.blank), args.repeats, args.device
    )
    report("beam_search (ours)", beam_s, args.lines)

    labels = vocabulary(args.classes, args.blank)
    decoder = pyctcdecode_decoder(labels)
    if decoder is None:
        print("pyctcdecode is not installed (pip install pyctcdecode): skipped the comparison")
        return
    theirs_s, theirs = median_seconds(
        lambda: decode_with_pyctcdecode(decoder, log_probs, args.beam_width), args.repeats, "cpu"
    )
    report("pyctcdecode (no LM)", theirs_s, args.lines)
    ours_text = ["".join(labels[c] for c in labelling) for labelling in ours]
    agreement = sum(a == b for a, b in zip(ours_text, theirs)) / args.lines
    print(f"throughput ratio ours/pyctcdecode: {theirs_s / beam_s:.1f}x")
    print(f"best labelling agrees with pyctcdecode on {agreement:.1%} of lines")


if __name__ == "__main__":
    main()
