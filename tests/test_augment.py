"""Line augmentation (``augment=line``): hand-worked results of the hand-written transforms, shapes, determinism per
(seed, epoch, index), training only, the same in DataLoader workers, the config group, and show_augment's montage."""

import inspect

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from crnn.pipeline import train
from data import FolderDataModule, write_lmdb
from data.augment import (AugmentedLines, LineAugment, background, move_edges, sample_seed, spread_ink,
                          warp_edges)
from data.images import image_to_tensor

from conftest import compose_train, config_options, load_script, text_large_overrides

ALL_ON = {name: 1.0 for name in ("ink_p", "edges_p", "affine_p", "perspective_p", "warp_p", "elastic_p", "color_p",
                                 "blur_p", "noise_p")}
GEOMETRY_ONLY = {**ALL_ON, "color_p": 0.0, "blur_p": 0.0, "noise_p": 0.0}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Rendered digit lines as gt.txt folders: train 24, val 8, test 8 (scripts/render_dataset.py), 4-10 digits
    (distinct labels: the tests below find lines by text)."""
    render_dataset = load_script("render_dataset")
    root = tmp_path_factory.mktemp("digits")
    for seed, (split, size) in enumerate((("train", 24), ("val", 8), ("test", 8))):
        render_dataset.main(["--size", str(size), "--seed", str(seed), "--min-length", "4", "--output",
                             str(root / split)])
        labels = [line.split("\t")[1] for line in (root / split / "gt.txt").read_text().splitlines()]
        assert len(set(labels)) == size
    return root


def folder_module(root, **kwargs) -> FolderDataModule:
    kwargs = {"batch_size": 8, "num_workers": 0, "seed": 3, **kwargs}
    return FolderDataModule(root / "train", root / "val", root / "test", **kwargs)


def batches(loader) -> list[dict]:
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["texts"] == y["texts"]
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["widths"], y["widths"])


# ------------------------------------------------------------------------------------------------ transforms
def test_background_is_the_median_of_the_border():
    image = torch.full((1, 5, 6), 0.9)
    image[0, 0, 2] = 0.1  # one dark border pixel does not move the median
    image[0, 1:4, 1:5] = 0.0  # the interior (text) does not count
    assert background(image).tolist() == [[[pytest.approx(0.9)]]]


@pytest.mark.parametrize("ink", [-0.8, 0.8])  # dark ink on light paper, light ink on dark paper (paper at 0)
def test_spread_ink_dilates_and_erodes_the_ink_by_one_pixel(ink):
    dot = torch.zeros(1, 7, 7)
    dot[0, 3, 3] = ink
    block = torch.zeros(1, 7, 7)
    block[0, 2:5, 2:5] = ink
    assert torch.equal(spread_ink(dot, 1.0, thicker=True), block)
    assert torch.equal(spread_ink(block, 1.0, thicker=False), dot)
    assert torch.allclose(spread_ink(dot, 0.25, thicker=True), dot + 0.25 * (block - dot))


def test_warp_edges_with_a_constant_shift_translates():
    image = torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp_edges(image, torch.zeros(2, 2, 4)), image, atol=1e-6)
    right = torch.zeros(2, 2, 4)
    right[0] = 2.0  # every control point 2 px to the right
    moved = warp_edges(image, right)
    assert torch.allclose(moved[..., 2:], image[..., :-2], atol=1e-5) and moved[..., :2].abs().max() < 1e-6
    down = torch.zeros(2, 2, 3)
    down[1] = 1.0
    assert torch.allclose(warp_edges(image, down)[:, 1:], image[:, :-1], atol=1e-5)


def test_move_edges_pads_with_zero_and_keeps_the_shape():
    image = torch.rand(1, 16, 40, generator=torch.Generator().manual_seed(0)) + 1.0
    assert move_edges(image, [0, 0, 0, 0]) is image
    padded = move_edges(image, [40, 0, 0, 0])  # twice as wide, left half paper, squeezed back to 40 px
    assert padded.shape == image.shape
    assert padded[..., :18].abs().max() < 1e-6 and padded[..., 22:].min() > 0.9
    assert move_edges(image, [-5, -5, -1, -1]).shape == image.shape


@pytest.mark.parametrize("channels, paper", [(1, [0.8]), (3, [0.9, 0.7, 0.5])])
def test_geometry_fills_with_the_paper_colour(channels, paper):
    """A blank page stays blank under every geometric transform (torchvision's fill alone would draw black)."""
    page = torch.tensor(paper).view(channels, 1, 1).expand(channels, 32, 120).clone()
    augment = LineAugment(**GEOMETRY_ONLY, degrees=5, shear=20, perspective=0.3, warp=0.3, edge_pad=1.0)
    for seed in range(10):
        assert torch.allclose(augment(page, seed), page, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height, width", [(32, 1), (32, 2), (32, 7), (32, 45), (32, 400), (48, 150), (5, 9)])
def test_every_knob_keeps_height_width_and_range(channels, height, width):
    image = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(width))
    augment = LineAugment(**ALL_ON)
    for seed in range(4):
        out = augment(image, seed)
        assert out.shape == image.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_deterministic_per_seed_and_the_callers_rng_is_untouched():
    image = torch.rand(1, 32, 90, generator=torch.Generator().manual_seed(0))
    augment = LineAugment(**ALL_ON)
    state = torch.get_rng_state()
    first = augment(image, 7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(augment(image, 7), first) and not torch.equal(augment(image, 8), first)


def test_a_probability_outside_0_1_names_the_key():
    with pytest.raises(ValueError, match="augment.blur_p"):
        LineAugment(blur_p=1.5)


def test_sample_seed_depends_on_seed_epoch_and_index():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


# ------------------------------------------------------------------------------------------------ datasets, loaders
def test_augmented_lines_per_epoch_and_index(digits):
    lines = folder_module(digits).dataset("train")
    augmented = AugmentedLines(lines, LineAugment(), seed=3)
    assert len(augmented) == len(lines)
    for index in range(4):
        item, raw = augmented[1, index], lines[index]
        assert item["text"] == raw["text"] and torch.equal(item["target"], raw["target"])
        assert item["image"].shape == raw["image"].shape
        assert torch.equal(item["image"], augmented[1, index]["image"])  # the same (epoch, index) again
        assert torch.equal(augmented[0, index]["image"], augmented[index]["image"])  # a plain index is epoch 0
    assert sum(not torch.equal(augmented[0, i]["image"], augmented[1, i]["image"]) for i in range(8)) >= 6


def test_only_training_images_are_augmented_and_widths_are_exact(digits):
    plain, augmented = folder_module(digits), folder_module(digits, augment=LineAugment())
    for module in (plain, augmented):
        module.setup(None)
    for split in ("val", "test"):
        assert_same_batches(batches(getattr(plain, f"{split}_dataloader")()),
                            batches(getattr(augmented, f"{split}_dataloader")()))
    train_plain, train_aug = batches(plain.train_dataloader()), batches(augmented.train_dataloader())
    assert [b["texts"] for b in train_plain] == [b["texts"] for b in train_aug]  # the same order
    widths = {r.label: r.width for r in plain.dataset("train").records}
    for x, y in zip(train_plain, train_aug):
        assert torch.equal(x["widths"], y["widths"]) and x["images"].shape == y["images"].shape
        assert x["widths"].tolist() == [widths[text] for text in x["texts"]]
        for b, width in enumerate(y["widths"].tolist()):  # the collate's padding stays zero
            assert not y["images"][b, ..., width:].any()
        assert not torch.equal(x["images"], y["images"])


def test_workers_give_the_images_of_the_main_process_in_every_epoch(digits):
    """The epoch travels with the indices: persistent workers see each new epoch without being restarted."""
    expected = {}
    main = folder_module(digits, augment=LineAugment())
    loader = main.train_dataloader()
    for epoch in range(2):
        loader.batch_sampler.sampler.set_epoch(epoch)
        expected[epoch] = batches(loader)
    workers = folder_module(digits, augment=LineAugment(), num_workers=2)
    loader = workers.train_dataloader()
    assert loader.persistent_workers
    for epoch in range(2):
        loader.batch_sampler.sampler.set_epoch(epoch)
        assert_same_batches(batches(loader), expected[epoch])
    images = [{text: image for batch in expected[epoch] for text, image in zip(batch["texts"], batch["images"])}
              for epoch in (0, 1)]
    assert sum(not torch.equal(images[0][text], images[1][text]) for text in images[0]) >= 20  # new views


def test_overfitting_turns_augmentation_off(digits):
    """``trainer.overfit_batches`` memorises the same images every epoch."""
    plain, augmented = folder_module(digits), folder_module(digits, augment=LineAugment())
    for module in (plain, augmented):
        module.overfit(1)
    assert augmented.augment is None
    assert_same_batches(batches(augmented.train_dataloader()), batches(plain.train_dataloader()))


# ------------------------------------------------------------------------------------------------ config
def folder_overrides(root) -> list[str]:
    return [f"data.{split}_dir={root / split}" for split in ("train", "val", "test")]


def test_augment_group_options():
    assert config_options("augment") == ["line", "none"]
    assert compose_train().augment is None and compose_train().data.augment is None


def test_augment_line_lists_every_knob_at_its_default():
    """conf/augment/line.yaml documents every argument of LineAugment, with the same values as the code."""
    knobs = {key: value for key, value in compose_train("augment=line").augment.items() if key != "_target_"}
    defaults = {name: p.default for name, p in inspect.signature(LineAugment).parameters.items()}
    assert knobs == defaults


def test_augment_none_is_bit_identical_to_no_augmentation(digits):
    common = ["data=folder", *folder_overrides(digits), "seed=3", "data.batch_size=8"]
    none = instantiate(compose_train(*common, "augment=none").data)
    line = instantiate(compose_train(*common, "augment=line").data)
    assert none.augment is None and isinstance(line.augment, LineAugment)
    reference = batches(folder_module(digits).train_dataloader())
    assert_same_batches(batches(none.train_dataloader()), reference)
    augmented = batches(line.train_dataloader())  # the comparison can fail: augment=line changes every batch
    assert [b["texts"] for b in augmented] == [b["texts"] for b in reference]
    assert not any(torch.equal(x["images"], y["images"]) for x, y in zip(augmented, reference))


@pytest.mark.parametrize("option", config_options("data"))
def test_augment_line_composes_for_every_datamodule(option, digits, tmp_path):
    overrides = ["augment=line", "augment.degrees=2.5", f"data={option}"]
    cfg = compose_train(*overrides)
    if "train_dir" in cfg.data.keys():
        root = digits
        if cfg.data._target_ == "data.LmdbDataModule":
            for split in ("train", "val", "test"):
                lines = [line.split("\t") for line in (digits / split / "gt.txt").read_text().splitlines()]
                write_lmdb([((digits / split / path).read_bytes(), label) for path, label in lines], tmp_path / split)
            root = tmp_path
        cfg = compose_train(*overrides, *folder_overrides(root))
    else:  # synthetic: a few small batches
        if OmegaConf.is_missing(cfg.data, "charset_file"):  # data=text_large: the user's characters and fonts
            overrides += text_large_overrides(tmp_path)
        cfg = compose_train(*overrides, "data.train_size=8", "data.batch_size=4", "data.num_workers=0")
    module = instantiate(cfg.data)
    assert isinstance(module.augment, LineAugment) and module.augment.geometry.transforms[1].transforms[0].degrees == [-2.5, 2.5]
    batch = next(iter(module.train_dataloader()))
    assert batch["images"].shape[2] == cfg.data.height


TRAINING_IMAGES: list[dict[str, torch.Tensor]] = []


class TrainingImageRecorder(pl.Callback):
    """Records each training line's image (unpadded), by text, per epoch, in ``TRAINING_IMAGES``."""

    def on_train_epoch_start(self, trainer, pl_module):
        TRAINING_IMAGES.append({})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for image, width, text in zip(batch["images"], batch["widths"], batch["texts"]):
            TRAINING_IMAGES[-1][text] = image[..., :width].clone()


def test_training_with_augment_line_sees_each_epochs_views(digits, tmp_path):
    """Through train.py's pipeline: Lightning's epochs reach the augmentation (epoch e shows view e)."""
    TRAINING_IMAGES.clear()
    train(compose_train("data=folder", *folder_overrides(digits), "augment=line", "seed=3", "model=crnn_small",
                        "trainer.max_epochs=2", "callbacks.early_stopping=null", "data.batch_size=8",
                        "+callbacks.recorder._target_=test_augment.TrainingImageRecorder", output_dir=tmp_path))
    lines = folder_module(digits).dataset("train")
    views = AugmentedLines(lines, LineAugment(), seed=3)  # conf/augment/line.yaml holds LineAugment's defaults
    assert len(TRAINING_IMAGES) == 2
    for epoch, seen in enumerate(TRAINING_IMAGES):
        assert len(seen) == len({r.label for r in lines.records})
        for index, record in enumerate(lines.records):
            assert torch.equal(seen[record.label], views[epoch, index]["image"])


def test_fast_dev_run_with_augment_line(digits, tmp_path):
    metrics = train(compose_train("data=folder", *folder_overrides(digits), "augment=line", "debug=fast_dev_run",
                                  "model=crnn_small", output_dir=tmp_path))
    assert metrics["steps"] == 1


# ------------------------------------------------------------------------------------------------ show_augment
def cell(montage: np.ndarray, row: int, column: int, height: int, width: int) -> np.ndarray:
    """Cell ``(row, column)`` of a show_augment montage (its documented layout)."""
    gap = load_script("show_augment").GAP
    y, x = gap + row * (height + gap), gap + column * (width + gap)
    return montage[y : y + height, x : x + width]


def test_show_augment_first_column_is_the_unaugmented_line(digits, tmp_path, capsys):
    show_augment = load_script("show_augment")
    output = tmp_path / "grid.png"
    shown = show_augment.main([str(digits / "train"), "--output", str(output), "--lines", "4", "--views", "3"])
    montage = np.asarray(Image.open(output))
    assert len(shown) == 4 and montage.shape[0] == show_augment.GAP + 4 * (32 + show_augment.GAP)
    for row, record in enumerate(shown):
        pixels = np.asarray(Image.open(record.key).convert("L"))  # the PNG is 32 px high: no resizing
        height, width = pixels.shape
        assert (cell(montage, row, 0, height, width) == pixels[..., None]).all()
        views = [cell(montage, row, k, height, width) for k in (1, 2, 3)]
        assert all(v.shape == (height, width, 3) and not (v == pixels[..., None]).all() for v in views)
        frame = montage[show_augment.GAP + row * (32 + show_augment.GAP), show_augment.GAP + width]
        assert tuple(frame) == show_augment.FRAME  # each view is exactly as wide as the line
    assert "row 0:" in capsys.readouterr().out


def test_show_augment_on_rgb_images_of_another_height(tmp_path):
    """Lines that are not ours: RGB, 50 px high, drawn with Pillow's font on coloured paper."""
    show_augment = load_script("show_augment")
    folder = tmp_path / "rgb"
    (folder / "images").mkdir(parents=True)
    font, rows = ImageFont.load_default(36), []
    for i, (text, paper, ink) in enumerate([("Hello 42", (240, 220, 180), (40, 20, 120)),
                                            ("a-b c", (200, 230, 250), (120, 0, 0))]):
        image = Image.new("RGB", (30 * len(text), 50), paper)
        ImageDraw.Draw(image).text((6, 4), text, fill=ink, font=font)
        image.save(folder / "images" / f"{i}.png")
        rows.append(f"images/{i}.png\t{text}\n")
    (folder / "gt.txt").write_text("".join(rows))
    output = tmp_path / "rgb.png"
    shown = show_augment.main([str(folder), "--output", str(output), "--channels", "3", "--views", "2",
                               "augment.color_p=1.0"])
    montage = np.asarray(Image.open(output))
    for row, record in enumerate(shown):
        reference = image_to_tensor(Image.open(record.key), 32, channels=3)  # resized 50 -> 32 px
        pixels = np.rint(reference.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert (cell(montage, row, 0, *pixels.shape[:2]) == pixels).all()
        assert not (cell(montage, row, 1, *pixels.shape[:2]) == pixels).all()


def test_show_augment_with_augment_none_repeats_the_line(digits, tmp_path):
    show_augment = load_script("show_augment")
    shown = show_augment.main([str(digits / "val"), "--output", str(tmp_path / "g.png"), "--lines", "2",
                               "--augment", "none"])
    montage = np.asarray(Image.open(tmp_path / "g.png"))
    for row, record in enumerate(shown):
        width = record.width
        assert all((cell(montage, row, k, 32, width) == cell(montage, row, 0, 32, width)).all() for k in range(1, 6))
