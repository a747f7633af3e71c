"""Line augmentation: random, mild distortions of training line images (``augment=line``), reproducible per
``(seed, epoch, index)``.

:class:`LineAugment` maps one float image ``(C, H, W)`` in ``[0, 1]`` and a seed to an augmented image of the
same shape. It chains torchvision v2 transforms (affine, perspective, elastic, colour jitter, blur, noise) and
three hand-written ones no library has: ink thickness (grey erosion/dilation), a TIA-style local warp (PaddleOCR's
``tia_distort``/``tia_stretch``: control points along the line's top and bottom edges moved at random) and jitter
of the crop box around the line. Every knob has its own probability.

Shapes never change: the height stays the data height, and the width stays the one the datamodule screened for
``too_long`` labels and the collate pads to (edge crop/pad is resized back to the original width), so a label that
fits the un-augmented line fits every view of it.

:class:`AugmentedLines` wraps a training dataset; its keys are ``(epoch, index)`` pairs, which
:class:`data.batching.EpochTaggedBatches` makes from the epoch-aware training sampler, so workers (persistent
ones included) see the epoch without shared state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on all of ``(seed, epoch, index)`` (non-negative ints), well mixed
    (``numpy.random.SeedSequence``), so neighbouring indices or epochs get unrelated random streams."""
    low, high = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return int(low) | (int(high) & 0x7FFFFFFF) << 32


def background(image: torch.Tensor) -> torch.Tensor:
    """Per-channel median of the image's border pixels, ``(C, 1, 1)``: the paper colour around the text, used to
    fill what a transform moves into view (a fixed 0 would draw black wedges on a white line)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (C, 2W + 2H)
    return border.median(dim=1).values[:, None, None]


def _uniform(low: float, high: float) -> float:
    """One draw from ``U(low, high)`` of the global torch RNG (which :class:`LineAugment` seeds per sample)."""
    return low + (high - low) * torch.rand(()).item()


def spread_ink(image: torch.Tensor, weight: float, thicker: bool) -> torch.Tensor:
    """Strokes of a background-subtracted image ``(C, H, W)`` (paper at 0) made thicker (grey dilation of the ink)
    or thinner (erosion) by 3x3 max/min pooling, blended with the original: ``lerp(image, pooled, weight)``.

    The ink is the side of the paper the image's mean lies on: negative (dark on light) or positive.
    """
    dark_ink = image.mean() <= 0  # paper at 0: dark ink pulls the mean below it
    spread_max = thicker != dark_ink  # dilating light ink = max pooling; dilating dark ink = min pooling
    sign = 1.0 if spread_max else -1.0
    pooled = sign * F.max_pool2d(sign * image[None], 3, stride=1, padding=1)[0]
    return torch.lerp(image, pooled, weight)


class InkThickness(torch.nn.Module):
    """Thicker or thinner strokes (:func:`spread_ink`) with a random weight in ``[0, strength]``: anywhere between
    no change and one pixel more or less ink. Works on a background-subtracted image."""

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        weight = _uniform(0.0, self.strength)
        return spread_ink(image, weight, thicker=torch.rand(()).item() < 0.5)


def warp_edges(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Image ``(C, H, W)`` warped by control points on its top and bottom edges: ``shift`` ``(2, 2, P)`` px is the
    (x, y) displacement of the ``P`` points spread evenly over each edge (top row first, the first and last on the
    image's corners); between them the displacement is interpolated bilinearly. What moves out of the image is
    lost, what moves in is 0 (apply it to a background-subtracted image)."""
    channels, height, width = image.shape
    field = F.interpolate(shift[None], size=(height, width), mode="bilinear", align_corners=True)[0]  # (2, H, W)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=image.dtype), torch.arange(width, dtype=image.dtype),
                            indexing="ij")
    # grid_sample reads each output pixel from where it came from: output p shows input p - shift(p).
    x = (xs - field[0]) * (2 / max(width - 1, 1)) - 1
    y = (ys - field[1]) * (2 / max(height - 1, 1)) - 1
    grid = torch.stack([x, y], dim=-1)[None]
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


class LocalWarp(torch.nn.Module):
    """TIA-style local warp (PaddleOCR's ``tia_distort``, Luo et al. 2020) by :func:`warp_edges`: a control point
    every ``segment`` heights along the top and bottom edges, each moved at random by up to ``strength * H`` px in
    x and y (the line's ends only inwards, so no text leaves the image sideways). Characters get locally narrower,
    wider, slanted or bent."""

    def __init__(self, strength: float = 0.15, segment: float = 1.0) -> None:
        super().__init__()
        self.strength = strength
        self.segment = segment

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        points = max(2, round(width / (self.segment * height)) + 1)  # control points per edge
        shift = self.strength * height * (2 * torch.rand(2, 2, points) - 1)  # (x/y, top/bottom, point) px
        shift[0, :, 0] = shift[0, :, 0].abs()
        shift[0, :, -1] = -shift[0, :, -1].abs()
        return warp_edges(image, shift)


def move_edges(image: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Image ``(C, H, W)`` with its ``[left, right, top, bottom]`` edges moved out by ``offsets`` px (padding with 0;
    negative: cropping), resized back to ``(H, W)`` (bilinear, antialiased)."""
    if not any(offsets):
        return image
    height, width = image.shape[-2:]
    return TF.resize(F.pad(image, offsets), [height, width], antialias=True)


class EdgeJitter(torch.nn.Module):
    """A different crop box around the line, as another line detector would give (:func:`move_edges`): each edge
    moves out (padding with the background) or in (cropping) by up to ``pad`` / ``crop`` times the height, left
    and right, and a quarter of that top and bottom, never cutting away more than half of the line. Works on a
    background-subtracted image."""

    def __init__(self, crop: float = 0.1, pad: float = 0.3) -> None:
        super().__init__()
        self.crop = crop
        self.pad = pad

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        limits = [(self.crop, self.pad)] * 2 + [(self.crop / 4, self.pad / 4)] * 2  # left, right, top, bottom
        offsets = [round(_uniform(-crop * height, pad * height)) for crop, pad in limits]
        floors = [1 - width // 2] * 2 + [1 - height // 2] * 2
        return move_edges(image, [max(offset, floor) for offset, floor in zip(offsets, floors)])


class IfAtLeast(torch.nn.Module):
    """``transform`` on images at least ``size`` px high and wide; smaller ones pass unchanged (torchvision's blur
    and elastic kernels reflect-pad by half their size, and its perspective needs distinct corners, which fail on
    narrower images, e.g. a line of one ``.``)."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        super().__init__()
        self.transform = transform
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image) if min(image.shape[-2:]) >= self.size else image


class LineAugment:
    """Random distortions of one line image, each applied with its own probability (``*_p``; 0 turns it off).

    Args:
        ink_p, ink: grey dilation/erosion of the strokes, blended in with weight up to ``ink`` (:class:`InkThickness`).
        edges_p, edge_crop, edge_pad: crop box jitter, fractions of the height (:class:`EdgeJitter`).
        affine_p, degrees, shear, scale: ``v2.RandomAffine``: rotation in ``[-degrees, degrees]``, horizontal shear
            in ``[-shear, shear]`` degrees (slanted/italic text), zoom in ``[1 - scale, 1 + scale]``.
        perspective_p, perspective: ``v2.RandomPerspective(distortion_scale=perspective)`` (a photographed page).
        warp_p, warp, warp_segment: TIA-style local warp of strength ``warp`` with segments ``warp_segment`` heights
            wide (:class:`LocalWarp`).
        elastic_p, elastic_alpha, elastic_sigma: ``v2.ElasticTransform`` (wobbly strokes; alpha in px-ish scale).
        color_p, brightness, contrast, saturation, hue: ``v2.ColorJitter`` (saturation and hue act on RGB only).
        blur_p, blur_sigma: ``v2.GaussianBlur`` with sigma in ``[0.1, blur_sigma]`` (kernel 5 px).
        noise_p, noise: ``v2.GaussianNoise`` with standard deviation up to ``noise`` (drawn per image).

    The order is that of a document's life: ink, crop box, geometry (affine, perspective, warp, elastic), then
    the camera or scanner (colour, blur, noise). Geometric transforms fill with the image's :func:`background`.

    ``augment(image, seed)`` takes float ``(C, H, W)`` in ``[0, 1]`` and returns a new float ``(C, H, W)`` in
    ``[0, 1]``; the same ``(image, seed)`` always gives the same result. The random draws come from torch's
    global CPU generator (torchvision's transforms use it), seeded with ``seed`` inside ``torch.random.fork_rng``,
    so the caller's RNG state is untouched.
    """

    def __init__(
        self,
        ink_p: float = 0.3, ink: float = 0.7,
        edges_p: float = 0.5, edge_crop: float = 0.08, edge_pad: float = 0.3,
        affine_p: float = 0.5, degrees: float = 1.5, shear: float = 10.0, scale: float = 0.05,
        perspective_p: float = 0.2, perspective: float = 0.1,
        warp_p: float = 0.3, warp: float = 0.12, warp_segment: float = 1.0,
        elastic_p: float = 0.0, elastic_alpha: float = 8.0, elastic_sigma: float = 4.0,
        color_p: float = 0.5, brightness: float = 0.25, contrast: float = 0.35, saturation: float = 0.3,
        hue: float = 0.05,
        blur_p: float = 0.3, blur_sigma: float = 1.0,
        noise_p: float = 0.3, noise: float = 0.05,
    ) -> None:
        for name, value in locals().items():
            if name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {value}")
        self.ink = v2.RandomApply([InkThickness(ink)], p=ink_p)
        self.geometry = v2.Compose([
            v2.RandomApply([EdgeJitter(edge_crop, edge_pad)], p=edges_p),
            v2.RandomApply([v2.RandomAffine(degrees=degrees, scale=(1 - scale, 1 + scale), shear=(-shear, shear),
                                            interpolation=v2.InterpolationMode.BILINEAR)], p=affine_p),
            IfAtLeast(v2.RandomPerspective(distortion_scale=perspective, p=perspective_p), size=3),
            v2.RandomApply([LocalWarp(warp, warp_segment)], p=warp_p),
            v2.RandomApply([IfAtLeast(v2.ElasticTransform(alpha=elastic_alpha, sigma=elastic_sigma),
                                      size=int(8 * elastic_sigma + 1) // 2 + 1)], p=elastic_p),
        ])
        self.color_p = color_p
        self.color = {1: v2.ColorJitter(brightness=brightness, contrast=contrast),
                      3: v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)}
        self.blur = v2.RandomApply([IfAtLeast(v2.GaussianBlur(kernel_size=5, sigma=(0.1, max(blur_sigma, 0.1))),
                                              size=3)], p=blur_p)
        self.noise_p, self.noise = noise_p, noise

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """Augmented copy of ``image`` float ``(C, H, W)`` in ``[0, 1]``, same shape; deterministic per ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed would also queue
            # lazy CUDA/XPU seeding with a captured stack trace, about half the cost of an augmentation
            paper = background(image)
            # Geometry on the background-subtracted image, so that the transforms' fill (0) is the paper colour
            # (bilinear interpolation is affine in the pixel values, so the shift commutes with it).
            image = self.ink(image - paper)
            image = self.geometry(image) + paper
            if torch.rand(()).item() < self.color_p:
                image = self.color[image.shape[0]](image.clamp(0, 1))
            image = self.blur(image)
            if torch.rand(()).item() < self.noise_p:
                image = v2.GaussianNoise(sigma=_uniform(0.0, self.noise), clip=False)(image)
            return image.clamp(0, 1)


class AugmentedLines(Dataset):
    """A training dataset whose images are augmented on the fly: key ``(epoch, index)`` gives item ``index`` of
    ``dataset`` with its image replaced by ``augment(image, sample_seed(seed, epoch, index))``; a plain ``index``
    means epoch 0. Text and target are unchanged; ``len`` is the dataset's."""

    def __init__(self, dataset: Dataset, augment: Callable[[torch.Tensor, int], torch.Tensor], seed: int) -> None:
        self.dataset = dataset
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = dict(self.dataset[index])
        item["image"] = self.augment(item["image"], sample_seed(self.seed, epoch, index))
        return item
