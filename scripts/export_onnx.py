"""Export a checkpoint's network to ONNX (dynamic batch and width) and check onnxruntime against PyTorch.

Example::

    python scripts/export_onnx.py --checkpoint outputs/RUN/checkpoints/last.ckpt --output crnn.onnx

The graph has the network's own interface:

* inputs ``images`` float32 ``(B, C, H, W)``, right-padded to the widest line (``C`` and ``H`` fixed by the
  checkpoint; ``B`` and ``W`` dynamic), and ``widths`` int64 ``(B,)``, each line's true width;
* outputs ``log_probs`` float32 ``(T, B, num_classes)`` (frames ``>= lengths[b]`` are padding) and
  ``lengths`` int64 ``(B,)``. Decode as in PyTorch (blank and charset are in the checkpoint's hyper-parameters).

The CRNN runs its RNN on packed sequences, so padding never reaches a line's valid frames. The TorchScript-based
exporter (``dynamo=False``) writes that as ONNX's RNN ``sequence_lens`` input, which means the same thing; the
``torch.export``-based one cannot trace ``nn.LSTM``/``nn.GRU`` for a dynamic number of frames (it fixes the time
axis to the example's), so this uses the former. After exporting, synthetic lines of different widths are
recognised as one padded batch and one by one with onnxruntime and PyTorch; the script prints the largest
absolute difference of log-probs over valid frames and exits with status 1 if it exceeds ``--tolerance`` (or
the output lengths differ).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from crnn.inference import load_recognizer
from data import DIGITS, LineRenderer, collate_lines

INPUTS, OUTPUTS = ("images", "widths"), ("log_probs", "lengths")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--samples", type=int, default=8, help="synthetic lines to check")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed abs. log-prob difference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic lines")
    return parser.parse_args(argv)


def export(network: nn.Module, path: str | Path, channels: int, height: int, opset: int | None = None) -> None:
    """Write ``network`` (``(images, widths) -> (log_probs, lengths)``, in eval mode) to ``path`` as ONNX with
    dynamic batch, width and frame axes, and validate the file with :func:`onnx.checker.check_model`."""
    images = torch.rand(2, channels, height, 4 * height)
    widths = torch.tensor([4 * height, 2 * height])
    dynamic_axes = {"images": {0: "batch", 3: "width"}, "widths": {0: "batch"},
                    "log_probs": {0: "frames", 1: "batch"}, "lengths": {0: "batch"}}
    with warnings.catch_warnings():  # the exporter's deprecation and tracing notes; check() validates the graph
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (images, widths), str(path), input_names=INPUTS, output_names=OUTPUTS,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)


def sample_images(characters: str, channels: int, height: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` rendered lines ``(channels, height, W_i)`` of 1 to 12 characters, so of different widths; drawn
    from ``characters`` if an installed font covers them, else from digits."""
    try:
        renderer = LineRenderer(characters, max_length=12, height=height)
    except ValueError:
        renderer = LineRenderer(DIGITS, max_length=12, height=height)
    rng = np.random.default_rng(seed)
    return [renderer(rng)[0].expand(channels, -1, -1) for _ in range(count)]


def max_abs_diff(network: nn.Module, session: onnxruntime.InferenceSession, images: list[torch.Tensor]) -> float:
    """Largest ``|log_probs_onnx - log_probs_torch|`` over valid frames, for ``images`` as one padded batch and
    each alone; ``inf`` if the output lengths differ."""
    worst = 0.0
    for group in [images, *([image] for image in images)]:
        batch = collate_lines([{"image": image, "text": "", "target": torch.empty(0, dtype=torch.long)}
                               for image in group])
        with torch.no_grad():
            log_probs, lengths = network(batch["images"], batch["widths"])
        onnx_log_probs, onnx_lengths = session.run(None, {"images": batch["images"].numpy(),
                                                          "widths": batch["widths"].numpy()})
        if not np.array_equal(onnx_lengths, lengths.numpy()) or onnx_log_probs.shape != tuple(log_probs.shape):
            return float("inf")
        valid = (torch.arange(log_probs.shape[0])[:, None] < lengths)[..., None]  # (T, B, 1)
        difference = (torch.from_numpy(onnx_log_probs) - log_probs).abs().masked_fill(~valid, 0.0)
        worst = max(worst, difference.max().item())
    return worst


def main(argv: list[str] | None = None) -> int:
    """Export and check; returns the exit status (0: onnxruntime agrees with PyTorch within the tolerance)."""
    args = parse_args(argv)
    module = load_recognizer(args.checkpoint, "cpu")
    channels, height = module.input_format
    export(module.model, args.output, channels, height, args.opset)
    session = onnxruntime.InferenceSession(args.output, providers=["CPUExecutionProvider"])
    images = sample_images(module.charset.characters, channels, height, args.samples, args.seed)
    difference = max_abs_diff(module.model, session, images)
    widths = sorted(image.shape[-1] for image in images)
    print(f"wrote {args.output}; onnxruntime vs PyTorch on {len(images)} lines of widths {widths[0]}-{widths[-1]} px "
          f"(one batch and one by one): max abs diff of log-probs {difference:.3g} (tolerance {args.tolerance:g})")
    return 0 if difference <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
