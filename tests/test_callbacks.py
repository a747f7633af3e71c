"""The callbacks of crnn/callbacks.py on a fake clock: data-wait share, fit clock (and its resume)."""

import types
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from crnn import callbacks

# --- data-wait timer ---------------------------------------------------------------------------------


class FakeClock:
    """Stands in for ``time.perf_counter`` in ``crnn.callbacks``: time only moves when a test says so."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock(100.0)
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


class _LogRecorder:
    def __init__(self):
        self.logged = {}

    def log(self, name, value):
        self.logged[name] = value


def test_data_wait_timer_exact_times_with_a_fake_clock(clock):
    """wait: epoch start / batch end -> batch start; step: batch start -> end; a validation run counts as neither."""
    timer = callbacks.DataWaitTimer()
    assert (timer.wait_s, timer.step_s, timer.share) == (0.0, 0.0, 0.0)
    clock.now = 110.0  # time before the epoch starts is not counted
    timer.on_train_epoch_start(None, None)
    for wait, step in [(2.0, 3.0), (1.0, 4.0)]:
        clock.now += wait
        timer.on_train_batch_start(None, None, None, 0)
        clock.now += step
        timer.on_train_batch_end(None, None, None, None, 0)
    clock.now += 50.0  # a mid-epoch validation run (and the gap before it)
    timer.on_validation_end(None, None)
    clock.now += 1.0
    timer.on_train_batch_start(None, None, None, 2)
    clock.now += 2.0
    timer.on_train_batch_end(None, None, None, None, 2)
    assert (timer.wait_s, timer.step_s) == (4.0, 9.0)
    assert timer.share == pytest.approx(4 / 13)
    module = _LogRecorder()
    timer.on_train_epoch_end(None, module)
    assert module.logged == {"perf/data_wait_share": pytest.approx(4 / 13)}
    clock.now += 7.0  # the next epoch starts from zero
    timer.on_train_epoch_start(None, None)
    assert (timer.wait_s, timer.step_s, timer.share) == (0.0, 0.0, 0.0)
    clock.now += 5.0
    timer.on_train_batch_start(None, None, None, 0)
    assert (timer.wait_s, timer.step_s, timer.share) == (5.0, 0.0, 1.0)


class _ClockedLines(torch.utils.data.Dataset):
    """Four samples; fetching one takes 2 s of the fake clock."""

    def __init__(self, clock):
        self.clock = clock

    def __len__(self):
        return 4

    def __getitem__(self, index):
        self.clock.now += 2.0
        return torch.ones(3)


class _ClockedModule(pl.LightningModule):
    """A training step takes 1 s of the fake clock, a validation step 100 s."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        return (self.weight * batch).sum()

    def validation_step(self, batch, batch_idx):
        self.clock.now += 100.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_ClockedLines(self.clock), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(_ClockedLines(self.clock), batch_size=2)


def test_data_wait_timer_in_trainer(clock):
    """In a real fit (2 epochs of 4 batches, validation after batch 2 and 4): the last epoch's totals are its 4
    fetches (2 s each, the first included) and 4 steps (1 s each); the 2 x 100 s validation runs are excluded."""
    timer = callbacks.DataWaitTimer()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=2, num_sanity_val_steps=0,
    )
    trainer.fit(_ClockedModule(clock))
    assert (timer.wait_s, timer.step_s) == (8.0, 4.0)
    assert timer.share == pytest.approx(2 / 3)
    assert trainer.callback_metrics["perf/data_wait_share"].item() == pytest.approx(2 / 3)


# --- fit clock ---------------------------------------------------------------------------------------


def test_fit_clock_logs_fit_seconds_and_a_resumed_run_goes_on_counting(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    logged = []
    module = SimpleNamespace(log=lambda name, value: logged.append((name, value)))
    trainer = SimpleNamespace(sanity_checking=True)
    clock = callbacks.FitClock()
    clock.on_validation_epoch_end(trainer, module)  # the sanity check, before fit starts: nothing
    clock.on_train_start(trainer, module)
    trainer.sanity_checking, now[0] = False, 130.0
    clock.on_validation_epoch_end(trainer, module)
    saved = clock.state_dict()  # what a checkpoint written now holds
    clock.on_train_end(trainer, module)
    clock.on_validation_epoch_end(trainer, module)  # a trainer.validate after fit: nothing
    resumed = callbacks.FitClock()
    resumed.load_state_dict(saved)
    now[0] = 500.0
    resumed.on_train_start(trainer, module)
    now[0] = 512.0
    resumed.on_validation_epoch_end(trainer, module)
    assert logged == [("time/fit_seconds", 30.0), ("time/fit_seconds", 42.0)]
