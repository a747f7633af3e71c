"""Synthetic text-line images, rendered on the fly and reproducible per ``(seed, index)``, and
:class:`SyntheticDataModule`, their train/val/test splits.

Every sample draws all of its randomness (text, font, size, padding, spacing, grey levels, affine
distortion, blur, noise) from ``numpy.random.default_rng([seed, index])``, so any process, worker
or epoch that asks for the same index of the same seed gets the same sample, and no global RNG is
touched.

Fonts come only from installed packages: the DejaVu TTFs that matplotlib ships and Pillow's built-in
font (``ImageFont.load_default(size)``, named ``"default"`` here). A font is used for a charset only
if it has a glyph for every character (matplotlib's ``DejaVu*Display`` fonts, for example, have no
digits).

Rendering is plain Pillow + numpy for speed: fonts and per-character glyph masks are cached per
process, a line is pasted glyph by glyph (for random letter spacing), then one affine warp
(rotation + shear), a resize to the output height, an optional Gaussian blur and numpy noise.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import string
from collections.abc import Callable, Mapping, Sequence

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import Dataset

from data.batching import SPLITS
from data.charset import Charset
from data.line_datamodule import LineDataModule

DIGITS = "0123456789"
TEXT_CHARACTERS = string.digits + string.ascii_letters + " .,:;!?'\"-()&/"
KIND_CHARACTERS = {"digits": DIGITS, "text": TEXT_CHARACTERS}
DEFAULT_FONT = "default"  # Pillow's built-in font

_MISSING_GLYPH = "\ue000"  # private-use code point: renders as the font's "missing glyph" box


def installed_fonts() -> list[str]:
    """Matplotlib's DejaVu TTF paths plus ``"default"`` (Pillow's built-in font)."""
    pattern = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVu*.ttf")
    return sorted(glob.glob(pattern)) + [DEFAULT_FONT]


@functools.lru_cache(maxsize=None)
def load_font(font: str, size: int) -> ImageFont.FreeTypeFont:
    """Load (once per process) a TTF path, or ``"default"`` for Pillow's built-in font, at ``size`` px."""
    if font == DEFAULT_FONT:
        return ImageFont.load_default(size)
    return ImageFont.truetype(font, size, layout_engine=ImageFont.Layout.BASIC)


def font_covers(font: str, characters: str) -> bool:
    """Whether ``font`` has a real glyph (not the missing-glyph box) for every non-space character."""
    f = load_font(font, 24)
    missing = f.getmask(_MISSING_GLYPH)
    missing = (missing.size, bytes(missing))
    return all((m.size, bytes(m)) != missing for m in map(f.getmask, set(characters) - {" "}))


@functools.lru_cache(maxsize=None)
def _text_band(font: str, size: int, characters: str) -> tuple[int, int]:
    """Vertical extent ``(top, bottom)`` of all ``characters`` drawn at y=0 (anchor "la"), in px.

    Using the charset's extent rather than each line's own ink keeps the baseline and text height
    consistent within a kind: digits fill the cap height, mixed text spans ascenders to descenders.
    """
    _, top, _, bottom = load_font(font, size).getbbox(characters)
    return top, bottom


@functools.lru_cache(maxsize=None)
def _glyph(font: str, size: int, char: str) -> tuple[Image.Image | None, int, int, float]:
    """Cached ``(mask, left, top, advance)`` of one character: its anti-aliased coverage mask (``None``
    for blank glyphs such as the space), the mask's offset from the pen position (anchor "la") and
    the pen advance, in px."""
    f = load_font(font, size)
    advance = f.getlength(char)
    left, top, right, bottom = f.getbbox(char)
    if right <= left or bottom <= top:
        return None, 0, 0, advance
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), char, fill=255, font=f)
    return mask, left, top, advance


def read_words(words: Sequence[str] | str | os.PathLike) -> list[str]:
    """A word list given as a sequence of strings or a UTF-8 file path (one entry per line).

    Entries are stripped of surrounding whitespace; empty entries are dropped.
    """
    if isinstance(words, (str, os.PathLike)):
        with open(words, encoding="utf-8") as f:
            words = f.read().splitlines()
    return [w.strip() for w in words if w.strip()]


class LineRenderer:
    """Draws random text lines as grey images of fixed height.

    Args:
        characters: alphabet the random texts are drawn from (and that words must stay within).
        min_length, max_length: inclusive range of text lengths in characters.
        height: output height ``H`` in px; the width follows the text (aspect kept).
        words: optional word list (sequence or file path, see :func:`read_words`); lines are then
            random words joined by spaces and cut to the drawn length. Without it, lines are random
            characters, with interior single spaces if ``" "`` is in ``characters``.
        distortion: strength in ``[0, 1]`` of affine skew/rotation, blur, noise, contrast loss and
            polarity inversion; 0 renders clean lines (fonts, sizes, padding and spacing still vary).
            The default 0.5 is moderate: realistic, and easy enough for a small CRNN.
        fonts: font paths / ``"default"``; ``None`` uses :func:`installed_fonts`. Fonts lacking a
            glyph for any of ``characters`` are skipped.
        zipf_exponent: ``s >= 0``; with ``s > 0`` random-character lines draw the ``k``-th non-space
            character of ``characters`` (1-based, in the given order) with probability proportional to
            ``k ** -s`` (a Zipf-like skew: ``s = 1`` over 36 characters makes the first ~36x as
            frequent as the last). 0 (default) draws uniformly. Order ``characters`` by the wanted
            frequency, e.g. ``"etaoin..."``.
        char_weights: explicit relative frequencies instead: a sequence with one non-negative weight
            per character of ``characters`` (a weight for ``" "`` is ignored: spaces are placed as
            usual), or a mapping ``{character: weight}`` (missing characters get 0). Exclusive with
            ``zipf_exponent``; neither applies to ``words`` lines.

    Calling the renderer with a ``numpy.random.Generator`` returns ``(image, text)``: ``image`` is a
    float32 tensor ``(1, H, W)`` with values in ``[0, 1]`` (not normalised; ink may be dark on light or,
    with probability ``0.2 * distortion``, light on dark). ``W`` is at least about ``0.45 H`` per digit
    and ``0.3 H`` per character of mixed text (median ``0.8 H`` / ``0.55 H``), so a CRNN with width
    stride 4 gets two or more frames per character.
    """

    def __init__(
        self,
        characters: str = DIGITS,
        min_length: int = 1,
        max_length: int = 10,
        height: int = 32,
        words: Sequence[str] | str | None = None,
        distortion: float = 0.5,
        fonts: Sequence[str] | None = None,
        zipf_exponent: float = 0.0,
        char_weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        if not 0.0 <= distortion <= 1.0:
            raise ValueError(f"distortion must be in [0, 1], got {distortion}")
        charset = Charset(characters)  # validates: non-empty, no duplicates
        self.characters = characters
        self.min_length = min_length
        self.max_length = max_length
        self.height = height
        self.distortion = distortion
        self.words = None if words is None else read_words(words)
        if self.words is not None:
            if not self.words:
                raise ValueError("word list is empty")
            for word in self.words:
                charset.encode(word)  # raises ValueError naming the word and the character
        candidates = installed_fonts() if fonts is None else [str(f) for f in fonts]
        self.fonts = [f for f in candidates if font_covers(f, characters)]
        if not self.fonts:
            raise ValueError(f"none of the fonts {candidates} covers the characters {characters!r}")
        self._sizes = list(range(round(0.6 * height), round(1.3 * height) + 1, max(1, height // 10)))
        self._letters = characters.replace(" ", "")
        self._spaces = " " in characters
        self.zipf_exponent = float(zipf_exponent)
        self._probs = _character_probabilities(self._letters, characters, zipf_exponent, char_weights)
        if self._probs is not None and self.words is not None:
            raise ValueError("zipf_exponent/char_weights apply to random-character lines, not to words")

    @property
    def char_probabilities(self) -> dict[str, float]:
        """Probability of each non-space character at a drawn position (uniform unless skewed)."""
        if self._probs is None:
            return {c: 1.0 / len(self._letters) for c in self._letters}
        return dict(zip(self._letters, self._probs.tolist()))

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
        """Draw a text and render it: ``(image (1, H, W) float32 in [0, 1], text)``."""
        text = self.sample_text(rng)
        return self.render(text, rng), text

    def sample_text(self, rng: np.random.Generator) -> str:
        """A random text of ``min_length <= len <= max_length`` characters, never starting or ending
        with a space (a word line cut right after a word drops that space, so it may be one shorter)."""
        length = int(rng.integers(self.min_length, self.max_length + 1))
        if self.words is not None:
            line = self.words[rng.integers(len(self.words))]
            while len(line) < length:
                line += " " + self.words[rng.integers(len(self.words))]
            return line[:length].rstrip()
        if self._probs is None:
            picks = rng.integers(len(self._letters), size=length)
        else:
            picks = rng.choice(len(self._letters), size=length, p=self._probs)
        chars = [self._letters[i] for i in picks]
        if self._spaces:
            for i in np.flatnonzero(rng.random(length) < 0.15):
                if 0 < i < length - 1 and chars[i - 1] != " ":
                    chars[i] = " "
        return "".join(chars)

    def render(self, text: str, rng: np.random.Generator) -> torch.Tensor:
        """Render ``text`` with random style and distortions: float32 tensor ``(1, H, W)`` in ``[0, 1]``."""
        d, h_out = self.distortion, self.height
        u = rng.random(15).tolist()  # one draw for all style parameters (much cheaper than 15 separate calls)
        font_name = self.fonts[int(u[0] * len(self.fonts))]
        size = self._sizes[int(u[1] * len(self._sizes))]
        top, bottom = _text_band(font_name, size, self.characters)
        band = bottom - top

        # Grey levels: light background, dark ink with a minimum contrast; sometimes inverted.
        bg = 0.65 + 0.35 * u[2]
        fg = (bg - (0.5 - 0.25 * d)) * u[3]
        if u[4] < 0.2 * d:
            fg, bg = 1.0 - fg, 1.0 - bg

        # Layout: per-character advance plus random tracking; padding relative to the text height,
        # widened by the horizontal reach of the shear.
        shear = math.radians(15.0 * d * (2 * u[5] - 1))
        angle = math.radians(2.0 * d * (2 * u[6] - 1))
        spacing = (0.18 * u[7] - 0.03) * size
        pad_top, pad_bottom = round((0.05 + 0.25 * u[8]) * band), round((0.05 + 0.25 * u[9]) * band)
        height = band + pad_top + pad_bottom
        slack = math.ceil(abs(math.tan(shear)) * height / 2)
        pad_left = round((0.05 + 0.45 * u[10]) * band) + slack
        pad_right = round((0.05 + 0.45 * u[11]) * band) + slack
        glyphs = [_glyph(font_name, size, c) for c in text]
        width = max(1, round(pad_left + sum(g[3] + spacing for g in glyphs) - spacing + pad_right))

        bg_level = round(255 * bg)
        img = Image.new("L", (width, height), bg_level)
        x, y, ink = float(pad_left), pad_top - top, round(255 * fg)
        for mask, left, glyph_top, advance in glyphs:
            if mask is not None:
                img.paste(ink, (round(x) + left, y + glyph_top), mask)
            x += advance + spacing
        if d > 0:
            img = img.transform(
                img.size, Image.Transform.AFFINE, _inverse_affine(angle, shear, width / 2, height / 2),
                resample=Image.Resampling.BILINEAR, fillcolor=bg_level,
            )

        # Resize to the output height (with a small random horizontal stretch), then blur and noise.
        stretch = 1.0 + 0.15 * d * (2 * u[12] - 1)
        img = img.resize((max(1, round(width * h_out / height * stretch)), h_out), Image.Resampling.BILINEAR)
        radius = 1.2 * d * u[13]
        if radius > 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
        sigma = 0.08 * d * u[14]
        if sigma > 0:
            arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
            np.clip(arr, 0.0, 1.0, out=arr)
        return torch.from_numpy(arr).unsqueeze(0)


def _character_probabilities(
    letters: str,
    characters: str,
    zipf_exponent: float,
    char_weights: Sequence[float] | Mapping[str, float] | None,
) -> np.ndarray | None:
    """Drawing probabilities of ``letters`` (``characters`` without the space), or ``None`` for uniform."""
    if zipf_exponent < 0:
        raise ValueError(f"zipf_exponent must be >= 0, got {zipf_exponent}")
    if char_weights is not None and zipf_exponent > 0:
        raise ValueError("give zipf_exponent or char_weights, not both")
    if char_weights is not None:
        if isinstance(char_weights, Mapping):
            unknown = set(char_weights) - set(characters)
            if unknown:
                raise ValueError(f"char_weights has characters not in the charset: {sorted(unknown)!r}")
            weights = [float(char_weights.get(c, 0.0)) for c in letters]
        else:
            if len(char_weights) != len(characters):
                raise ValueError(f"char_weights has {len(char_weights)} weights for {len(characters)} characters")
            weights = [float(w) for c, w in zip(characters, char_weights) if c != " "]
    elif zipf_exponent > 0:
        weights = [(rank + 1) ** -zipf_exponent for rank in range(len(letters))]
    else:
        return None
    probs = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"char_weights must be finite, non-negative and not all 0, got {weights}")
    return probs / probs.sum()


def _inverse_affine(angle: float, shear: float, cx: float, cy: float) -> tuple[float, ...]:
    """PIL ``AFFINE`` data (output -> input map) for ``rotate(angle) @ shear_x(shear)`` about ``(cx, cy)``.

    Angles in radians. The forward map is ``p' = c + R S (p - c)``, so the inverse is
    ``p = c + S^-1 R^-1 (p' - c)`` with ``S^-1 R^-1 = [[cos + t sin, sin - t cos], [-sin, cos]]``, t = tan(shear).
    """
    cos, sin, t = math.cos(angle), math.sin(angle), math.tan(shear)
    a, b, d, e = cos + t * sin, sin - t * cos, -sin, cos
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


def make_renderer(kind: str = "digits", characters: str | None = None, **kwargs) -> LineRenderer:
    """A :class:`LineRenderer` for a kind: ``"digits"`` (default characters ``0-9``) or ``"text"``
    (default :data:`TEXT_CHARACTERS`: digits, ASCII letters, space and common punctuation).

    ``kwargs`` go to :class:`LineRenderer` (``min_length``, ``max_length``, ``height``, ``words``, ...).
    """
    if kind not in KIND_CHARACTERS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KIND_CHARACTERS)}")
    return LineRenderer(KIND_CHARACTERS[kind] if characters is None else characters, **kwargs)


class SyntheticLines(Dataset):
    """A map-style dataset of rendered lines: index ``i`` always gives the sample of ``rng([seed, i])``.

    ``len()`` is ``size``, but any index ``>= 0`` is valid: indices past ``size`` give further,
    distinct samples (the "virtual" stream the training sampler uses for fresh data each epoch).
    :meth:`prerender` renders ``0 .. size-1`` once and keeps them in memory (for fixed val/test sets).

    Args:
        renderer: draws ``(image, text)`` from a ``numpy.random.Generator``.
        charset: encodes texts into targets (its blank placement decides the ids); must contain
            every character the renderer can produce.
        size: nominal number of samples.
        seed: non-negative stream seed; use different seeds for different splits.

    Items are dicts ``{"image": float32 (1, H, W) in [0, 1], "text": str, "target": int64 (L,)}``.
    """

    def __init__(self, renderer: LineRenderer, charset: Charset, size: int, seed: int = 0) -> None:
        if size < 0 or seed < 0:
            raise ValueError(f"size and seed must be non-negative, got size={size}, seed={seed}")
        charset.encode(renderer.characters)  # fail early if the renderer can emit unknown characters
        self.renderer = renderer
        self.charset = charset
        self.size = size
        self.seed = seed
        self._cache: list[dict] | None = None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            raise IndexError(f"index must be non-negative, got {index}")
        if self._cache is not None and index < self.size:
            return self._cache[index]
        image, text = self.renderer(np.random.default_rng([self.seed, index]))
        return {"image": image, "text": text, "target": torch.tensor(self.charset.encode(text), dtype=torch.long)}

    def text(self, index: int) -> str:
        """The text of sample ``index`` without rendering it (cheap: used to group batches by length)."""
        if self._cache is not None and index < self.size:
            return self._cache[index]["text"]
        return self.renderer.sample_text(np.random.default_rng([self.seed, index]))

    def prerender(self) -> SyntheticLines:
        """Render samples ``0 .. size-1`` once and serve them from memory from now on; returns ``self``."""
        if self._cache is None:
            self._cache = [self[i] for i in range(self.size)]
        return self


class SyntheticDataModule(LineDataModule):
    """Synthetic text lines for train/val/test, rendered on the fly.

    Args:
        kind: ``"digits"`` or ``"text"`` (see :func:`data.synthetic.make_renderer`).
        charset: the characters (class order); ``None`` uses the kind's default.
        min_length, max_length: inclusive text-length range.
        height: image height in px.
        train_size, val_size, test_size: samples per epoch / in the fixed val and test sets.
        batch_size: samples per batch (smaller last batches are kept).
        num_workers: rendering worker processes for training (persistent when > 0).
        seed: base seed. Split ``k`` of ``("train", "val", "test")`` uses stream seed ``3*seed + k``,
            so the streams are disjoint for every (seed, split) pair.
        words: optional word list (sequence or file path) for ``kind="text"``.
        distortion: augmentation strength in ``[0, 1]`` (0.5 = moderate).
        zipf_exponent, char_weights: skewed character frequencies for random-character lines (all
            splits), see :class:`data.synthetic.LineRenderer`; the defaults draw characters uniformly.
        blank: CTC blank class id; characters take the other ids.
        fresh_train: if True every epoch renders new training samples (see :class:`data.batching.EpochSampler`),
            else the same ``train_size`` samples are reshuffled each epoch.
        prerender_eval: render val/test once in ``setup`` and keep them in memory; their loaders
            then run in the main process (``num_workers=0``), since collating is cheap.
        group_by_length: batch samples of similar text length together
            (:class:`data.batching.LengthGroupedBatchSampler`; train batches in a seeded random order, val/test in
            length order) to cut padding, i.e. wasted model compute; False batches in sampler order.
        augment: augments training images on the fly (:class:`data.augment.LineAugment`, ``augment=line``) on top
            of the renderer's ``distortion``; ``None`` (the default: every line is freshly rendered anyway) does not.

    Setup, loaders and data-parallel sharding are :class:`data.line_datamodule.LineDataModule`'s. ``.charset``
    (a :class:`Charset`) exists right after construction, so a model can read ``charset.num_classes`` before
    ``setup``. Batches are :func:`data.batching.collate_lines` dicts.
    """

    endless_train = True

    def __init__(
        self,
        kind: str = "digits",
        charset: str | None = None,
        min_length: int = 1,
        max_length: int = 10,
        height: int = 32,
        train_size: int = 20000,
        val_size: int = 500,
        test_size: int = 1000,
        batch_size: int = 64,
        num_workers: int = 1,
        seed: int = 0,
        words: Sequence[str] | str | None = None,
        distortion: float = 0.5,
        blank: int = 0,
        fresh_train: bool = True,
        prerender_eval: bool = True,
        group_by_length: bool = True,
        zipf_exponent: float = 0.0,
        char_weights: Sequence[float] | Mapping[str, float] | None = None,
        augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        super().__init__({"train": train_size, "val": val_size, "test": test_size}, batch_size, num_workers, seed,
                         group_by_length, augment)
        self.renderer = make_renderer(
            kind, charset, min_length=min_length, max_length=max_length, height=height,
            words=words, distortion=distortion, zipf_exponent=zipf_exponent, char_weights=char_weights,
        )
        self.charset = Charset(self.renderer.characters, blank=blank)
        self.fresh_train = fresh_train
        self.prerender_eval = prerender_eval

    def build_dataset(self, split: str) -> SyntheticLines:
        """The split's lines (val/test pre-rendered if ``prerender_eval``)."""
        ds = SyntheticLines(self.renderer, self.charset, self.sizes[split], seed=3 * self.seed + SPLITS.index(split))
        return ds.prerender() if split != "train" and self.prerender_eval else ds

    def length_key(self, dataset: SyntheticLines) -> Callable[[int], int]:
        return lambda i: len(dataset.text(i))

    @property
    def eval_num_workers(self) -> int:
        return 0 if self.prerender_eval else self.num_workers
