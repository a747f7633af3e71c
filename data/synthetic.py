"""Synthetic text-line images, rendered on the fly and reproducible per ``(seed, index)``, and
:class:`SyntheticDataModule`, their train/val/test splits.

Every sample draws all of its randomness (text, font, size, padding, spacing, grey levels, affine
distortion, blur, noise) from ``numpy.random.default_rng([seed, index])``, so any process, worker
or epoch that asks for the same index of the same seed gets the same sample, and no global RNG is
touched.

Fonts: by default the DejaVu TTFs that matplotlib ships and Pillow's built-in font
(``ImageFont.load_default(size)``, named ``"default"`` here), each used only if it has a glyph for every
character (matplotlib's ``DejaVu*Display`` fonts, for example, have no digits). Or your own (``fonts``: font
files and folders, e.g. CJK fonts for a large charset): a font covering only part of the characters draws
lines from the characters it has (its cmap, read with fontTools), never a missing-glyph box; a character no
given font has is an error naming it (or, with ``uncovered="skip"``, left out of the lines, with a warning).
Glyphs are pasted one by one (for random letter spacing), so scripts that need shaping (Arabic, Indic) are
drawn in their isolated forms: not suitable for them, whether or not Pillow has raqm.

Rendering is plain Pillow + numpy for speed: fonts and per-character glyph masks are cached per
process, a line is pasted glyph by glyph (for random letter spacing), then one affine warp
(rotation + shear), a resize to the output height, an optional Gaussian blur and numpy noise.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
import string
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
UNCOVERED_POLICIES = ("error", "skip")
log = logging.getLogger(__name__)


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


def find_fonts(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """Font files from a list of font files and folders (searched recursively for ``.ttf``, ``.otf``, ``.ttc``,
    ``.otc``), sorted per folder; ``"default"`` stands for Pillow's built-in font.

    Raises:
        ValueError: naming the entry, for a path that does not exist or a folder without fonts.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[str] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if str(entry) == DEFAULT_FONT:
            found.append(DEFAULT_FONT)
        elif path.is_dir():
            files = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in FONT_SUFFIXES and f.is_file())
            if not files:
                raise ValueError(f"data.fonts: folder {str(entry)!r} holds no {'/'.join(FONT_SUFFIXES)} font files")
            found.extend(files)
        elif path.is_file():
            found.append(str(path))
        else:
            raise ValueError(f"data.fonts: {str(entry)!r} is neither a font file nor a folder")
    return list(dict.fromkeys(found))  # a font given twice is used once


def covered_characters(font: str, characters: str) -> str:
    """The characters of ``characters`` (in order) that ``font`` can draw; the space always counts as covered.

    A font file's character map (fontTools ``getBestCmap``; first font of a collection, as Pillow loads it) says
    which code points have a glyph. Pillow's built-in font, or a file fontTools cannot read, is checked by
    rendering: a character whose mask equals that of a private-use code point (the missing-glyph box) has no
    glyph.
    """
    code_points = _cmap(font)
    if code_points is not None:
        return "".join(c for c in characters if c == " " or ord(c) in code_points)
    f = load_font(font, 24)
    missing = f.getmask(_MISSING_GLYPH)
    missing = (missing.size, bytes(missing))
    return "".join(c for c in characters if c == " " or (lambda m: (m.size, bytes(m)))(f.getmask(c)) != missing)


@functools.lru_cache(maxsize=None)
def _cmap(font: str) -> frozenset[int] | None:
    """Code points with a glyph in ``font``'s best character map, or None where fontTools cannot tell."""
    if font == DEFAULT_FONT:
        return None
    try:
        from fontTools.ttLib import TTFont

        with TTFont(font, fontNumber=0, lazy=True) as opened:
            cmap = opened.getBestCmap()
    except Exception:  # not an sfnt font fontTools reads (e.g. a Type 1 font Pillow can still load)
        return None
    return None if cmap is None else frozenset(cmap)


def font_covers(font: str, characters: str) -> bool:
    """Whether ``font`` has a real glyph (not the missing-glyph box) for every non-space character."""
    return len(covered_characters(font, characters)) == len(characters)


@functools.lru_cache(maxsize=None)
def _text_band(font: str, size: int, characters: str) -> tuple[int, int]:
    """Vertical extent ``(top, bottom)`` of all ``characters`` drawn at y=0 (anchor "la"), in px.

    Using the charset's extent rather than each line's own ink keeps the baseline and text height
    consistent within a kind: digits fill the cap height, mixed text spans ascenders to descenders.
    """
    _, top, _, bottom = load_font(font, size).getbbox(characters)
    return top, bottom


@functools.lru_cache(maxsize=1 << 17)  # large charsets: 6 000 characters x sizes x fonts
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


def read_characters(path: str | os.PathLike) -> str:
    """The characters of a UTF-8 file, in order of first appearance: one per line (PaddleOCR's dictionary
    format) or running text; line breaks and tabs are not characters, a line holding only a space gives the
    space.

    Raises:
        ValueError: naming the file, if it does not exist or holds no character.
    """
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"data.charset_file: cannot read {str(path)!r}: {error}") from None
    characters = "".join(dict.fromkeys(c for c in text if c not in "\r\n\t\ufeff"))
    if not characters:
        raise ValueError(f"data.charset_file: {str(path)!r} holds no characters")
    return characters


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
        fonts: font files and folders (see :func:`find_fonts`) / ``"default"``; ``None`` uses
            :func:`installed_fonts`, each only if it covers every character. Given fonts that cover only part of
            ``characters`` draw random lines from the characters they have (word lines: only fonts covering
            the whole line), never a missing-glyph box.
        uncovered: what to do with characters none of the fonts can draw: ``"error"`` (default: a
            ``ValueError`` naming them) or ``"skip"`` (they never appear in lines; a warning names them; they
            stay in the charset, so class ids do not change).
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
        fonts: Sequence[str] | str | None = None,
        zipf_exponent: float = 0.0,
        char_weights: Sequence[float] | Mapping[str, float] | None = None,
        uncovered: str = "error",
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
        self._sizes = list(range(round(0.6 * height), round(1.3 * height) + 1, max(1, height // 10)))
        self._letters = characters.replace(" ", "")
        self._spaces = " " in characters
        self.zipf_exponent = float(zipf_exponent)
        self._probs = _character_probabilities(self._letters, characters, zipf_exponent, char_weights)
        if self._probs is not None and self.words is not None:
            raise ValueError("zipf_exponent/char_weights apply to random-character lines, not to words")
        self._choose_fonts(fonts, uncovered)

    def _choose_fonts(self, fonts: Sequence[str] | str | None, uncovered: str) -> None:
        """Set ``fonts`` and, where some font covers only part of the characters, each font's own choices."""
        if uncovered not in UNCOVERED_POLICIES:
            raise ValueError(f"uncovered must be one of {UNCOVERED_POLICIES}, got {uncovered!r}")
        characters = self.characters
        if fonts is None:  # the installed defaults: only fonts that draw everything
            candidates = installed_fonts()
            self.fonts = [f for f in candidates if font_covers(f, characters)]
            if not self.fonts:
                raise ValueError(f"none of the fonts {candidates} covers the characters {characters!r}")
            self.coverage = {f: characters for f in self.fonts}
        else:
            candidates = find_fonts(fonts)
            coverage = {f: covered_characters(f, characters) for f in candidates}
            self.coverage = {f: chars for f, chars in coverage.items() if chars.replace(" ", "")}
            useless = [f for f in candidates if f not in self.coverage]
            if useless:
                warnings.warn(f"data.fonts: {len(useless)} font(s) draw none of the characters, not used: {useless}")
            self.fonts = list(self.coverage)
            drawable = set("".join(self.coverage.values()))
            missing = [c for c in characters if c not in drawable]
            if missing and (uncovered == "error" or len(missing) == len(characters.replace(" ", ""))):
                raise ValueError(
                    f"no font in data.fonts {candidates} has no glyph for {len(missing)} of the {len(characters)} "
                    f"characters: {''.join(missing[:40])!r}{' ...' if len(missing) > 40 else ''} "
                    f"(give fonts that have them, or uncovered=skip to leave them out of the lines)")
            if missing:
                warnings.warn(f"{len(missing)} characters no font draws are left out of the lines: "
                              f"{''.join(missing[:40])!r}{' ...' if len(missing) > 40 else ''}")
            log.info("fonts: %s", ", ".join(f"{Path(f).name} {len(c)}/{len(characters)}" for f, c in self.coverage.items()))
        # per-font random-line choices, only where some font lacks characters (else the one global choice, so
        # the samples of full-coverage fonts are what they always were)
        self._font_letters = None
        if any(len(chars) < len(characters) for chars in self.coverage.values()):
            self._font_letters = {}
            for font, chars in self.coverage.items():
                index = np.array([i for i, c in enumerate(self._letters) if c in set(chars)], dtype=np.int64)
                probs = None if self._probs is None else self._probs[index]
                if probs is not None and probs.sum() <= 0:
                    continue  # only zero-weight characters: this font draws no random line
                self._font_letters[font] = (index, None if probs is None else probs / probs.sum())
            if self.words is not None:
                for word in self.words:
                    if not self._fonts_for(word):
                        raise ValueError(f"no font in data.fonts draws every character of the word {word!r}")

    def _fonts_for(self, text: str) -> list[str]:
        """The fonts that can draw every character of ``text``."""
        needed = set(text)
        return [f for f, chars in self.coverage.items() if needed <= set(chars)]

    @property
    def char_probabilities(self) -> dict[str, float]:
        """Probability of each non-space character at a drawn position (uniform unless skewed)."""
        if self._probs is None:
            return {c: 1.0 / len(self._letters) for c in self._letters}
        return dict(zip(self._letters, self._probs.tolist()))

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
        """Draw a text and render it: ``(image (1, H, W) float32 in [0, 1], text)``."""
        font = self._draw_font(rng)
        text = self._sample_text(rng, font)
        return self.render(text, rng, font), text

    def sample_text(self, rng: np.random.Generator) -> str:
        """A random text of ``min_length <= len <= max_length`` characters, never starting or ending
        with a space (a word line cut right after a word drops that space, so it may be one shorter).
        The same draws as :meth:`__call__`, so the same ``rng`` state gives the same text."""
        return self._sample_text(rng, self._draw_font(rng))

    def _draw_font(self, rng: np.random.Generator) -> str | None:
        """The font of a random-character line drawn first, when fonts cover different characters; else None
        (no draw: the font is chosen in :meth:`render`)."""
        if self._font_letters is None or self.words is not None:
            return None
        fonts = list(self._font_letters)
        return fonts[int(rng.integers(len(fonts)))]

    def _sample_text(self, rng: np.random.Generator, font: str | None) -> str:
        length = int(rng.integers(self.min_length, self.max_length + 1))
        if self.words is not None:
            line = self.words[rng.integers(len(self.words))]
            while len(line) < length:
                line += " " + self.words[rng.integers(len(self.words))]
            return line[:length].rstrip()
        if font is None:
            index, probs = None, self._probs
        else:
            index, probs = self._font_letters[font]
        count = len(self._letters) if index is None else len(index)
        picks = rng.integers(count, size=length) if probs is None else rng.choice(count, size=length, p=probs)
        if index is not None:
            picks = index[picks]
        chars = [self._letters[i] for i in picks]
        if self._spaces:
            for i in np.flatnonzero(rng.random(length) < 0.15):
                if 0 < i < length - 1 and chars[i - 1] != " ":
                    chars[i] = " "
        return "".join(chars)

    def render(self, text: str, rng: np.random.Generator, font: str | None = None) -> torch.Tensor:
        """Render ``text`` with random style and distortions: float32 tensor ``(1, H, W)`` in ``[0, 1]``.

        ``font``: the font to use; None draws one among those that have every character of ``text``.
        """
        d, h_out = self.distortion, self.height
        u = rng.random(15).tolist()  # one draw for all style parameters (much cheaper than 15 separate calls)
        if font is None:
            fonts = self.fonts if self._font_letters is None else self._fonts_for(text)
            if not fonts:
                raise ValueError(f"no font in {self.fonts} draws every character of {text!r}")
            font = fonts[int(u[0] * len(fonts))]
        font_name = font
        size = self._sizes[int(u[1] * len(self._sizes))]
        top, bottom = _text_band(font_name, size, self.coverage[font_name])
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
        fonts: font files and folders to render with (``None``: the installed DejaVu fonts and Pillow's);
            ``uncovered``: ``"error"`` or ``"skip"`` for characters none of them has (see
            :class:`data.synthetic.LineRenderer`).
        charset_file: a UTF-8 file giving the characters instead of ``charset`` (see :func:`read_characters`),
            e.g. a 6 000-character dictionary for a large-charset model.
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
        fonts: Sequence[str] | str | None = None,
        charset_file: str | None = None,
        uncovered: str = "error",
    ) -> None:
        super().__init__({"train": train_size, "val": val_size, "test": test_size}, batch_size, num_workers, seed,
                         group_by_length, augment)
        if charset_file is not None:
            if charset is not None:
                raise ValueError("give data.charset or data.charset_file, not both")
            charset = read_characters(charset_file)
        self.renderer = make_renderer(
            kind, charset, min_length=min_length, max_length=max_length, height=height,
            words=words, distortion=distortion, zipf_exponent=zipf_exponent, char_weights=char_weights,
            fonts=None if fonts is None else list(fonts) if not isinstance(fonts, str) else fonts, uncovered=uncovered,
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
