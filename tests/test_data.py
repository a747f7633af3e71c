"""Tests for the data package: charset, synthetic rendering, collation, the DataModule and the timer."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data import (
    Charset,
    DataWaitTimer,
    EpochSampler,
    LengthGroupedBatchSampler,
    SyntheticDataModule,
    SyntheticLines,
    collate_lines,
    make_renderer,
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
    # right padding with each image's own background (median) level
    assert torch.allclose(batch["images"][0, ..., 5:], torch.tensor(0.9))
    assert torch.allclose(batch["images"][2, ..., 7:], torch.tensor(0.5))
    constant = collate_lines([_sample(5, "12", 0.9), _sample(9, "3", 0.2)], pad_value=0.0)
    assert torch.all(constant["images"][0, ..., 5:] == 0)


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


def test_datamodule_batches_and_disjoint_splits():
    dm = SyntheticDataModule(train_size=10, val_size=6, test_size=6, batch_size=4, num_workers=0, max_length=5, blank=10)
    assert dm.charset.num_classes == 11 and dm.charset.blank == 10  # known before setup
    dm.setup("fit")
    dm.setup("test")
    batches = list(dm.train_dataloader())
    assert sorted(b["images"].shape[0] for b in batches) == [2, 4, 4]
    for b in batches:
        assert set(b) == {"images", "widths", "targets", "target_lengths", "texts"}
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


class _TinyCTC(pl.LightningModule):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, num_classes, 3, padding=1)

    def training_step(self, batch, batch_idx):
        log_probs = self.conv(batch["images"]).mean(2).permute(2, 0, 1).log_softmax(-1)  # (T=W, B, C)
        return torch.nn.functional.ctc_loss(log_probs, batch["targets"], batch["widths"], batch["target_lengths"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_data_wait_timer_in_trainer():
    dm = SyntheticDataModule(train_size=16, val_size=4, test_size=4, batch_size=8, num_workers=0, max_length=4)
    timer = DataWaitTimer()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(_TinyCTC(dm.charset.num_classes), dm)
    assert timer.step_s > 0 and timer.wait_s > 0
    assert trainer.callback_metrics["perf/data_wait_share"].item() == pytest.approx(timer.share)


def test_data_wait_timer_share():
    timer = DataWaitTimer()
    timer.wait_s, timer.step_s = 1.0, 3.0
    assert timer.share == pytest.approx(0.25)
    timer.on_train_epoch_start(None, None)
    assert timer.share == 0.0
    timer.on_train_batch_start(None, None, None, 0)
    timer.on_train_batch_end(None, None, None, None, 0)
    assert timer.wait_s >= 0 and timer.step_s >= 0 and 0.0 <= timer.share <= 1.0
