"""``python train.py ckpt_path=<run>/checkpoints/last.ckpt`` continues a run exactly: a run that crashes mid-epoch
and is resumed ends with the same weights, optimizer and scheduler state and metrics as an uninterrupted one."""

from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from crnn.pipeline import train

from conftest import compose_train
# Dropout on, so that the restored RNG state matters; 3 steps per epoch, lengths grouped in a seeded batch order.
OVERRIDES = ["model=crnn_small", "model.dropout=0.2", "trainer=cpu", "trainer.max_epochs=3", "data.train_size=48",
             "data.val_size=16", "data.test_size=16", "data.batch_size=16", "callbacks.progress_bar.refresh_rate=0"]


class Interrupted(Exception):
    """Stands for the process dying."""


class Interrupt(Callback):
    """Raises :class:`Interrupted` before training batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise Interrupted


def run(output_dir: Path, *overrides: str) -> dict:
    return train(compose_train(*OVERRIDES, *overrides, output_dir=output_dir))


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    expected = run(tmp_path / "straight")

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run(resumed_dir, f"+callbacks.interrupt._target_={__name__}.Interrupt", "+callbacks.interrupt.epoch=1",
            "+callbacks.interrupt.batch=1")
    last = resumed_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # saved after epoch 0's validation
    got = run(resumed_dir, f"ckpt_path={last}")

    volatile = {"train_seconds", "best_checkpoint"}
    assert {k: v for k, v in got.items() if k not in volatile} == {k: v for k, v in expected.items() if k not in volatile}
    assert Path(got["best_checkpoint"]).name == Path(expected["best_checkpoint"]).name
    final, reference = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (resumed_dir,
                                                                                                 tmp_path / "straight"))
    assert (final["epoch"], final["global_step"]) == (reference["epoch"], reference["global_step"]) == (2, 9)
    for key in ("state_dict", "optimizer_states"):
        torch.testing.assert_close(final[key], reference[key], rtol=0, atol=0)
    assert final["lr_schedulers"] == reference["lr_schedulers"]
