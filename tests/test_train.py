"""End to end through the Hydra config: fast_dev_run for every loss, a tiny real run, the CLI, and (slow) accuracy
and every loss learning."""

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from crnn.module import CRNNModule
from crnn.pipeline import summary_line, train

from conftest import ROOT, compose_train, config_options

LOSSES = config_options("loss")
REPORTED = {"val/cer", "val/acc", "test/cer", "test/acc", "train_seconds", "epochs", "steps", "stop_reason", "stop_detail",
            "best_checkpoint", "val/lines", "val/unemittable", "test/lines", "test/unemittable", "protocol"}


def run(tmp_path: Path, *overrides: str) -> dict:
    metrics = train(compose_train(*overrides, output_dir=tmp_path))
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == metrics
    assert REPORTED <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values() if not isinstance(v, str))
    return metrics


@pytest.mark.parametrize("loss", LOSSES)
def test_fast_dev_run_every_loss(loss, tmp_path):
    metrics = run(tmp_path, "debug=fast_dev_run", "model=crnn_small", f"loss={loss}")
    assert metrics["steps"] == 1 and metrics["best_checkpoint"] == "" and metrics["stop_reason"] == "fast_dev_run"


@pytest.mark.parametrize(
    "overrides",
    [["scheduler=null"], ["scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR", "~scheduler.max_lr",
                          "~scheduler.pct_start", "+scheduler.T_max=3", "module.scheduler_interval=epoch"]],
    ids=["no_scheduler", "cosine_per_epoch"],
)
def test_fast_dev_run_other_schedules(overrides, tmp_path):
    run(tmp_path, "debug=fast_dev_run", "model=crnn_small", *overrides)


def test_fast_dev_run_bf16_mixed(tmp_path):
    run(tmp_path, "debug=fast_dev_run", "model=crnn_small", "trainer=cpu", "trainer.precision=bf16-mixed")


# exact epoch/step counts: no wall-clock guard (a later trainer.max_time=... override wins)
TINY = ["model=crnn_small", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.batch_size=16",
        "trainer.max_time=null"]


def test_short_run_saves_a_checkpoint_that_rebuilds_the_model(tmp_path):
    metrics = run(tmp_path, *TINY, "trainer.max_epochs=2")
    assert metrics["epochs"] == 2 and metrics["steps"] == 4 and metrics["stop_reason"] == "max_epochs"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and (tmp_path / "csv" / "metrics.csv").exists()
    module = CRNNModule.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu").eval()
    texts = module.predict_texts(torch.rand(2, 1, 32, 60), torch.tensor([60, 45]))
    assert len(texts) == 2 and all(set(text) <= set("0123456789") for text in texts)


def test_a_run_cut_short_by_max_time_says_so(tmp_path, caplog):
    """Without the schedule sizing of callbacks/time_budget.yaml, max_time cuts the schedule, with a warning."""
    metrics = run(tmp_path, *TINY, "trainer.max_epochs=50", "trainer.max_time=00:00:00:01",
                  "callbacks.early_stopping=null", "callbacks.time_budget=null")
    assert metrics["stop_reason"] == "max_time" and metrics["epochs"] < 50
    assert "stopped by trainer.max_time=00:00:00:01" in caplog.text and "trainer.max_time=null" in caplog.text


@pytest.mark.parametrize(("overrides", "reason", "detail"), [
    (["+trainer.max_steps=3"], "max_steps", ""),
    (["callbacks.early_stopping.stopping_threshold=1.01"], "early_stopping", "val/cer < 1.01"),  # any CER is
    (["callbacks.early_stopping.patience=1", "scheduler=null", "optimizer.lr=1e-12"], "early_stopping",  # no learning
     "no val/cer improvement in 1 validations (best "),
])
def test_stop_reason(overrides, reason, detail, tmp_path):
    metrics = run(tmp_path, *TINY, "trainer.max_epochs=4", *overrides)
    assert metrics["stop_reason"] == reason and metrics["stop_detail"].startswith(detail)
    assert f"stop={reason}{f' ({detail}' if detail else ' '}" in summary_line(metrics)


def test_one_cycle_stepped_per_epoch_spans_the_epochs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="crnn.module")
    run(tmp_path, *TINY, "trainer.max_epochs=12", "module.scheduler_interval=epoch", "callbacks.early_stopping=null")
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rates = [float(row["lr-AdamW"]) for row in csv.DictReader(f) if row.get("lr-AdamW")]
    # logged every 10 steps (epochs 4 and 9 of 12): annealing from max_lr (5e-3) over 12 epochs, not 24 steps
    assert len(rates) == 2 and 0.5 * 5e-3 < rates[0] < 5e-3 and rates[1] < 0.2 * 5e-3
    # validation samples are logged once per fit epoch, not for train.py's final validation
    assert caplog.text.count("val samples at step") == 12


def test_one_cycle_without_a_bound_on_the_run_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match="set trainer.max_epochs .* or trainer.max_time"):
        run(tmp_path, *TINY, "trainer.max_epochs=-1")
    with pytest.raises(ValueError, match="set trainer.max_epochs"):  # a time bound, but nothing sizes the schedule
        run(tmp_path, *TINY, "trainer.max_epochs=-1", "trainer.max_time=00:00:00:05", "callbacks.time_budget=null")


TRAINING_TEXTS: list[set[str]] = []  # per epoch, filled by TrainingTextRecorder


class TrainingTextRecorder(pl.Callback):
    """Records the texts of every training batch, per epoch, in ``TRAINING_TEXTS``."""

    def on_train_epoch_start(self, trainer, pl_module):
        TRAINING_TEXTS.append(set())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        TRAINING_TEXTS[-1].update(batch["texts"])


@pytest.mark.parametrize("data", ["digits", "text"])
def test_debug_overfit_trains_on_the_same_lines_every_epoch(data, tmp_path):
    TRAINING_TEXTS.clear()
    run(tmp_path, "debug=overfit", f"data={data}", "model=crnn_small", "trainer.overfit_batches=2",
        "data.batch_size=8", "data.val_size=8", "data.test_size=8", "trainer.max_epochs=3",
        "+callbacks.recorder._target_=test_train.TrainingTextRecorder")
    assert len(TRAINING_TEXTS) == 3 and 8 < len(TRAINING_TEXTS[0]) <= 16
    assert TRAINING_TEXTS[0] == TRAINING_TEXTS[1] == TRAINING_TEXTS[2]


def test_cli_fast_dev_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.fast_dev_run=true", "model=crnn_small", "data.val_size=16",
         "data.test_size=16", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("val/cer=")
    assert (tmp_path / "final_metrics.json").exists() and summary in (tmp_path / "train.log").read_text()
    # quiet start: no third-party deprecation warnings or adverts (crnn.pipeline.quiet_third_party)
    assert "Tip:" not in result.stdout + result.stderr and "LeafSpec" not in result.stdout + result.stderr


@pytest.mark.slow
def test_default_run_learns_digits(tmp_path):
    """The default config within its 500-step budget (no time guard) gets digit strings to < 5 % CER."""
    metrics = run(tmp_path, "trainer.max_time=null", "callbacks.progress_bar.refresh_rate=0")
    assert metrics["steps"] <= 500
    assert metrics["test/cer"] < 0.05 and metrics["val/cer"] < 0.05


def validation_curve(run_dir: Path, epochs: int) -> list[float]:
    """``val/cer`` of the validation closing each of the first ``epochs`` epochs, from the CSV logger's
    ``metrics.csv`` (train.py's later validation of the best checkpoint is logged with epoch ``epochs``)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row["val/cer"]) for row in csv.DictReader(f) if row["val/cer"] and int(row["epoch"]) < epochs]


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_short_run_with_every_loss_lowers_the_validation_cer(loss, tmp_path):
    """One run of the digits ablation (200 steps, a validation every 20): each loss takes val CER from the
    all-blank plateau (1.0) well down."""
    epochs = 10
    run(tmp_path, "experiment=ablation_losses", f"loss={loss}", "seed=1", "data.test_size=64",
        f"trainer.max_epochs={epochs}")
    curve = validation_curve(tmp_path, epochs)
    assert len(curve) == epochs, curve
    assert curve[-1] < curve[0] and curve[-1] < 0.2, curve
