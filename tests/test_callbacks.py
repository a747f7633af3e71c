"""The callbacks of crnn/callbacks.py: data-wait share and fit clock (fake clock), early stopping after the
warm-up (against Lightning's), the LR schedule sized to a time budget (fake clock, against torch's OneCycleLR)."""

import math
import types
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import pytorch_lightning.callbacks.timer as pl_timer
import torch

from crnn import callbacks, pipeline
from crnn.pipeline import instantiate_dict
from crnn.schedules import OneCycleLR

from conftest import compose_train

# --- data-wait timer ---------------------------------------------------------------------------------


class FakeClock:
    """Stands in for ``time.perf_counter`` in ``crnn.callbacks``: time only moves when a test says so."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """Our callbacks' clock, and Lightning's ``Timer`` (``trainer.max_time``): no test depends on the real time."""
    fake = FakeClock(100.0)
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(perf_counter=fake))
    monkeypatch.setattr(pl_timer, "time", types.SimpleNamespace(monotonic=fake))
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


# --- early stopping after the warm-up ----------------------------------------------------------------


def stopping_run(callback, learning_rates, scores):
    """Feeds ``callback`` one training step at each learning rate, then a validation with each score; returns
    the index of the validation that stopped training (None if none did)."""
    group = {"lr": None}
    trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[group])])
    for index, (lr, score) in enumerate(zip(learning_rates, scores)):
        group["lr"] = lr
        callback.on_train_batch_end(trainer, None, None, None, 0)
        if callback._evaluate_stopping_criteria(torch.tensor(score))[0]:
            return index
    return None


@pytest.mark.parametrize("learning_rates", [[1e-3] * 8, [1e-2 / (k + 1) for k in range(8)]], ids=["constant", "decay"])
def test_early_stopping_after_warmup_is_lightnings_without_a_warmup(learning_rates):
    scores = [0.5, 0.4, 0.45, 0.41, 0.42, 0.3, 0.35, 0.36]
    ours = stopping_run(callbacks.EarlyStoppingAfterWarmup(monitor="val/cer", patience=2), learning_rates, scores)
    lightning = pl.callbacks.EarlyStopping(monitor="val/cer", patience=2)
    expected = next((i for i, s in enumerate(scores) if lightning._evaluate_stopping_criteria(torch.tensor(s))[0]),
                    None)
    assert ours == expected == 3


def test_early_stopping_patience_counts_only_once_the_learning_rate_stops_rising():
    warmup, decay = [1e-4, 2e-4, 3e-4, 4e-4], [3e-4, 2e-4, 1e-4, 5e-5]
    plateau = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    callback = callbacks.EarlyStoppingAfterWarmup(monitor="val/cer", patience=2)
    assert stopping_run(callback, warmup + decay, plateau) == 5  # the 2nd validation without improvement after it
    assert callback.stopping_reason == pl.callbacks.early_stopping.EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert callback.patience == 2
    # a threshold or a non-finite metric stops during the warm-up too
    threshold = callbacks.EarlyStoppingAfterWarmup(monitor="val/cer", patience=2, stopping_threshold=0.1)
    assert stopping_run(threshold, warmup, [0.5, 0.05, 0.5, 0.5]) == 1
    assert stopping_run(callbacks.EarlyStoppingAfterWarmup(monitor="val/cer"), warmup, [0.5, math.nan]) == 1
    # the learning rates travel in checkpoints: a resumed run knows it is still warming up
    resumed = callbacks.EarlyStoppingAfterWarmup(monitor="val/cer", patience=2)
    original = callbacks.EarlyStoppingAfterWarmup(monitor="val/cer", patience=2)
    stopping_run(original, warmup[:2], plateau[:2])
    resumed.load_state_dict(original.state_dict())
    assert resumed.in_warmup and resumed.wait_count == 0


# --- LR schedule sized to a time budget ------------------------------------------------------------------


class Ticks(pl.Callback):
    """Every training step takes ``seconds`` of the fake clock; records the learning rate each step used."""

    def __init__(self, clock, seconds=1.0):
        self.clock, self.seconds, self.rates = clock, seconds, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.now += self.seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def budget_run(tmp_path, clock, *overrides, extra=()):
    """A tiny digits run (10 steps per epoch, 1000 epochs) with a 60 s budget on the fake clock, 1 s per step;
    ``extra`` callbacks join the configured ones."""
    ticks = Ticks(clock)
    cfg = compose_train("model=crnn_small", "data.train_size=160", "data.val_size=16", "data.test_size=16",
                        "data.batch_size=16", "trainer.max_epochs=1000", "trainer.max_time=00:00:01:00",
                        "callbacks.early_stopping=null", "callbacks.time_budget.measure_steps=5", *overrides,
                        output_dir=tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "instantiate_dict", lambda node: [*instantiate_dict(node), ticks, *extra]
                      if node is cfg.callbacks else instantiate_dict(node))
        metrics = pipeline.train(cfg)
    return metrics, ticks.rates, cfg


def test_time_budget_sizes_the_one_cycle_schedule_from_the_first_steps(tmp_path, clock, caplog):
    """5 s for 5 steps, 55 s left, 90 % of it planned: 5 + 49 = 54 steps; the run ends the resized schedule."""
    metrics, rates, cfg = budget_run(tmp_path, clock)
    assert metrics["stop_reason"] == "time_budget" and metrics["steps"] == 54
    assert "resized to total_steps=54" in caplog.text
    # the learning rates from then on are those of a OneCycleLR sized for 54 steps from the start
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.scheduler.max_lr, total_steps=54,
                                                    pct_start=cfg.scheduler.pct_start)
    expected = []
    for _ in range(54):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert rates[5:] == pytest.approx(expected[5:], rel=1e-9)
    assert rates[-1] < 1e-3 * cfg.scheduler.max_lr  # annealed to the end


def test_time_budget_leaves_a_schedule_that_fits_alone(tmp_path, clock):
    metrics, rates, _ = budget_run(tmp_path, clock, "trainer.max_epochs=3")  # 30 steps fit into 60 s
    assert metrics["stop_reason"] == "max_epochs" and metrics["steps"] == 30


def test_a_run_bounded_only_by_its_time_budget_trains_a_sized_schedule(tmp_path, clock):
    metrics, _, _ = budget_run(tmp_path, clock, "trainer.max_epochs=-1")
    assert metrics["stop_reason"] == "time_budget" and metrics["steps"] == 54


class StopAt(pl.Callback):
    """Raises :class:`Stopped` before training step ``step`` (stands for a killed process)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Stopped


class Stopped(Exception):
    pass


def test_a_resumed_run_keeps_its_sized_schedule(tmp_path, clock):
    """Killed at step 25 (after the sizing at step 5 and the checkpoint of step 20), resumed: same 54 steps."""
    with pytest.raises(Stopped):
        budget_run(tmp_path, clock, extra=[StopAt(25)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    metrics, rates, _ = budget_run(tmp_path, clock, f"ckpt_path={last}")
    assert metrics["stop_reason"] == "time_budget" and metrics["steps"] == 54
    assert len(rates) == 54 - 20  # resumed after step 20


def test_time_budget_warns_when_it_cannot_resize_the_schedule(tmp_path, clock, caplog):
    """A per-epoch schedule is not resized: the callback says at the start that the budget will cut the run."""
    metrics, _, _ = budget_run(tmp_path, clock, "trainer.max_epochs=8", "module.scheduler_interval=epoch")
    assert "about 54 steps fit, the run is set for 80" in caplog.text
    assert metrics["stop_reason"] == "max_time"  # Lightning's Timer, on the fake clock too, stops it at 60 s


@pytest.mark.parametrize("total_steps, pct_start", [(10, 0.1), (20, 0.05), (2, 0.5)])
def test_one_cycle_schedule_with_a_one_step_warm_up(total_steps, pct_start):
    """torch's OneCycleLR divides by zero when pct_start * total_steps == 1 (a 10-step run with the default 0.1);
    ours gives the rates torch gives for a pct_start just above that."""
    def rates(scheduler_class, pct):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = scheduler_class(optimizer, max_lr=0.1, total_steps=total_steps, pct_start=pct)
        seen = [scheduler.get_last_lr()[0]]
        for _ in range(total_steps - 1):
            optimizer.step()
            scheduler.step()
            seen.append(scheduler.get_last_lr()[0])
        return seen

    with pytest.raises(ZeroDivisionError):
        rates(torch.optim.lr_scheduler.OneCycleLR, pct_start)
    nearby = rates(torch.optim.lr_scheduler.OneCycleLR, pct_start + 1e-4 / total_steps)
    assert rates(OneCycleLR, pct_start) == pytest.approx(nearby, rel=1e-3)
