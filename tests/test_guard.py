"""Training that cannot lie: the non-finite guard, exit status and interrupts, up-front config errors, bad
checkpoints, images that fail to decode mid-epoch, too-wide images and paths leaving the dataset, CTC diagnostics."""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback

from crnn.callbacks import CTCDiagnostics
from crnn.config_check import config_problems
from crnn.errors import CheckpointError, RunFailed, TrainingDiverged
from crnn.checkpoints import read_checkpoint
from crnn.inference import load_recognizer
from crnn.module import blank_share
from crnn.pipeline import summary_line, train
from data import BadInput, BadInputError, Charset, FolderDataModule, collate_lines, open_split
from data.labelled import read_labels

from conftest import ROOT, compose_train

TINY = ["model=crnn_small", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.batch_size=16",
        "trainer.max_time=null", "callbacks.progress_bar.refresh_rate=0"]


def all_finite(path: Path) -> bool:
    """Every floating tensor of the checkpoint's weights is finite."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ non-finite guard
class PoisonGradients(Callback):
    """Sets one gradient entry to NaN after the backward pass of the given steps; records the weights around them."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.before and trainer.global_step - 1 not in self.after:
            self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


class PoisonImages(Callback):
    """NaN images from step ``start`` on: the network's log-probs are NaN, the loss under zero_infinity reads 0
    with zero gradients, so only the outputs show it."""

    def __init__(self, start: int):
        self.start = start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.start:
            batch["images"].fill_(math.nan)


def with_callback(monkeypatch, cfg, callback):
    """Run ``train(cfg)`` with ``callback`` added to the configured callbacks (Hydra cannot pass an object)."""
    from crnn import pipeline

    original = pipeline.instantiate_dict
    monkeypatch.setattr(pipeline, "instantiate_dict",
                        lambda node: original(node) + ([callback] if node is cfg.callbacks else []))
    return train(cfg)


def test_a_non_finite_gradient_step_is_skipped_counted_and_changes_no_weight(tmp_path, monkeypatch, caplog):
    poison = PoisonGradients(steps=[2, 3])
    cfg = compose_train(*TINY, "trainer.max_epochs=3", "trainer.log_every_n_steps=1", output_dir=tmp_path)
    metrics = with_callback(monkeypatch, cfg, poison)
    assert metrics["nonfinite_batches"] == 2 and metrics["steps"] == 6
    for step in (2, 3):  # AdamW with weight decay and momentum would move every weight: the step was dropped
        assert all(torch.equal(a, b) for a, b in zip(poison.before[step], poison.after[step]))
    warnings = [r.getMessage() for r in caplog.records if "batch skipped" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0].startswith("step 2: non-finite gradients, batch skipped (1 non-finite")
    assert "(2 non-finite so far, 2 in a row of at most 5)" in warnings[1]
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/nonfinite_batches" in rows and "train/grad_norm" in rows


@pytest.mark.parametrize(("loss", "problems"), [
    ("ctc", "loss and outputs and gradients"),  # the built-in CTC: NaN in, NaN out
    ("python_ctc", "outputs and gradients"),  # zero_infinity isolates NaN samples: their loss reads 0, not NaN
])
def test_nan_outputs_stop_the_run_after_n_in_a_row(loss, problems, tmp_path, monkeypatch):
    cfg = compose_train(*TINY, f"loss={loss}", "trainer.max_epochs=6", "callbacks.nonfinite_guard.max_in_a_row=3",
                        output_dir=tmp_path)
    with pytest.raises(TrainingDiverged) as error:
        with_callback(monkeypatch, cfg, PoisonImages(start=3))
    message = str(error.value)
    assert message.startswith(f"training diverged: 3 steps in a row up to step 5 had non-finite {problems}; last "
                              "finite train/loss ") and "at step 2; likely causes: a learning rate too high" in message
    result = json.loads((tmp_path / "final_metrics.json").read_text())
    assert result["stop_reason"] == "diverged" and result["failure"] == message and result["nonfinite_batches"] == 3
    assert "val/cer" not in result  # nothing that looks like a result
    assert all(all_finite(path) for path in (tmp_path / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_cli_diverging_run_exits_non_zero_with_one_message_and_no_nan_checkpoint(tmp_path):
    """The issue's reproduction: ``python train.py optimizer.lr=1000 +trainer.max_steps=60`` (~2 min)."""
    result = subprocess.run([sys.executable, "train.py", "optimizer.lr=1000", "+trainer.max_steps=60",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("training diverged: ") == 1
    assert json.loads((tmp_path / "final_metrics.json").read_text())["stop_reason"] == "diverged"
    assert all(all_finite(path) for path in (tmp_path / "checkpoints").glob("*.ckpt"))


def test_a_run_without_a_usable_model_fails_but_a_sweep_job_only_records_it(tmp_path, monkeypatch):
    """max_usable_cer (default 1.0: no better than reading nothing); an untrained model reads ~0.9 of digits wrong."""
    overrides = [*TINY, "trainer.max_epochs=1", "optimizer.lr=1e-9", "scheduler=null", "max_usable_cer=0.5"]
    with pytest.raises(RunFailed, match=r"^no usable model: the best checkpoint reads val/cer=0\.\d{4} >= "
                                        r"max_usable_cer=0\.5 after 2 steps, stop=max_epochs"):
        train(compose_train(*overrides, output_dir=tmp_path))
    result = json.loads((tmp_path / "final_metrics.json").read_text())
    assert result["val/cer"] >= 0.5 and result["failure"].startswith("no usable model")
    from crnn import pipeline

    monkeypatch.setattr(pipeline, "in_multirun", lambda: True)
    metrics = train(compose_train(*overrides, output_dir=tmp_path / "job"))
    assert metrics["failure"].startswith("no usable model") and metrics["test/cer"] >= 0


def test_a_run_ending_before_its_first_validation_is_no_early_stopping_error(tmp_path):
    """E.g. a schedule resized to a time budget shorter than an epoch: early stopping has nothing to judge yet."""
    metrics = train(compose_train(*TINY, "+trainer.max_steps=1", output_dir=tmp_path))
    assert metrics["steps"] == 1 and metrics["stop_reason"] == "max_steps" and metrics["best_checkpoint"] == ""


# ------------------------------------------------------------------------------------------------ interrupts
@pytest.mark.parametrize("sent", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_resumable_last_checkpoint_and_exits_non_zero(tmp_path, sent):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.max_epochs=200", "callbacks.progress_bar.refresh_rate=1",
                 "callbacks.progress_bar.line_every_n_steps=1", "callbacks.early_stopping=null"]
    process = subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as on a terminal
    log_file, deadline = run_dir / "train.log", time.monotonic() + 240
    while not (log_file.exists() and "step 5/" in log_file.read_text()):  # progress lines: stdout is no terminal
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(process.pid, sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"interrupted by {sent.name} at step " in stderr and "Traceback" not in stderr
    assert f"resume with the same overrides plus ckpt_path={last}" in stderr
    result = json.loads((run_dir / "final_metrics.json").read_text())
    assert result["stop_reason"] == "interrupted" and result["steps"] >= 5 and "val/cer" not in result
    saved_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved_step == result["steps"]
    # resumed with the same overrides and schedule (OneCycle over the 400 steps of 200 epochs), for 3 more steps
    # (over an epoch's end: 2 steps per epoch)
    FitStart.steps.clear()
    resumed = train(compose_train(*overrides, "+scheduler.total_steps=400", f"+trainer.max_steps={saved_step + 3}",
                                  f"ckpt_path={last}",
                                  "+callbacks.fit_start._target_=test_guard.FitStart", output_dir=run_dir))
    assert FitStart.steps == [saved_step]  # it went on from the interruption, not from the start
    assert resumed["stop_reason"] == "max_steps" and resumed["steps"] == saved_step + 3


class FitStart(Callback):
    """Records the global step each fit starts at (a resumed one: its checkpoint's)."""

    steps: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        FitStart.steps.append(trainer.global_step)


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(("overrides", "message"), [
    (["data.batch_size=0"], "data.batch_size=0: must be a positive whole number"),
    (["data.batch_size=-3"], "data.batch_size=-3: must be a positive whole number"),
    (["optimizer.lr=0"], "optimizer.lr=0: must be a positive number"),
    (["optimizer.lr=fast"], "optimizer.lr=fast: must be a positive number"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs=abc: must be a whole number >= -1 (or null)"),
    (["+trainer.max_steps=2.5"], "trainer.max_steps=2.5: must be a whole number >= -1 (or null)"),
    (["data.height=16"], "data.height=16 does not fit model=?: height 16 is too small for the pools, whose height strides multiply to 32: use data.height >= 32"),
    (["data=folder", "data.train_dir=/no/train", "data.val_dir=/no/val"],
     "data.test_dir not set: data=? needs a directory for each split (e.g. data.train_dir=/path/to/train); "
     "data.train_dir=/no/train, data.val_dir=/no/val: no such directories"),
    (["ckpt_path=/no/last.ckpt"], "ckpt_path=/no/last.ckpt: no such file"),
    (["init_from=/no/digits.ckpt"], "init_from=/no/digits.ckpt: no such file"),
])
def test_each_bad_value_gives_its_one_line_message(overrides, message):
    problems = config_problems(compose_train(*overrides))
    assert "; ".join(problems) == message


def test_the_default_configs_have_no_problem():
    assert config_problems(compose_train()) == [] and config_problems(compose_train("data=text")) == []


def test_cli_config_error_is_one_line_exit_1_and_leaves_no_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "data.batch_size=0", "optimizer.lr=-1", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("config error: data.batch_size=0: must be a positive whole number; optimizer.lr=-1: must be a positive "
            "number\n") in result.stderr
    assert not run_dir.exists()
    full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError: config error:" in full.stderr


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_train(*TINY, "trainer.max_epochs=1", output_dir=run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def damaged(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    data = checkpoint.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":  # bytes of the pickled object tree (data.pkl comes first in the archive)
        start = data.index(b"data.pkl") + 100
        data = data[:start] + bytes(b ^ 0xFF for b in data[start : start + 64]) + data[start + 64 :]
    elif how == "garbage":
        data = bytes(range(256)) * 10
    elif how == "foreign":
        torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
        return tmp_path / "foreign.ckpt"
    path = tmp_path / f"{how}.ckpt"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage", "foreign"])
def test_a_damaged_or_foreign_checkpoint_is_one_error_naming_the_file(checkpoint, tmp_path, how):
    path = damaged(checkpoint, tmp_path, how)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a ") and "\n" not in message
    with pytest.raises(CheckpointError, match="^" + str(path)):
        load_recognizer(path)
    with pytest.raises(CheckpointError, match="^" + str(path)):  # before any work: no run directory content
        train(compose_train(*TINY, f"ckpt_path={path}", output_dir=tmp_path / "resumed"))
    assert not (tmp_path / "resumed").exists()


def test_a_checkpoint_of_another_model_does_not_resume(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=f"^{checkpoint}: does not fit the configured model: .*weights of "
                                              "another shape, checkpoint vs configured"):
        train(compose_train(*TINY, "model=crnn", f"ckpt_path={checkpoint}", output_dir=tmp_path))


# ------------------------------------------------------------------------------------------------ data found late
def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def corrupt_pixel_png(path: Path, width: int = 64, height: int = 32) -> Path:
    """A grey PNG whose chunks, checksums and zlib stream are valid but whose scanlines are not (filter type 9 of
    0-4): Pillow's ``verify()`` passes, decoding fails. (A stream of too few rows decodes, padded with black.)"""
    rows = b"".join(b"\x09" + bytes([200]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
                     + png_chunk(b"IEND", b""))
    return path


def folder_with_a_late_failure(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("L", (64, 32), 200).save(folder / f"{i}.png")
    corrupt_pixel_png(folder / "bad.png")
    with Image.open(folder / "bad.png") as image:
        image.verify()  # the setup check passes ...
    with pytest.raises(OSError), Image.open(folder / "bad.png") as image:
        image.load()  # ... decoding does not
    lines = [f"{i}.png\t{i}{i + 1}" for i in range(3)] + ["bad.png\t77"] + [f"{i}.png\t{i}" for i in range(3, 6)]
    (folder / "gt.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_an_image_failing_to_decode_mid_epoch_follows_the_policy(tmp_path):
    folder = folder_with_a_late_failure(tmp_path / "data")
    where = f"{folder / 'gt.txt'}:4"
    for policy in ("error", "skip"):
        dataset = open_split(folder, Charset("0123456789"), bad=BadInput({"unreadable_image": policy}))
        assert len(dataset) == 7 and dataset.unreadable_policy == policy
        if policy == "error":
            with pytest.raises(BadInputError, match=f"^{where}: cannot read image .*bad.png.* \\[unreadable_image; "
                                                    "set data.bad_input.unreadable_image=skip"):
                dataset[3]
            continue
        batch = collate_lines([dataset[i] for i in range(7)])
        assert batch["texts"] == ["01", "12", "23", "3", "4", "5"] and batch["images"].shape[0] == 6
        assert len(batch["skipped"]) == 1 and batch["skipped"][0].startswith(f"{where}: cannot read image")
        assert collate_lines([dataset[3]]) == {"texts": [], "skipped": batch["skipped"]}


def test_training_skips_an_image_failing_to_decode_mid_epoch_counted(tmp_path, caplog):
    folder = folder_with_a_late_failure(tmp_path / "data")
    metrics = train(compose_train(
        "data=folder", *(f"data.{split}_dir={folder}" for split in ("train", "val", "test")), "data.batch_size=4",
        "data.charset=0123456789", "model=crnn_small", "trainer.max_epochs=2", "trainer.max_time=null",
        "data.bad_input.unreadable_image=skip", "callbacks.progress_bar.refresh_rate=0", output_dir=tmp_path / "run"))
    assert metrics["steps"] == 4
    skips = [r.getMessage() for r in caplog.records if "sample skipped" in r.getMessage()]
    train_skips = [s for s in skips if s.startswith("train")]  # one per epoch; val and test skip it too
    assert len(train_skips) == 2 and {s.split()[0] for s in skips} == {"train", "val", "test"}
    assert train_skips[0].startswith(f"train sample skipped (1 so far in train): {folder / 'gt.txt'}:4: cannot read")
    # the metrics say what they left out: 6 of the 7 lines scored, 1 skipped
    assert (metrics["test/lines"], metrics["test/skipped"], metrics["val/lines"], metrics["val/skipped"]) == (6, 1, 6, 1)
    assert "test/skipped=1 " in summary_line(metrics)


def test_too_wide_images_are_skipped_by_default_and_max_width_sets_the_limit(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, width in (("narrow", 64), ("wide", 2000)):
        Image.new("L", (width, 32), 200).save(folder / f"{name}.png")
    (folder / "gt.txt").write_text("narrow.png\t12\nwide.png\t34\n")
    module = FolderDataModule(folder, folder, folder, charset="0123456789")  # default 40 x 32 = 1280 px
    assert [r.label for r in module.dataset("train").records] == ["12"]
    assert module.problems["train"].skipped["too_wide"] == [
        f"{folder / 'gt.txt'}:2: image 2000x32 px is 2000 px wide at height 32, more than data.max_width=1280"]
    assert len(FolderDataModule(folder, folder, folder, charset="0123456789", max_width=2000).dataset("train")) == 2
    with pytest.raises(BadInputError, match=r"gt.txt:2: .* \[too_wide; set data.bad_input.too_wide=skip"):
        FolderDataModule(folder, folder, folder, charset="0123456789", bad_input={"too_wide": "error"}).setup("fit")


def test_paths_leaving_the_dataset_folder_are_malformed_unless_allowed(tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("L", (64, 32), 200).save(outside)
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    Image.new("L", (64, 32), 200).save(folder / "images" / "in.png")
    (folder / "images" / "link.png").symlink_to(outside)  # a symlink inside the folder is inside
    (folder / "gt.txt").write_text(f"images/in.png\t1\nimages/link.png\t2\n../elsewhere.png\t3\n{outside}\t4\n"
                                   "images/../images/in.png\t5\n")
    bad = BadInput({"malformed": "skip"})
    assert [r.label for r in read_labels(folder, bad)] == ["1", "2", "5"]
    assert [item.split(": ")[0] for item in bad.skipped["malformed"]] == [f"{folder / 'gt.txt'}:{n}" for n in (3, 4)]
    assert "leaves the dataset folder" in bad.skipped["malformed"][0]
    assert [r.label for r in read_labels(folder, BadInput(), allow_outside_paths=True)] == ["1", "2", "3", "4", "5"]
    module = FolderDataModule(folder, folder, folder, charset="0123456789", allow_outside_paths=True)
    assert len(module.dataset("train")) == 5


# ------------------------------------------------------------------------------------------------ CTC diagnostics
def test_blank_share_counts_valid_frames_whose_best_class_is_the_blank():
    log_probs = torch.full((4, 2, 3), -5.0)
    best = torch.tensor([[0, 1], [0, 0], [2, 0], [0, 0]])  # (T, B): frame 3 of sample 1 is padding
    log_probs.scatter_(2, best[..., None], 0.0)
    assert blank_share(log_probs, torch.tensor([4, 3]), blank=0).item() == pytest.approx(5 / 7)
    assert blank_share(log_probs, torch.tensor([4, 3]), blank=2).item() == pytest.approx(1 / 7)


def test_collapse_to_all_blank_is_warned_once_when_the_loss_plateaus(caplog):
    diagnostics = CTCDiagnostics(patience=3, plateau=0.05)
    trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="fit"), callback_metrics={})

    def validate(empty: float, loss: float) -> None:
        trainer.callback_metrics = {"val/empty_share": torch.tensor(empty), "val/loss": torch.tensor(loss)}
        diagnostics.on_validation_end(trainer, None)

    for empty, loss in [(1.0, 9.0), (1.0, 5.0), (1.0, 3.0), (0.5, 3.0), (1.0, 3.0), (1.0, 2.95)]:
        validate(empty, loss)  # loss still falling fast, then one non-empty line: no warning
    assert "CTC collapse" not in caplog.text
    for loss in (2.94, 2.93, 2.93):
        validate(1.0, loss)
    assert caplog.text.count("CTC collapse: every validation line has been read as empty for 3 validations") == 1
    assert "a lower learning rate (optimizer.lr)" in caplog.text
