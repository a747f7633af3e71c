"""Real data: gt.txt folders and LMDB (round trip from render_dataset.py), the bad-input policy, training on them."""

import functools
import io
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import editdistance
import lmdb
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from crnn.model import CRNN, output_length
from crnn.module import CRNNModule
from crnn.pipeline import train
from data import (
    BadInput, BadInputError, Charset, FolderDataModule, LmdbDataModule, SyntheticLines, make_renderer, open_split,
    write_lmdb,
)

from conftest import ROOT, compose_train, load_script

POOLS = [[2, 2], [2, 2], [2, 2], [2, 1], [2, 1]]  # conf/model/crnn.yaml: width / 8
FRAMES = functools.partial(output_length, pools=POOLS)


def render(output: Path, size: int, seed: int, *args: str) -> Path:
    arguments = ["--size", str(size), "--seed", str(seed), "--output", str(output), *args]
    return load_script("render_dataset").main(arguments)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Small rendered digit splits as gt.txt folders, and the same converted to LMDB."""
    root = tmp_path_factory.mktemp("rendered")
    folders = {split: render(root / split, size, seed) for split, size, seed in
               [("train", 48, 1), ("val", 16, 2), ("test", 16, 3)]}
    lmdbs = {}
    for split, folder in folders.items():
        lmdbs[split] = root / f"{split}_lmdb"
        written = load_script("make_lmdb").main([str(folder), str(lmdbs[split])])
        assert written == len(folder.joinpath("gt.txt").read_text().splitlines())
    return {"folder": folders, "lmdb": lmdbs}


def test_render_dataset_options_reach_the_lines(tmp_path):
    """--kind text with --charset, lengths and --height; --words: words from a word-list file, joined by spaces
    and cut to the drawn length."""
    folder = render(tmp_path / "text", 12, 4, "--kind", "text", "--charset", "abc", "--min-length", "2",
                    "--max-length", "4", "--height", "24")
    lines = [line.split("\t") for line in (folder / "gt.txt").read_text().splitlines()]
    assert len(lines) == 12 and all(set(label) <= set("abc") and 2 <= len(label) <= 4 for _, label in lines)
    assert {Image.open(folder / path).size[1] for path, _ in lines} == {24}
    (tmp_path / "words.txt").write_text("ink\nquill\n")
    folder = render(tmp_path / "words", 8, 4, "--kind", "text", "--words", str(tmp_path / "words.txt"))
    labels = [line.split("\t")[1] for line in (folder / "gt.txt").read_text().splitlines()]
    for label in labels:
        *whole, last = label.split(" ")
        assert set(whole) <= {"ink", "quill"} and any(word.startswith(last) for word in ("ink", "quill")), label


def test_make_lmdb_names_a_missing_image(rendered, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gt.txt").write_text("images/none.png\t12\n")
    with pytest.raises(BadInputError, match=r"gt\.txt:1: image .*none\.png.* not found"):
        load_script("make_lmdb").main([str(broken), str(tmp_path / "out")])


def folder_module(dirs, **kwargs) -> FolderDataModule:
    return FolderDataModule(dirs["train"], dirs["val"], dirs["test"], output_length=FRAMES, **kwargs)


# --- model arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("pools", "kernel_size"), [(POOLS, 3), ([[2, 2], [2, 2], [2, 1], [2, 1], [2, 1]], 5),
                                                    ([[4, 3], [8, 2]], 3)])
def test_output_length_matches_the_model(pools, kernel_size):
    height = math.prod(p[0] for p in pools)
    model = CRNN(5, height=height, channels=[4] * len(pools), pools=pools, kernel_size=kernel_size)
    widths = torch.arange(1, 80)
    expected = model.output_lengths(widths).tolist()
    assert [output_length(w, pools, kernel_size) for w in widths.tolist()] == expected


# --- formats -------------------------------------------------------------------------------------------


ON_DISK_IMPORTS = """
import builtins, sys
from pathlib import Path
root, folder = Path.cwd(), sys.argv[1]
importers = []  # files of this repository with an import statement of matplotlib
plain_import = builtins.__import__
def recording_import(name, globals=None, *args, **kwargs):
    where = (globals or {}).get("__file__") or ""
    if name.split(".")[0] == "matplotlib" and where.startswith(str(root)):
        importers.append(where)
    return plain_import(name, globals, *args, **kwargs)
builtins.__import__ = recording_import
import data, data.folder, data.lmdb
from data import FolderDataModule
FolderDataModule(folder, folder, folder).setup()
import crnn.inference, scripts.evaluate
print(importers, "data.synthetic" in sys.modules)
"""


def test_on_disk_data_never_imports_the_renderer_or_matplotlib(rendered):
    """data=folder/lmdb and evaluate.py import neither data.synthetic nor (from this repository's code) matplotlib.

    pytorch_lightning itself imports matplotlib when it is installed (through torchmetrics' plotting), so the
    check is on who imports it, not on sys.modules."""
    result = subprocess.run([sys.executable, "-c", ON_DISK_IMPORTS, str(rendered["folder"]["test"])], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[] False"


def test_rendered_folder_round_trips_through_folder_and_lmdb(rendered):
    """gt.txt folder == rendered samples (to 8 bits), LMDB == folder, sample for sample."""
    folder = folder_module(rendered["folder"], group_by_length=False)
    lmdb_dm = LmdbDataModule(*(str(rendered["lmdb"][s]) for s in ("train", "val", "test")), output_length=FRAMES)
    folder.setup(), lmdb_dm.setup()
    assert folder.charset.characters == lmdb_dm.charset.characters == "0123456789"
    lines = SyntheticLines(make_renderer("digits"), folder.charset, 48, seed=1)
    for split in ("train", "val", "test"):
        a, b = folder.dataset(split), lmdb_dm.dataset(split)
        assert len(a) == len(b) == len(a.records) and not folder.problems[split].num_skipped
        for i in range(len(a)):
            assert a[i]["text"] == b[i]["text"] and torch.equal(a[i]["image"], b[i]["image"])
            assert torch.equal(a[i]["target"], b[i]["target"])
    for i in (0, 47):
        original, loaded = lines[i], folder.dataset("train")[i]
        assert loaded["text"] == original["text"] and loaded["image"].shape == original["image"].shape
        assert (loaded["image"] - original["image"]).abs().max() <= 0.5 / 255 + 1e-6
    batch = next(iter(folder.train_dataloader()))
    assert set(batch) == {"images", "widths", "targets", "target_lengths", "texts", "skipped"}
    assert batch["images"].shape[:3] == (48, 1, 32)


def test_lmdb_is_opened_lazily_in_each_worker(rendered):
    dm = LmdbDataModule(*(str(rendered["lmdb"][s]) for s in ("train", "val", "test")), batch_size=8, num_workers=2)
    dm.setup("test")
    assert dm.dataset("test")[0]["text"]  # the main process opens the environment; forked workers must reopen it
    texts = [text for batch in dm.test_dataloader() for text in batch["texts"]]
    assert sorted(texts) == sorted(r.label for r in dm.dataset("test").records)


def test_several_readers_of_one_lmdb_in_one_process(rendered):
    """py-lmdb refuses a second environment for one path in a process: readers share one (e.g. the runs of
    an in-process sweep, or evaluate.py after training)."""
    dirs = [str(rendered["lmdb"][s]) for s in ("train", "val", "test")]
    first = LmdbDataModule(*dirs)
    first.setup("test")
    text = first.dataset("test")[0]["text"]  # leaves the test split's environment open
    second = LmdbDataModule(*dirs)
    second.setup("test")
    assert second.dataset("test")[0]["text"] == text == first.dataset("test")[0]["text"]


def test_charset_inferred_from_training_labels_and_logged(tmp_path, caplog):
    for split, label in [("train", "b a"), ("val", "ab"), ("test", "a")]:
        write_folder(tmp_path / split, [(label, "png")])
    with caplog.at_level(logging.INFO, logger="data.labelled"):
        dm = FolderDataModule(tmp_path / "train", tmp_path / "val", tmp_path / "test", blank=2)
    assert dm.charset.characters == " ab" and dm.charset.blank == 2
    assert "charset inferred from 1 training labels" in caplog.text and "' ab'" in caplog.text


@pytest.mark.parametrize(("fmt", "mode", "size"), [("png", "RGBA", (90, 48)), ("jpeg", "RGB", (50, 64)),
                                                   ("bmp", "P", (30, 16)), ("tiff", "L", (32, 32))])
def test_any_pillow_format_becomes_grey_at_the_model_height(tmp_path, fmt, mode, size):
    write_folder(tmp_path, [("7", fmt)], mode=mode, size=size)
    dm = FolderDataModule(tmp_path, tmp_path, tmp_path, height=32)
    sample = dm.dataset("train")[0]
    assert sample["image"].shape == (1, 32, round(size[0] * 32 / size[1])) and sample["image"].dtype == torch.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    rgb = FolderDataModule(tmp_path, tmp_path, tmp_path, height=16, channels=3).dataset("train")[0]["image"]
    assert rgb.shape[:2] == (3, 16)


def test_size_limits_take_the_first_samples(rendered):
    dm = folder_module(rendered["folder"], train_size=10, val_size=4)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 10 and len(dm.dataset("val")) == 4
    assert [r.where for r in dm.dataset("train").records] == [r.where for r in dm.records("train")[:10]]


# --- bad input -----------------------------------------------------------------------------------------

GOOD = [("12", "png"), ("345", "png")]
LINE_OF_BAD = 2  # the bad entry is written between the two good ones


def write_folder(folder: Path, entries, mode: str = "L", size: tuple[int, int] = (96, 32)) -> Path:
    """A gt.txt folder with one image per ``(label, format)`` entry; ``format`` may instead be a raw gt.txt line
    (``"raw:..."``), ``"missing"`` (no image file) or ``"garbage"`` (a .png of random bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (label, fmt) in enumerate(entries):
        if fmt.startswith("raw:"):
            lines.append(fmt[4:])
            continue
        name = f"{i}.{'png' if fmt in ('missing', 'garbage') else fmt}"
        if fmt == "garbage":
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
        elif fmt != "missing":
            Image.new(mode, size, color=200 if mode in ("L", "P") else (200,) * len(mode)).save(folder / name)
        lines.append(f"{name}\t{label}")
    (folder / "gt.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


BAD_CASES = {
    "malformed/no_tab": ("malformed", ("", "raw:image.png 12")),
    "malformed/empty_path": ("malformed", ("", "raw:\t12")),
    "malformed/two_tabs": ("malformed", ("", "raw:a.png\t1\t2")),
    "malformed/absolute_path": ("malformed", ("", "raw:/etc/0.png\t12")),  # data.allow_outside_paths=false
    "malformed/parent_path": ("malformed", ("", "raw:../other/0.png\t12")),
    "empty_label": ("empty_label", ("", "png")),
    "unknown_char": ("unknown_char", ("1x2", "png")),
    "missing_image": ("missing_image", ("12", "missing")),
    "unreadable_image": ("unreadable_image", ("12", "garbage")),
    "too_long": ("too_long", ("1122334455", "png")),  # needs 10 + 5 repeats = 15 frames; 96 px / 8 = 12
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_error_names_file_line_and_key(tmp_path, case):
    kind, entry = BAD_CASES[case]
    folder = write_folder(tmp_path / "data", [GOOD[0], entry, GOOD[1]])
    with pytest.raises(BadInputError) as error:
        dm = FolderDataModule(folder, folder, folder, charset="0123456789", output_length=FRAMES,
                              bad_input={kind: "error"})
        dm.setup("fit")
    message = str(error.value)
    assert f"{folder / 'gt.txt'}:{LINE_OF_BAD}:" in message and f"data.bad_input.{kind}=skip" in message


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_skip_counts_and_logs(tmp_path, case, caplog):
    kind, entry = BAD_CASES[case]
    folder = write_folder(tmp_path / "data", [GOOD[0], entry, GOOD[1], entry, entry])
    with caplog.at_level(logging.INFO, logger="data.labelled"):
        dm = FolderDataModule(folder, folder, folder, charset="0123456789", output_length=FRAMES,
                              bad_input={kind: "skip"})
        dm.setup("fit")
    assert [r.label for r in dm.dataset("train").records] == ["12", "345"]
    assert {k: len(v) for k, v in dm.problems["train"].skipped.items() if v} == {kind: 3}
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"kept 2 samples, skipped 3: {kind} 3 (e.g. {folder / 'gt.txt'}:2:" in warning
    assert warning.count(f"{folder / 'gt.txt'}:") == 3  # the first examples (3 by default)


def test_too_long_skip_leaves_only_feasible_ctc_targets(tmp_path):
    """A model with width stride 12 cannot emit many rendered digit strings: they are skipped, the rest is feasible."""
    dirs = {split: tmp_path / split for split in ("train", "val", "test")}
    for split, seed in (("train", 4), ("val", 5), ("test", 6)):
        render(dirs[split], 24, seed, "--min-length", "2", "--max-length", "10", "--height", "16")
    pools = [[2, 2], [2, 2], [2, 3], [2, 1]]
    dm = FolderDataModule(dirs["train"], dirs["val"], dirs["test"], height=16, batch_size=4,
                          output_length=functools.partial(output_length, pools=pools))
    dm.setup("fit")
    assert 0 < len(dm.problems["train"].skipped["too_long"]) < 24
    model = CRNN(11, height=16, pools=pools, channels=[4] * 4)
    for batch in dm.train_dataloader():
        repeats = [sum(a == b for a, b in zip(text, text[1:])) for text in batch["texts"]]
        needed = batch["target_lengths"] + torch.tensor(repeats)
        assert (model.output_lengths(batch["widths"]) >= needed).all()


def test_open_split_for_evaluation_keeps_what_the_model_cannot_emit(tmp_path, rendered):
    """open_split (evaluate.py's reader): the training checks, but with require_emittable=False lines with unknown
    characters or too long labels are kept; an image broken after screening is reported as unreadable_image."""
    folder = write_folder(tmp_path / "data", [GOOD[0], BAD_CASES["unknown_char"][1], BAD_CASES["too_long"][1],
                                              BAD_CASES["missing_image"][1], GOOD[1]])
    charset = Charset("0123456789")
    kept = open_split(folder, charset, bad=BadInput({"missing_image": "skip"}), output_length=FRAMES,
                      require_emittable=False)
    assert [r.label for r in kept.records] == ["12", "1x2", "1122334455", "345"]
    bad = BadInput({"missing_image": "skip"})
    screened = open_split(folder, charset, bad=bad, output_length=FRAMES)  # training's screen
    assert [r.label for r in screened.records] == ["12", "345"]
    assert {k: len(v) for k, v in bad.skipped.items() if v} == {"unknown_char": 1, "too_long": 1, "missing_image": 1}
    with pytest.raises(BadInputError, match=r"gt\.txt:4: image .* not found"):
        open_split(folder, charset, output_length=FRAMES, require_emittable=False)
    lmdb_split = open_split(rendered["lmdb"]["test"], charset)
    assert torch.equal(lmdb_split.image(3), lmdb_split[3]["image"])
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # broken after screening
    with pytest.raises(BadInputError, match=r"gt\.txt:1: cannot read image .*0\.png"):
        kept[0]
    bad = BadInput({"unreadable_image": "skip"})
    assert kept.image(0, bad) is None and kept.image(3, bad) is not None
    assert len(bad.skipped["unreadable_image"]) == 1 and bad.skipped["unreadable_image"][0].startswith(
        f"{folder / 'gt.txt'}:1: cannot read image")
    with pytest.raises(FileNotFoundError, match="neither a folder with a gt.txt nor an LMDB"):
        open_split(tmp_path, charset)


def test_policy_errors():
    with pytest.raises(ValueError, match="unknown bad-input kinds"):
        BadInput({"too_short": "skip"})
    with pytest.raises(ValueError, match="must be one of"):
        BadInput({"too_long": "ignore"})


def test_lmdb_bad_entries(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (64, 32), 255).save(buffer, format="PNG")
    good = buffer.getvalue()
    path = tmp_path / "db"
    write_lmdb([(good, "12"), (good, "3"), (b"not an image", "45"), (good, "6")], path)
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        txn.delete(b"label-000000002")
        txn.delete(b"image-000000004")
    with pytest.raises(BadInputError, match=re.escape(f"{path}:label-000000002: no label-000000002") + ".*malformed"):
        LmdbDataModule(path, path, path)
    dm = LmdbDataModule(path, path, path, bad_input={"malformed": "skip", "missing_image": "skip",
                                                      "unreadable_image": "skip"})
    assert [r.label for r in dm.dataset("train").records] == ["12"]
    assert {k: len(v) for k, v in dm.problems["train"].skipped.items() if v} == {
        "malformed": 1, "unreadable_image": 1, "missing_image": 1}
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        txn.delete(b"num-samples")
    with pytest.raises(BadInputError, match="num-samples"):
        LmdbDataModule(path, path, path)


# --- training ------------------------------------------------------------------------------------------


def run(tmp_path: Path, dirs: dict[str, Path], data: str, *overrides: str) -> dict:
    return train(compose_train(f"data={data}", *(f"data.{s}_dir={d}" for s, d in dirs.items()), *overrides,
                               output_dir=tmp_path))


@pytest.mark.parametrize("data", ["folder", "lmdb"])
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_dev_run_on_rendered_data(rendered, tmp_path, data, channels):
    """Grey or RGB (``data.channels=3``: the model's ``in_channels`` follows)."""
    metrics = run(tmp_path, rendered[data], data, "debug=fast_dev_run", "model=crnn_small", f"data.channels={channels}")
    assert metrics["steps"] == 1
    assert all(math.isfinite(v) for v in metrics.values() if not isinstance(v, str))


def test_debug_overfit_on_a_folder_uses_its_first_batches(rendered, tmp_path):
    metrics = run(tmp_path, rendered["folder"], "folder", "debug=overfit", "model=crnn_small", "data.batch_size=4",
                  "trainer.overfit_batches=2", "trainer.max_epochs=2")
    assert metrics["steps"] == 4 and metrics["stop_reason"] == "max_epochs"


@pytest.mark.slow
def test_training_on_a_rendered_folder_reaches_low_cer(tmp_path):
    """render_dataset.py -> data=folder -> the default model and schedule: < 5 % CER on the rendered test split."""
    sizes = {"train": (4000, 11), "val": (300, 12), "test": (300, 13)}
    dirs = {split: render(tmp_path / "data" / split, size, seed) for split, (size, seed) in sizes.items()}
    metrics = run(tmp_path / "run", dirs, "folder", "trainer.max_time=null", "callbacks.progress_bar.refresh_rate=0")
    assert metrics["test/cer"] < 0.05 and metrics["val/cer"] < 0.05


# --- what the model cannot emit: skipped in training, scored in val/test ---------------------------------------


def test_val_and_test_score_every_line_and_count_what_the_model_cannot_emit(tmp_path):
    """Training skips `1x2` (x not in the charset) and `1122334455` (15 frames needed, 96 px / 8 = 12); val and
    test keep them: test/cer is editdistance over all 4 lines of each image's own prediction, test/unemittable is 2,
    and test/loss is F.ctc_loss over the 2 emittable lines."""
    entries = [GOOD[0], BAD_CASES["unknown_char"][1], BAD_CASES["too_long"][1], GOOD[1]]
    folder = write_folder(tmp_path / "data", entries)
    dm = FolderDataModule(folder, folder, folder, charset="0123456789", output_length=FRAMES, batch_size=8)
    dm.setup(None)
    labels = [label for label, _ in entries]
    assert [r.label for r in dm.dataset("train").records] == ["12", "345"]
    assert [r.label for r in dm.dataset("val").records] == [r.label for r in dm.dataset("test").records] == labels
    assert dm.dataset("test")[1]["target"].tolist() == [2, 3]  # "1x2": the known characters' ids (blank 0)

    torch.manual_seed(0)
    module = CRNNModule("0123456789", {"_target_": "crnn.model.CRNN", "pools": POOLS, "channels": [4] * 5,
                                       "rnn_hidden": 8}).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    [metrics] = trainer.test(module, datamodule=dm)

    images = [dm.dataset("test")[i]["image"] for i in range(4)]
    alone = [module(image[None], torch.tensor([image.shape[-1]])) for image in images]
    preds = [module.decode(log_probs, lengths)[0] for log_probs, lengths in alone]
    edits = sum(editdistance.eval(pred, label) for pred, label in zip(preds, labels))
    assert metrics["test/cer"] == pytest.approx(edits / sum(map(len, labels)))
    assert metrics["test/lines"] == 4 and metrics["test/unemittable"] == 2
    log_probs = torch.cat([alone[i][0] for i in (0, 3)], 1)  # (12, 2, 11): both 96 px wide
    expected = F.ctc_loss(log_probs, torch.tensor([2, 3, 4, 5, 6]), torch.tensor([12, 12]), torch.tensor([2, 3]),
                          zero_infinity=True)
    assert metrics["test/loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("too_long", "warned"), [(1, False), (2, True)])
def test_setup_warns_with_the_fix_when_over_1_percent_of_training_lines_are_too_long(tmp_path, caplog, too_long,
                                                                                     warned):
    entries = [GOOD[0]] * (100 - too_long) + [BAD_CASES["too_long"][1]] * too_long
    folder = write_folder(tmp_path / "data", entries)
    with caplog.at_level(logging.INFO, logger="data.labelled"):
        FolderDataModule(folder, folder, folder, charset="0123456789", output_length=FRAMES).setup("fit")
    warnings = [r.getMessage() for r in caplog.records if "too long for the model" in r.getMessage()]
    assert len(warnings) == warned
    if warned:
        assert warnings[0].startswith("2 of 100 training lines (2.0 %) are too long for the model, which emits about "
                                      "1 frame per 8.0 px") and "model=crnn_w4" in warnings[0]


def test_on_disk_data_defaults_to_the_width_4_model_a_chosen_model_wins():
    w4 = [[2, 2], [2, 2], [2, 1], [2, 1], [2, 1]]
    dirs = [f"data.{split}_dir=x" for split in ("train", "val", "test")]
    assert compose_train("data=folder", *dirs).model.pools == compose_train("data=lmdb", *dirs).model.pools == w4
    assert compose_train().model.pools == compose_train("data=text").model.pools == POOLS
    small = compose_train("data=folder", "model=crnn_small", *dirs).model
    assert small.pools == POOLS and small.channels == [8, 16, 32, 32, 64]
    assert compose_train("data=folder", *dirs).data.output_length.pools == w4  # too_long follows the model


@pytest.mark.parametrize("height", [32, 40, 48, 64])
def test_data_height_is_one_setting(rendered, tmp_path, height):
    """`data.height=H` alone: the folder is read at H px, the model takes it, too_long uses the same frames."""
    metrics = run(tmp_path, rendered["folder"], "folder", "debug=fast_dev_run", f"data.height={height}")
    assert metrics["steps"] == 1 and math.isfinite(metrics["test/cer"])
