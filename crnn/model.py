"""CRNN: a convolutional feature extractor, a bidirectional RNN over width, and a per-frame classifier."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}
_NORMS = {"batch": nn.BatchNorm2d, "none": None}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def layer_output_width(layer: nn.Module, widths: torch.Tensor) -> torch.Tensor:
    """Width after ``layer`` of inputs whose true widths are ``widths`` (``(B,)`` int64).

    Applies PyTorch's ``floor((W + 2p - d(k - 1) - 1) / s) + 1`` for :class:`~torch.nn.Conv2d` and
    :class:`~torch.nn.MaxPool2d` (``ceil_mode=False``); every other layer keeps the width.
    """
    if not isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
        return widths
    kernel, stride, padding, dilation = (
        _pair(getattr(layer, name))[1] for name in ("kernel_size", "stride", "padding", "dilation")
    )
    if isinstance(layer, nn.MaxPool2d) and layer.ceil_mode:
        raise ValueError("ceil_mode pooling is not supported by the width arithmetic")
    return torch.div(widths + 2 * padding - dilation * (kernel - 1) - 1, stride, rounding_mode="floor") + 1


def output_length(width: int, pools: Sequence[int | Sequence[int]], kernel_size: int = 3) -> int:
    """Frames ``CRNN(pools=pools, kernel_size=kernel_size)`` emits for an image ``width`` px wide (at least 1).

    The same arithmetic as :meth:`CRNN.output_lengths`, from the config alone (no network is built), so a
    data module can check label lengths before the model exists, e.g. as a Hydra ``_partial_`` with
    ``pools: ${model.pools}``. Each block is a stride-1 conv with padding ``kernel_size // 2``, then a
    ``MaxPool2d`` of the pool's width (kernel = stride, no padding).
    """
    for pool in pools:
        width += 2 * (kernel_size // 2) - kernel_size + 1
        pool_width = _pair(pool)[1]
        width = (width - pool_width) // pool_width + 1
    return max(1, width)


def _width_mask(widths: torch.Tensor, total: int) -> torch.Tensor:
    """``(B, 1, 1, total)`` float mask, 1 on columns ``< widths[b]``."""
    return (torch.arange(total, device=widths.device) < widths[:, None]).to(torch.float32)[:, None, None, :]


class CRNN(nn.Module):
    """Conv stack -> bidirectional RNN over width -> Linear to ``num_classes`` (charset + blank).

    Block ``i`` is ``Conv2d(kernel_size, padding=kernel_size // 2) -> norm -> ReLU -> MaxPool2d(pools[i])``
    (no pool where ``pools[i]`` is ``[1, 1]``). The width shrinks by ``prod(pool widths)``. The pools take
    ``height`` to ``height // prod(pool heights)`` rows (at least 1); any rows left are averaged into one (as
    deep-text-recognition-benchmark's ``AdaptiveAvgPool2d((None, 1))``), so the same ``pools`` serve heights
    32, 40, 48, 64, ... and the RNN sees ``channels[-1]`` features per column. The defaults (235 k parameters
    for 11 classes, width / 8) are the CPU-sized ``conf/model/crnn.yaml``.

    Padding never changes the result for a valid frame: before every convolution the columns past each
    image's true width are zeroed (what the convolution's own zero padding does to the image alone), and
    the RNN input is packed to the true lengths. Only batch-norm statistics in training mode see padding.
    An image narrower than :attr:`min_width` (the fewest columns that give one frame) is read as if
    right-padded with zero columns to that width, alone or in a batch.

    Args:
        num_classes: output classes including the blank.
        height: input image height in pixels.
        channels: output channels of each conv block.
        pools: ``(height, width)`` max-pool kernel (= stride) of each block, one per entry of ``channels``.
        kernel_size: square conv kernel size (odd).
        norm: ``"batch"`` or ``"none"``.
        in_channels: image channels.
        rnn: ``"lstm"`` or ``"gru"``.
        rnn_hidden: hidden size of each direction.
        rnn_layers: stacked bidirectional layers.
        dropout: dropout between RNN layers and before the classifier.
    """

    def __init__(
        self,
        num_classes: int,
        height: int = 32,
        channels: Sequence[int] = (16, 32, 64, 64, 128),
        pools: Sequence[Sequence[int]] = ((2, 2), (2, 2), (2, 2), (2, 1), (2, 1)),
        kernel_size: int = 3,
        norm: str = "batch",
        in_channels: int = 1,
        rnn: str = "lstm",
        rnn_hidden: int = 64,
        rnn_layers: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(channels) != len(pools):
            raise ValueError(f"channels and pools need one entry per block, got {len(channels)} and {len(pools)}")
        if norm not in _NORMS or rnn not in _RNNS:
            raise ValueError(f"norm must be one of {list(_NORMS)} and rnn one of {list(_RNNS)}, got {norm!r}, {rnn!r}")
        layers: list[nn.Module] = []
        feature_height = height
        for out_channels, pool in zip(channels, pools):
            pool = _pair(pool)
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none")
            layers.append(conv)
            if _NORMS[norm] is not None:
                layers.append(_NORMS[norm](out_channels))
            layers.append(nn.ReLU(inplace=True))
            if pool != (1, 1):
                layers.append(nn.MaxPool2d(pool))
            feature_height //= pool[0]
            in_channels = out_channels
        if feature_height < 1:
            stride = math.prod(_pair(pool)[0] for pool in pools)
            raise ValueError(f"height {height} is too small for the pools, whose height strides multiply to {stride}: "
                             f"use data.height >= {stride}")
        self.height = height
        self.feature_height = feature_height  # rows the conv stack leaves, averaged into one in forward
        self.cnn = nn.Sequential(*layers)
        self.rnn = _RNNS[rnn](
            in_channels, rnn_hidden, num_layers=rnn_layers, bidirectional=True,
            dropout=dropout if rnn_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * rnn_hidden, num_classes)
        self.min_width = 1
        while self._conv_widths(torch.tensor([self.min_width]))[-1].item() < 1:
            self.min_width += 1

    def _conv_widths(self, widths: torch.Tensor) -> list[torch.Tensor]:
        """Widths entering each layer of the conv stack, then leaving the last one: ``len(cnn) + 1`` tensors."""
        stages = [widths.long()]
        for layer in self.cnn:
            stages.append(layer_output_width(layer, stages[-1]))
        return stages

    def output_lengths(self, widths: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int64 output frames (at least 1) for images of true widths ``widths`` (``(B,)`` int)."""
        return self._conv_widths(widths.long().clamp(min=self.min_width))[-1]

    def forward(self, images: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame class log-probabilities.

        Args:
            images: ``(B, in_channels, height, W)`` float, right-padded to the batch's widest image.
            widths: ``(B,)`` int, true width of each image (``<= W``).
        Returns:
            ``log_probs``: ``(T, B, num_classes)`` float, log-softmax over classes; frames ``>= lengths[b]``
            are padding. ``lengths``: ``(B,)`` int64 valid frames per image, :meth:`output_lengths` of ``widths``.
        """
        if images.shape[2] != self.height:
            raise ValueError(f"images must be {self.height} px high, got shape {tuple(images.shape)}")
        widths = widths.to(images.device).long()
        x = images if images.shape[-1] >= self.min_width else F.pad(images, (0, self.min_width - images.shape[-1]))
        # the first mask cuts each image at its true width, the later ones at the conv stack's widths of
        # max(width, min_width): a narrow image is zero-padded to the width of one frame
        stages = iter(self._conv_widths(widths.clamp(min=self.min_width)))
        for layer, lengths in zip(self.cnn, stages):
            if isinstance(layer, nn.Conv2d):
                x = x * _width_mask(widths if layer is self.cnn[0] else lengths, x.shape[-1]).to(x.dtype)
            x = layer(x)
        lengths = next(stages)
        x = x.mean(2).permute(2, 0, 1)  # (B, C_feat, feature_height, T) -> (T, B, C_feat)
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        x, _ = pad_packed_sequence(self.rnn(packed)[0], total_length=x.shape[0])
        logits = self.classifier(self.dropout(x))
        return logits.log_softmax(-1), lengths
