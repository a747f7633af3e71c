"""Draw how a trained CRNN aligns a text to a line image: one PNG for looking into a misread.

Example::

    python scripts/plot_alignment.py --checkpoint outputs/RUN/checkpoints/last.ckpt \\
        --image /tmp/lines/images/000000.png --text 0123 --output alignment.png

Three panels share the image's x axis (frame ``t`` covers image columns ``[t*s, (t+1)*s)``, ``s`` the network's
width stride):

1. the image, with the Viterbi (best single) alignment of ``--text`` drawn as one shaded, labelled span per
   emitted character (:func:`losses.forced_align` + :func:`losses.path_to_spans`);
2. the per-frame class probabilities ``p_t(c)`` the network outputs (``∅`` is the blank);
3. the alignment targets ``γ_t(c) = P(frame t emits c | text)``, the CTC posterior over all alignments
   (:func:`losses.ctc_alignment_targets`, from the gradient of ``--ctc builtin`` = ``F.ctc_loss`` or
   ``python`` = :func:`losses.ctc_loss`); its mass is what CTC training pushes ``p_t`` towards.

The Viterbi path is marked with dots on both heatmaps. The title gives the target, the greedy reading and
``-log p(text | image)``. With more than 32 classes only the blank and the 31 classes reaching the highest
probability or γ are drawn.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from crnn.decoding import greedy_decode  # noqa: E402
from crnn.inference import load_recognizer, read_image  # noqa: E402
from crnn.module import CRNNModule  # noqa: E402
from data import Charset  # noqa: E402
from losses import ctc_alignment_targets, ctc_loss, forced_align, path_to_spans  # noqa: E402

CTC = {"builtin": F.ctc_loss, "python": ctc_loss}
MAX_ROWS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--image", required=True, help="a text-line image")
    parser.add_argument("--text", required=True, help="the label to align (characters of the checkpoint's charset)")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--ctc", choices=sorted(CTC), default="builtin", help="CTC implementation giving γ")
    return parser.parse_args(argv)


def width_stride(network: nn.Module) -> int:
    """Image columns per output frame of a :class:`crnn.model.CRNN`: the product of its layers' width strides."""
    strides = (layer.stride for layer in network.cnn if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)))
    return math.prod(s if isinstance(s, int) else s[1] for s in strides)


def shown_classes(probs: np.ndarray, gamma: np.ndarray, blank: int) -> list[int]:
    """Rows to draw from ``(T, C)`` ``probs``/``gamma``: every class if ``C <= MAX_ROWS``, else the blank and the
    classes with the highest peak of either, in class order."""
    if probs.shape[1] <= MAX_ROWS:
        return list(range(probs.shape[1]))
    peak = np.maximum(probs, gamma).max(0)
    peak[blank] = np.inf
    return sorted(np.argsort(-peak, kind="stable")[:MAX_ROWS].tolist())


class Alignment(NamedTuple):
    """What the picture shows, for one line of ``T`` frames and ``C`` classes."""

    probs: np.ndarray  # (T, C) float p_t(c)
    gamma: np.ndarray  # (T, C) float γ_t(c)
    path: list[int]  # T class ids of the Viterbi alignment
    reading: str  # greedy decoding
    nll: float  # -log p(text | image)


def align(module: CRNNModule, image: torch.Tensor, text: str, ctc: str) -> Alignment:
    """Run ``module`` on ``image`` ``(C, H, W)`` and align ``text`` (raises on characters outside the charset)."""
    blank = module.charset.blank
    targets = torch.tensor([module.charset.encode(text)])  # (1, L)
    target_lengths = torch.tensor([targets.shape[1]])
    with torch.no_grad():
        log_probs, lengths = module(image[None], torch.tensor([image.shape[-1]]))  # (T, 1, C), (1,)
    gamma = ctc_alignment_targets(log_probs, targets, lengths, target_lengths, blank, ctc_loss=CTC[ctc])
    nll = CTC[ctc](log_probs, targets, lengths, target_lengths, blank=blank, reduction="sum").item()
    path = forced_align(log_probs, targets, lengths, target_lengths, blank)[0][0]
    reading = module.charset.decode(greedy_decode(log_probs, lengths, blank).labels[0])
    return Alignment(log_probs[:, 0].exp().numpy(), gamma[:, 0].numpy(), path.tolist(), reading, nll)


def draw(alignment: Alignment, image: torch.Tensor, text: str, charset: Charset, stride: int, ctc: str,
         output: Path) -> None:
    """The three-panel PNG (see the module docstring) of ``alignment`` of ``text`` on ``image`` ``(C, H, W)``."""
    blank, (frames, _) = charset.blank, alignment.probs.shape
    rows = shown_classes(alignment.probs, alignment.gamma, blank)
    labels = ["∅" if c == blank else repr(charset.decode([c]))[1:-1] for c in rows]
    path_rows = [rows.index(c) if c in rows else np.nan for c in alignment.path]
    height, width = image.shape[1:]

    figure_width = min(24.0, max(8.0, width / 25))
    image_height, heat_height = figure_width * height / width, 0.5 + 0.16 * len(rows)
    figure, axes = plt.subplots(3, 1, sharex=True, figsize=(figure_width, image_height + 2 * heat_height + 1.2),
                                height_ratios=[image_height, heat_height, heat_height], layout="constrained")
    pixels = image.permute(1, 2, 0).numpy()
    axes[0].imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1,
                   extent=(0, width, height, 0), aspect="auto")
    colours = plt.get_cmap("tab10")
    for k, span in enumerate(path_to_spans(alignment.path, blank)):
        axes[0].axvspan(span.start * stride, span.end * stride, color=colours(k % 10), alpha=0.3, linewidth=0)
        axes[0].text((span.start + span.end) * stride / 2, -1, charset.decode([span.token]), ha="center", va="bottom",
                     fontsize=12, fontweight="bold", color=colours(k % 10), clip_on=False)
    axes[0].set_yticks([])
    axes[0].set_ylabel("Viterbi\nspans")
    for ax, values, name in ((axes[1], alignment.probs, "p_t(c)"), (axes[2], alignment.gamma, f"γ_t(c) ({ctc})")):
        heat = ax.imshow(values[:, rows].T, cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                         extent=(0, frames * stride, len(rows) - 0.5, -0.5), aspect="auto")
        ax.plot((np.arange(frames) + 0.5) * stride, path_rows, "o", color="white", markeredgecolor="black",
                markersize=4)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel(name)
    axes[2].set_xlabel(f"image column (px); one frame = {stride} px, {frames} frames; dots: Viterbi path")
    figure.colorbar(heat, ax=axes[1:], fraction=0.02, pad=0.01)
    figure.suptitle(f"target {text!r}   greedy reading {alignment.reading!r}   "
                    f"-log p(target | image) = {alignment.nll:.3f}")
    figure.savefig(output, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> Path:
    """Compute the alignment and write the PNG; returns its path."""
    args = parse_args(argv)
    module = load_recognizer(args.checkpoint, "cpu")
    image = read_image(args.image, module)
    alignment = align(module, image, args.text, args.ctc)
    output = Path(args.output)
    draw(alignment, image, args.text, module.charset, width_stride(module.model), args.ctc, output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
