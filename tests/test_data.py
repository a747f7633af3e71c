"""Tests for the data package: charset, synthetic rendering, collation, the DataModules and gt.txt."""


import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    BadInput,
    BadInputError,
    Charset,
    EpochSampler,
    FolderDataModule,
    LengthGroupedBatchSampler,
    SyntheticDataModule,
    SyntheticLines,
    collate_lines,
    make_renderer,
    read_gt,
    write_gt_folder,
)

WORDS = ["alpha", "beta", "gamma", "delta", "x"]


# --- charset ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("blank", "ids"), [(0, [1, 3, 2]), (3, [0, 2, 1])])
def test_charset_encode_decode_blank_positions(blank, ids):
    cs = Charset("abc", blank=blank)
    assert cs.num_classes == 4 and cs.blank == blank
    assert cs.encode("acb") == ids
    assert blank not in cs.encode("abc")
    assert cs.decode(ids) == "acb"
    assert cs.decode([blank, *ids, blank]) == "acb"
    assert cs.decode(torch.tensor(ids)) == "acb"


def test_charset_blank_in_the_middle_skips_that_id():
    assert Charset("abc", blank=1).encode("abc") == [0, 2, 3]


def test_charset_errors():
    with pytest.raises(ValueError, match="'z'.*'abz'"):
        Charset("ab").encode("abz")
    with pytest.raises(ValueError, match="duplicate"):
        Charset("abca")
    with pytest.raises(ValueError, match="blank"):
        Charset("ab", blank=3)
    with pytest.raises(ValueError):
        Charset("ab").decode([7])


@pytest.mark.parametrize("content", ["ab c\n", "a\nb\n \nc\n"])
def test_charset_from_file_line_layouts(tmp_path, content):
    path = tmp_path / "chars.txt"
    path.write_text(content, encoding="utf-8")
    assert Charset.from_file(path).characters == "ab c"


# --- rendering ---------------------------------------------------------------------------------------


def _digits(size=8, seed=0, **kwargs):
    renderer = make_renderer("digits", **kwargs)
    return SyntheticLines(renderer, Charset(renderer.characters), size, seed=seed)


def test_sample_format_shape_and_range():
    ds = _digits(height=24, min_length=3, max_length=6)
    for i in range(len(ds)):
        s = ds[i]
        image, text, target = s["image"], s["text"], s["target"]
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[:2] == (1, 24)
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        assert 3 <= len(text) <= 6 and text.isdigit()
        assert target.dtype == torch.long and target.tolist() == ds.charset.encode(text)


def test_determinism_per_seed_and_index():
    a, b = _digits(seed=5), _digits(seed=5)
    for i in (3, 0, 7, 3, 1000):  # order and virtual indices past `size` do not matter
        sa, sb = a[i], b[i]
        assert sa["text"] == sb["text"] and torch.equal(sa["image"], sb["image"])


def test_different_seeds_and_indices_differ():
    a, b = _digits(seed=0), _digits(seed=1)
    assert any(a[i]["text"] != b[i]["text"] for i in range(8))
    assert len({a[i]["image"].numpy().tobytes() for i in range(8)}) == 8


@pytest.mark.parametrize("kind,words", [("digits", None), ("text", None), ("text", WORDS)])
def test_text_without_rendering_is_the_rendered_text(kind, words):
    """``text(i)``, the length-grouping key, is the text of ``dataset[i]``, past ``size`` and after prerendering."""
    renderer = make_renderer(kind, words=words, max_length=12)
    ds = SyntheticLines(renderer, Charset(renderer.characters), size=20, seed=4)
    indices = list(range(60)) + [1000, 12345]
    texts = [ds[i]["text"] for i in indices]
    assert len(set(texts)) > 10  # not a constant
    assert [ds.text(i) for i in indices] == texts
    ds.prerender()
    assert [ds.text(i) for i in indices] == texts


def test_prerender_matches_on_the_fly():
    ds = _digits(size=4)
    fresh = [ds[i] for i in range(4)]
    ds.prerender()
    assert all(torch.equal(ds[i]["image"], s["image"]) and ds[i]["text"] == s["text"] for i, s in enumerate(fresh))


@pytest.mark.parametrize("words", [WORDS, "file"])
def test_text_renderer_with_word_list(tmp_path, words):
    if words == "file":
        words = tmp_path / "words.txt"
        words.write_text("\n".join(WORDS) + "\n\n", encoding="utf-8")
    renderer = make_renderer("text", words=words, min_length=4, max_length=16)
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, text = renderer(rng)
        assert 3 <= len(text) <= 16 and text == text.strip() and "  " not in text
        *whole, last = text.split(" ")
        assert all(w in WORDS for w in whole) and any(w.startswith(last) for w in WORDS)  # last may be cut
        assert image.shape[:2] == (1, 32)


def test_random_text_has_no_edge_or_double_spaces():
    renderer = make_renderer("text", min_length=5, max_length=30)
    rng = np.random.default_rng(1)
    texts = [renderer.sample_text(rng) for _ in range(200)]
    assert any(" " in t for t in texts)
    assert all(t == t.strip() and "  " not in t and 5 <= len(t) <= 30 for t in texts)


def test_unknown_characters_are_rejected():
    with pytest.raises(ValueError, match="'é'.*'café'"):
        make_renderer("text", words=["tea", "café"])
    with pytest.raises(ValueError, match="'a'"):
        SyntheticLines(make_renderer("text", characters="ab"), Charset("b"), size=1)


def test_fonts_without_glyphs_are_skipped():
    renderer = make_renderer("digits")
    assert renderer.fonts and not any("Display" in f for f in renderer.fonts)


# --- batching ----------------------------------------------------------------------------------------


def _sample(width, text, value, charset=Charset("0123456789")):
    return {"image": torch.full((1, 8, width), value), "text": text, "target": torch.tensor(charset.encode(text))}


def test_collate_mixed_widths():
    batch = collate_lines([_sample(5, "12", 0.9), _sample(9, "3", 0.2), _sample(7, "456", 0.5)])
    assert batch["images"].shape == (3, 1, 8, 9) and batch["images"].dtype == torch.float32
    assert batch["widths"].tolist() == [5, 9, 7]
    assert batch["target_lengths"].tolist() == [2, 1, 3]
    assert batch["targets"].tolist() == [[2, 3, 0], [4, 0, 0], [5, 6, 7]]
    assert batch["texts"] == ["12", "3", "456"]
    # each image on the left, right-padded with zeros (``widths`` says where it ends)
    for b, (width, value) in enumerate([(5, 0.9), (9, 0.2), (7, 0.5)]):
        assert (batch["images"][b, ..., :width] == value).all() and (batch["images"][b, ..., width:] == 0).all()
    rgb = collate_lines([{**_sample(3, "1", 0.4), "image": torch.full((3, 8, 3), 0.4)},
                         {**_sample(6, "2", 0.6), "image": torch.full((3, 8, 6), 0.6)}])
    assert rgb["images"].shape == (2, 3, 8, 6) and (rgb["images"][0, ..., 3:] == 0).all()


def test_epoch_sampler():
    fresh = EpochSampler(4, seed=0, fresh=True)
    fresh.set_epoch(2)
    assert list(fresh) == [8, 9, 10, 11]
    fixed = EpochSampler(6, seed=0, fresh=False)
    orders = []
    for epoch in (0, 1, 0):
        fixed.set_epoch(epoch)
        orders.append(list(fixed))
    assert sorted(orders[0]) == list(range(6)) and orders[0] == orders[2] and orders[0] != orders[1]


def test_length_grouped_batch_sampler():
    lengths = [5, 1, 4, 1, 5, 2, 3, 2, 4, 3]
    sampler = LengthGroupedBatchSampler(range(10), batch_size=2, key=lengths.__getitem__, pool_batches=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    # pools of 6 indices, each sorted by length (stably) and cut into batches; batch order shuffled per pool
    assert sorted(batches[:3]) == [[0, 4], [1, 3], [5, 2]] and sorted(batches[3:]) == [[7, 6], [9, 8]]
    assert batches == list(sampler)  # same seed and epoch, same batches
    ordered = LengthGroupedBatchSampler(range(10), batch_size=4, key=lengths.__getitem__, shuffle=False)
    assert [[lengths[i] for i in b] for b in ordered] == [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5]]


def test_reshuffled_length_grouped_batches_change_per_epoch_and_cover_every_index():
    """EpochSampler(fresh=False) under LengthGroupedBatchSampler, as the real-data loaders use it."""
    lengths = [1 + (7 * i) % 10 for i in range(40)]
    epochs = EpochSampler(40, seed=3, fresh=False)
    sampler = LengthGroupedBatchSampler(epochs, batch_size=4, key=lengths.__getitem__, pool_batches=3, seed=3)
    per_epoch = {}
    for epoch in (0, 1, 0):
        epochs.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 10
        assert sorted(i for b in batches for i in b) == list(range(40))  # each index exactly once
        for first in range(0, 10, 3):  # a pool's (up to) 3 batches are non-overlapping runs of its sorted lengths
            spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches[first : first + 3])
            assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:]))
        if epoch in per_epoch:
            assert batches == per_epoch[epoch]  # reproducible per (seed, epoch)
        per_epoch[epoch] = batches
    assert per_epoch[0] != per_epoch[1]
    assert {tuple(b) for b in per_epoch[0]} != {tuple(b) for b in per_epoch[1]}  # new batches, not just reordered


def test_synthetic_splits_are_disjoint_streams():
    """Val and test lines never appear in training (any epoch, fresh or reshuffled), for several base seeds."""
    stream_seeds = set()
    for seed in (0, 1, 2):
        for fresh in (True, False):
            dm = SyntheticDataModule(train_size=12, val_size=12, test_size=12, batch_size=4, num_workers=0,
                                     max_length=4, seed=seed, fresh_train=fresh)
            dm.setup(None)
            datasets = dm.datasets
            images = {}
            for split in ("val", "test"):
                images[split] = {datasets[split][i]["image"].numpy().tobytes() for i in range(12)}
            train_loader = dm.train_dataloader()
            train_images = set()
            for epoch in (0, 1, 2):
                train_loader.batch_sampler.sampler.set_epoch(epoch)
                for batch in train_loader.batch_sampler:
                    train_images |= {datasets["train"][i]["image"].numpy().tobytes() for i in batch}
            assert len(train_images) == (36 if fresh else 12)
            assert not train_images & images["val"] and not train_images & images["test"]
            assert not images["val"] & images["test"]
        stream_seeds |= {(split, dm.datasets[split].seed) for split in ("train", "val", "test")}
    # no two (base seed, split) pairs share a stream
    assert len({stream for _, stream in stream_seeds}) == len(stream_seeds) == 9


def test_datamodule_batches_and_disjoint_splits():
    dm = SyntheticDataModule(train_size=10, val_size=6, test_size=6, batch_size=4, num_workers=0, max_length=5, blank=10)
    assert dm.charset.num_classes == 11 and dm.charset.blank == 10  # known before setup
    dm.setup("fit")
    dm.setup("test")
    batches = list(dm.train_dataloader())
    assert sorted(b["images"].shape[0] for b in batches) == [2, 4, 4]
    for b in batches:
        assert set(b) == {"images", "widths", "targets", "target_lengths", "texts", "skipped"}
        assert b["images"].shape[:3] == (len(b["texts"]), 1, 32) and b["images"].shape[3] == b["widths"].max()
        assert b["targets"].shape == (len(b["texts"]), b["target_lengths"].max())
        for row, length, text in zip(b["targets"], b["target_lengths"], b["texts"]):
            assert dm.charset.decode(row[:length]) == text
    val = next(iter(dm.val_dataloader()))
    test = next(iter(dm.test_dataloader()))
    assert not torch.equal(val["widths"], test["widths"]) or val["texts"] != test["texts"]
    assert val["texts"] == next(iter(dm.val_dataloader()))["texts"]  # fixed across epochs
    train = dm.train_dataloader()
    train.batch_sampler.sampler.set_epoch(1)  # what Lightning calls before each epoch
    epoch1 = {t for b in train for t in b["texts"]}
    assert epoch1 != {t for b in batches for t in b["texts"]}  # fresh samples every epoch


# --- gt.txt folders ----------------------------------------------------------------------------------


def _image(width=12, height=8):
    return Image.new("L", (width, height), 200)


def test_read_gt_bom_blank_lines_crlf_and_bad_utf8(tmp_path):
    content = b"\xef\xbb\xbfimages/a.png\t12\n\nimages/b.png\t3 4\r\n\n\xff\xfe.png\tbad\nimages/c.png\t\n"
    (tmp_path / "gt.txt").write_bytes(content)
    bad = BadInput({"malformed": "skip"})
    records = read_gt(tmp_path, bad)
    gt = tmp_path / "gt.txt"
    assert [(r.where, r.label, r.key) for r in records] == [
        (f"{gt}:1", "12", str(tmp_path / "images/a.png")),  # no BOM left in the first path
        (f"{gt}:3", "3 4", str(tmp_path / "images/b.png")),  # CRLF: no trailing \r in the label
        (f"{gt}:6", "", str(tmp_path / "images/c.png")),  # empty labels are the DataModule's business
    ]
    assert len(bad.skipped["malformed"]) == 1 and bad.skipped["malformed"][0].startswith(f"{gt}:5: not UTF-8")
    assert bad.num_skipped == 1  # the blank lines 2 and 4 are not reported
    with pytest.raises(BadInputError, match=f"{gt}:5: not UTF-8.*malformed"):
        read_gt(tmp_path)


@pytest.mark.parametrize("label", ["a\tb", "a\nb", "a\rb"])
def test_write_gt_folder_rejects_tabs_and_line_breaks(tmp_path, label):
    with pytest.raises(ValueError, match="tab or line break"):
        write_gt_folder([(_image(), "12"), (_image(), label)], tmp_path)


def test_write_gt_folder_round_trips_through_read_gt(tmp_path):
    labels = ["12", "3 4", "5"]
    assert write_gt_folder([(_image(10 + i), label) for i, label in enumerate(labels)], tmp_path) == 3
    records = read_gt(tmp_path)
    assert [r.label for r in records] == labels
    assert [Image.open(r.key).size for r in records] == [(10, 8), (11, 8), (12, 8)]


@pytest.mark.parametrize("val_gt", ["unknown", "blank"])
def test_split_without_usable_samples_raises(tmp_path, val_gt):
    """Every training sample skipped (unknown characters: skipped in training, by default) or no val line at all:
    a clear error naming the split. (Val and test keep lines with unknown characters and score them.)"""
    empty = "train" if val_gt == "unknown" else "val"
    for split, label in [("train", "ab" if val_gt == "unknown" else "12"), ("val", "ab"), ("test", "3")]:
        write_gt_folder([(_image(), label)], tmp_path / split)
    if val_gt == "blank":
        (tmp_path / "val" / "gt.txt").write_text("\n\n", encoding="utf-8")
    dm = FolderDataModule(tmp_path / "train", tmp_path / "val", tmp_path / "test", charset="0123456789")
    dm.setup("test")  # test is fine
    with pytest.raises(BadInputError, match="no usable samples") as error:
        dm.setup("fit")
    assert str(tmp_path / empty) in str(error.value)
    if val_gt == "unknown":
        assert "unknown_char 1" in str(error.value)
