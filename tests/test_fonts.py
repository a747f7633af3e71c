"""Your own fonts for the synthetic renderer (``data.fonts``), large charsets (``data=text_large``).

A CJK font installed for the test (Debian's ``fonts-wqy-microhei``; ``.ci/run`` installs it) is needed for the
large-charset tests: they skip, saying so, without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFont

from conftest import compose_train, config_options
from crnn.pipeline import train
from data.synthetic import (
    DEFAULT_FONT,
    LineRenderer,
    SyntheticDataModule,
    covered_characters,
    find_fonts,
    installed_fonts,
    read_characters,
)

WQY_FOLDER = Path("/usr/share/fonts/truetype/wqy")
needs_cjk_font = pytest.mark.skipif(
    not WQY_FOLDER.is_dir(), reason=f"no CJK font in {WQY_FOLDER}: apt-get install fonts-wqy-microhei (.ci/run does)")
CJK = "".join(chr(code) for code in range(0x4E00, 0x4E00 + 3000))  # 3 000 common-block ideographs
DEJAVU_SANS = next(f for f in installed_fonts() if Path(f).name == "DejaVuSans.ttf")


def has_glyph_by_rendering(font: str, character: str) -> bool:
    """Independent of the cmap: the glyph's mask differs from the missing-glyph box (a private-use code point)."""
    loaded = ImageFont.truetype(font, 24) if font != DEFAULT_FONT else ImageFont.load_default(24)
    mask, missing = loaded.getmask(character), loaded.getmask("\ue000")
    return (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def test_find_fonts_takes_files_and_folders_and_names_a_bad_entry(tmp_path):
    folder = Path(DEJAVU_SANS).parent
    fonts = find_fonts([str(folder), DEJAVU_SANS, "default"])
    assert DEJAVU_SANS in fonts and fonts.count(DEJAVU_SANS) == 1 and fonts[-1] == "default"
    assert all(Path(f).suffix == ".ttf" for f in fonts[:-1]) and len(fonts) > 5
    with pytest.raises(ValueError, match="nope.ttf"):
        find_fonts([str(tmp_path / "nope.ttf")])
    with pytest.raises(ValueError, match="holds no"):
        find_fonts([str(tmp_path)])


def test_coverage_from_the_cmap_agrees_with_rendering():
    sample = "09azAZé€ΩЖ" + CJK[:20] + "\u0e01\u05d0"  # Latin, Greek, Cyrillic, CJK, Thai, Hebrew
    for font in (DEJAVU_SANS, "default"):
        covered = covered_characters(font, sample)
        assert covered == "".join(c for c in sample if has_glyph_by_rendering(font, c)), font
    assert set(CJK[:20]).isdisjoint(covered_characters(DEJAVU_SANS, sample))


def test_a_font_lacking_characters_never_draws_them():
    """DejaVu Sans has Latin but no CJK: lines drawn with it use only its characters (no tofu boxes), the
    CJK-capable font draws the rest; every line's characters are covered by the font that drew it."""
    pillow = "default"
    characters = "abc" + "ЖЩ"  # Pillow's built-in font has Latin but not Cyrillic
    renderer = LineRenderer(characters, 3, 8, fonts=[pillow, DEJAVU_SANS], distortion=0.0)
    assert renderer.coverage[pillow] == "abc" and renderer.coverage[DEJAVU_SANS] == characters
    rng = np.random.default_rng(0)
    drawn = {pillow: set(), DEJAVU_SANS: set()}
    for _ in range(60):
        font = renderer._draw_font(rng)
        text = renderer._sample_text(rng, font)
        drawn[font] |= set(text)
    assert drawn[pillow] <= set("abc") and drawn[DEJAVU_SANS] & set("ЖЩ")
    for index in range(5):  # sample_text and __call__ agree (length grouping reads texts without rendering)
        assert renderer.sample_text(np.random.default_rng([7, index])) == renderer(np.random.default_rng([7, index]))[1]


def test_characters_no_font_has_are_an_error_or_skipped_with_a_warning():
    with pytest.raises(ValueError, match="no glyph for 2 of the 5 characters: 'ЖЩ'"):
        LineRenderer("abcЖЩ", 3, 8, fonts=["default"])
    with pytest.warns(UserWarning, match="2 characters no font draws.*'ЖЩ'"):
        renderer = LineRenderer("abcЖЩ", 3, 8, fonts=["default"], uncovered="skip")
    rng = np.random.default_rng(1)
    assert not set("".join(renderer.sample_text(rng) for _ in range(50))) & set("ЖЩ")
    with pytest.raises(ValueError, match="uncovered"):
        LineRenderer("abc", fonts=["default"], uncovered="maybe")


def test_read_characters(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("一\n丁\n \n一\nab\n", encoding="utf-8")  # PaddleOCR's format, a space line, a repeat
    assert read_characters(path) == "一丁 ab"
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_characters(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="missing.txt"):
        read_characters(tmp_path / "missing.txt")


@needs_cjk_font
def test_large_charset_lines_render_in_a_cjk_font(tmp_path):
    (tmp_path / "chars.txt").write_text("\n".join(CJK), encoding="utf-8")
    datamodule = SyntheticDataModule(kind="text", charset_file=str(tmp_path / "chars.txt"), fonts=[str(WQY_FOLDER)],
                                     min_length=4, max_length=10, val_size=8, test_size=8, batch_size=4)
    assert datamodule.charset.num_classes == 3001
    datamodule.setup(None)
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["images"].shape[:3] == (4, 1, 32)
    for row, length, text in zip(batch["targets"], batch["target_lengths"], batch["texts"]):
        assert datamodule.charset.decode(row[:length]) == text and set(text) <= set(CJK)
    font = datamodule.renderer.fonts[0]
    assert all(has_glyph_by_rendering(font, c) for c in "".join(batch["texts"]))


def large_charset_overrides(tmp_path: Path) -> list[str]:
    (tmp_path / "chars.txt").write_text("\n".join(CJK), encoding="utf-8")
    return ["data=text_large", f"data.charset_file={tmp_path / 'chars.txt'}", f"data.fonts=[{WQY_FOLDER}]"]


@needs_cjk_font
@pytest.mark.parametrize("loss", config_options("loss"))
def test_text_large_trains_a_few_steps_with_every_loss(loss, tmp_path):
    metrics = train(compose_train(*large_charset_overrides(tmp_path), "debug=fast_dev_run", "trainer.fast_dev_run=2",
                                  "model=crnn_small", f"loss={loss}", output_dir=tmp_path))
    assert metrics["steps"] == 2 and math.isfinite(metrics["val/cer"])


def test_text_large_says_which_keys_it_needs():
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_train("data=text_large")
    with pytest.raises(MissingMandatoryValue, match="charset_file"):
        cfg.data.charset_file
