"""Line images: decoding a Pillow image into the model's input tensor, and the width it gets at a height."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode an image is converted to


def resized_width(size: tuple[int, int], height: int) -> int:
    """Width of an image of ``size = (w, h)`` resized to ``height`` with its aspect ratio kept (at least 1)."""
    return max(1, round(size[0] * height / size[1]))


def image_to_tensor(image: Image.Image, height: int, channels: int = 1) -> torch.Tensor:
    """Any Pillow image -> float32 ``(channels, height, W)`` in ``[0, 1]``, ``W = resized_width(image.size, height)``.

    Converted to grey (``channels=1``) or RGB (``3``), resized bilinearly (antialiased when shrinking).
    """
    image = image.convert(MODES[channels])
    width = resized_width(image.size, height)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
    return torch.from_numpy(array).reshape(height, width, channels).permute(2, 0, 1).contiguous()
