"""Every callback of the project, each with a ``conf/callbacks/*.yaml``.

- :class:`DataWaitTimer`: ``perf/data_wait_share``, the share of training time spent waiting for batches.
- :class:`RNGStateCheckpoint`: global RNG states in checkpoints, so a resumed run continues exactly.
- :class:`FitClock`: ``time/fit_seconds`` with every validation (``scripts/sweep_report.py``'s time to a CER).
- :class:`PredictionWriter`: every test line's reference and prediction in ``test_predictions.tsv``
  (``scripts/sweep_report.py``'s per-character error rates; :func:`read_predictions` reads it back).
- :class:`EarlyStoppingAfterWarmup`: Lightning's early stopping whose patience counts only once the learning
  rate has stopped rising.
- :class:`TimeBudgetSchedule`: sizes a ``total_steps`` LR schedule (OneCycleLR) to ``trainer.max_time`` from the
  step rate of the first steps, so a run with a time budget finishes its schedule.
- :class:`NonFiniteGuard`: skips optimizer steps with a non-finite loss, output or gradient; stops a diverged run.
- :class:`InterruptCheckpoint`: on Ctrl-C / SIGTERM saves ``last.ckpt`` before Lightning shuts down.
- :class:`CTCDiagnostics`: blank shares and a warning when the network collapses to all-blank output.
- :class:`SkippedSamples`: logs and counts samples the loader skipped (images that fail to decode mid-epoch).
- :class:`LineProgressBar`: Lightning's progress bars on a terminal, periodic log lines elsewhere.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, Timer, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from crnn.errors import TrainingDiverged
from losses import ctc_alignment_targets

__all__ = [
    "CTCDiagnostics",
    "DataWaitTimer",
    "EarlyStoppingAfterWarmup",
    "FitClock",
    "InterruptCheckpoint",
    "LineProgressBar",
    "NonFiniteGuard",
    "PredictionWriter",
    "RNGStateCheckpoint",
    "SkippedSamples",
    "TimeBudgetSchedule",
    "read_predictions",
]

log = logging.getLogger(__name__)

PROVISIONAL_STEPS = 10**9  # schedule length of a run bounded only by time, until TimeBudgetSchedule sizes it


class DataWaitTimer(Callback):
    """Logs ``perf/data_wait_share``: the share of a training epoch spent outside training steps.

    Per epoch, *wait* is the wall time from the epoch start or the previous ``on_train_batch_end`` to
    the next ``on_train_batch_start`` (fetching the batch, incl. worker start-up on the first one,
    plus the loop's own small overhead), and *step* is the time from ``on_train_batch_start`` to
    ``on_train_batch_end`` (forward, backward, optimizer). Validation runs are not counted as wait.
    The logged value is ``wait / (wait + step)`` at the end of each training epoch; ``wait_s`` and
    ``step_s`` keep the last epoch's totals in seconds. On GPU, steps end when their kernels are
    queued, not finished, so the share is only indicative there.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.step_s = 0.0
        self._mark = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._mark = now - self._mark, now
        return elapsed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait_s = self.step_s = 0.0
        self._lap()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.wait_s += self._lap()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.step_s += self._lap()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lap()  # a mid-epoch validation run is neither data wait nor a training step

    @property
    def share(self) -> float:
        """``wait_s / (wait_s + step_s)`` for the current/last epoch (0 before any step)."""
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("perf/data_wait_share", self.share)


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states in every checkpoint and restores them when training resumes from one.

    Lightning restores weights, optimizer, scheduler, loop counters and callback states, but not the global
    generators: without this, dropout masks (torch) after a resume differ from those of an uninterrupted run.
    Covers ``torch`` (CPU and, when available, the current CUDA device), ``numpy.random`` and ``random``. The
    checkpoint holds rank 0's states; every process restores them, the CUDA one onto its own device (so a
    checkpoint also resumes on a machine with fewer GPUs). Exact for one process; under DDP the ranks are seeded
    alike, so exact as far as their draws are alike too (same batch shapes). The states
    are stored as tensors, ints and strings only, so checkpoints still load with ``torch.load(weights_only=True)``.
    Data order needs nothing here: the samplers derive it from ``(seed, epoch)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        return {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"][0])
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, state, gauss = state_dict["python"]
        random.setstate((version, tuple(state), gauss))


class FitClock(Callback):
    """Logs ``time/fit_seconds``: wall time since the start of training, at the end of every validation run.

    The clock starts in ``on_train_start`` (after Lightning's sanity check), so the value includes
    training steps, data loading and earlier validation runs: the cost of getting to this checkpoint.
    Nothing is logged during the sanity check or after ``fit`` (e.g. by a later ``trainer.validate``).
    The time is saved in checkpoints, so a resumed run goes on counting from where it was saved.
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.offset = 0.0  # seconds before this process's fit (restored from a checkpoint)

    def elapsed(self) -> float:
        """Fit seconds so far, earlier processes' included."""
        return self.offset + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start is None or trainer.sanity_checking:
            return
        pl_module.log("time/fit_seconds", self.elapsed())

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.offset = float(state_dict["elapsed"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = None


class PredictionWriter(Callback):
    """Writes every test line's reference and prediction to ``<dirpath>/test_predictions.tsv``.

    One line per sample, ``target<TAB>prediction`` after a ``target\\tprediction`` header, in loader order
    (texts never contain tabs or newlines). Under a multi-process strategy each rank writes its own shard,
    ``test_predictions.rank<R>.tsv``; :func:`read_predictions` reads either layout.

    Predictions are taken from the ``test_step`` output ``{"preds": [...]}`` of
    :class:`crnn.module.CRNNModule`.

    Args:
        dirpath: directory of the file (created if missing), e.g. the run's output directory.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._rows: list[tuple[str, str]] = []

    def path(self, trainer: pl.Trainer) -> Path:
        """The file this rank writes."""
        name = "test_predictions.tsv" if trainer.world_size == 1 else f"test_predictions.rank{trainer.global_rank}.tsv"
        return self.dirpath / name

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            raise TypeError(f"PredictionWriter needs test_step to return {{'preds': texts}}, got {type(outputs).__name__}")
        preds = outputs["preds"]
        self._rows.extend(zip(batch["texts"], preds))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("target\tprediction\n")
            f.writelines(f"{target}\t{pred}\n" for target, pred in self._rows)
        self._rows = []


def read_predictions(dirpath: str | Path) -> list[tuple[str, str]]:
    """``(target, prediction)`` pairs from ``test_predictions.tsv`` or all its ``.rank<R>`` shards in
    ``dirpath`` (an empty list if there is none)."""
    dirpath = Path(dirpath)
    files = [dirpath / "test_predictions.tsv"]
    if not files[0].exists():
        files = sorted(dirpath.glob("test_predictions.rank*.tsv"))
    pairs = []
    for file in files:
        lines = file.read_text(encoding="utf-8").split("\n")[1:]  # drop the header
        pairs.extend(tuple(line.split("\t", 1)) for line in lines if line)
    return pairs


def learning_rate(trainer: pl.Trainer) -> float | None:
    """The first parameter group's learning rate of the first optimizer (``None`` before there is one)."""
    return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None


class EarlyStoppingAfterWarmup(EarlyStopping):
    """:class:`pytorch_lightning.callbacks.EarlyStopping` whose ``patience`` counts only after the warm-up.

    A validation during warm-up (the learning rate rose over the last training step, as in OneCycleLR's first
    ``pct_start``) can set a new best score, and non-finite values and ``stopping_threshold`` stop training as
    usual, but a validation without improvement does not count towards ``patience``: a run still ramping up its
    learning rate is not judged on a plateau. With a constant or decaying learning rate this is exactly
    ``EarlyStopping``. Arguments are ``EarlyStopping``'s; why it stopped is in ``stopping_reason`` /
    ``stopping_reason_message`` (Lightning's).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._learning_rates: list[float] = []  # of the last two training steps
        self._validated = False  # a validation ran in this fit (until then a missing monitor is no typo)

    @property
    def in_warmup(self) -> bool:
        """The learning rate rose over the last training step."""
        return len(self._learning_rates) == 2 and self._learning_rates[1] > self._learning_rates[0]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        lr = learning_rate(trainer)  # the rate this step used: schedulers step after this hook
        if lr is not None:
            self._learning_rates = [*self._learning_rates[-1:], lr]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True
        super().on_validation_end(trainer, pl_module)

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if not self._validated and self.monitor not in trainer.callback_metrics:
            return  # training ended (max_steps, a schedule resized to a time budget) before its first validation
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        if not self.in_warmup:
            return super()._evaluate_stopping_criteria(current)
        patience, self.patience = self.patience, math.inf  # no stop for lack of improvement ...
        try:
            should_stop, reason = super()._evaluate_stopping_criteria(current)
        finally:
            self.patience = patience
        self.wait_count = 0  # ... and warm-up validations do not count towards it
        return should_stop, reason

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "learning_rates": list(self._learning_rates)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._learning_rates = list(state_dict.get("learning_rates", []))


class TimeBudgetSchedule(Callback):
    """Fits a ``total_steps`` LR schedule (OneCycleLR) to a time budget, so that the run ends its schedule.

    With a time budget (``trainer.max_time``) and an epoch/step bound that the run cannot reach in it, a schedule
    sized by that bound would be cut off by the budget mid-way (still in warm-up, or at a high learning rate).
    This callback times the first ``measure_steps`` training steps (or the first epoch, if shorter), estimates how
    many steps fit into the budget (``margin`` of the time left, the rest kept for validation runs), and if that is
    fewer than the schedule's ``total_steps`` rebuilds the scheduler for that many steps (same arguments, advanced
    to the current step) and sets ``trainer.max_steps`` to it, so training stops when the schedule ends (under
    data-parallel training, rank 0's estimate for every process). It logs the numbers either way; nothing changes
    without a budget, with a schedule that fits, or with a scheduler that has no ``total_steps`` or steps per
    epoch. The resized length is saved in checkpoints and restored on resume.

    The budget is that of the ``Timer`` Lightning builds from ``trainer.max_time`` (read in :meth:`setup`, before
    the optimizers are configured); without one the callback does nothing.

    Args:
        measure_steps: training steps timed before the schedule is sized (at least 2).
        margin: share of the remaining budget planned for training steps, in ``(0, 1]``.
    """

    def __init__(self, measure_steps: int = 20, margin: float = 0.9) -> None:
        if measure_steps < 2 or not 0.0 < margin <= 1.0:
            raise ValueError(f"need measure_steps >= 2 and 0 < margin <= 1, got {measure_steps} and {margin}")
        self.budget: float | None = None  # seconds, from the trainer's Timer
        self.measure_steps = measure_steps
        self.margin = margin
        self.total_steps: int | None = None  # the resized schedule's length, once sized
        self.sized = False
        self._start: float | None = None
        self._first_step = 0
        self._offset = 0.0  # budget seconds spent by earlier processes (restored from a checkpoint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        timer = next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        self.budget = None if remaining is None else timer.time_elapsed() + remaining  # trainer.max_time

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._first_step = time.perf_counter(), trainer.global_step
        if self.total_steps is not None:  # resumed: the scheduler state already has the resized length
            trainer.fit_loop.epoch_loop.max_steps = self.total_steps

    def elapsed(self) -> float:
        """Budget seconds spent so far, earlier processes' included."""
        return self._offset + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        steps = trainer.global_step - self._first_step
        first_epoch_done = trainer.current_epoch == 0 and batch_idx + 1 >= trainer.num_training_batches
        if self.sized or self.budget is None or steps < 2 or (steps < self.measure_steps and not first_epoch_done):
            return
        self.sized = True
        seconds_per_step = max(time.perf_counter() - self._start, 1e-9) / steps
        remaining = self.budget - self.elapsed()
        fits = trainer.global_step + max(0, int(self.margin * remaining / seconds_per_step))
        fits = trainer.strategy.broadcast(fits, src=0)  # data-parallel: every process stops at the same step
        config = trainer.lr_scheduler_configs[0] if trainer.lr_scheduler_configs else None
        if config is None or config.interval != "step" or not hasattr(config.scheduler, "total_steps"):
            if trainer.estimated_stepping_batches > fits:  # nothing to resize: say that the budget will cut the run
                log.warning("time budget %.0f s (trainer.max_time): %.2f steps/s over the first %d steps, about %d "
                            "steps fit, the run is set for %s; the budget will stop it first (only a per-step "
                            "total_steps schedule such as OneCycleLR is resized to fit)", self.budget,
                            1 / seconds_per_step, steps, fits, trainer.estimated_stepping_batches)
            return
        planned = config.scheduler.total_steps
        if fits >= planned:
            log.info("time budget %.0f s: %.2f steps/s over the first %d steps, the schedule's %d steps fit",
                     self.budget, 1 / seconds_per_step, steps, planned)
            return
        self.total_steps = max(fits, trainer.global_step + 1)
        config.scheduler = self._rebuilt(pl_module, config.scheduler, trainer.global_step)
        trainer.fit_loop.epoch_loop.max_steps = self.total_steps
        planned_text = ("an unbounded run" if planned >= PROVISIONAL_STEPS else
                        f"the schedule's {planned} steps ({planned * seconds_per_step:.0f} s) do not fit")
        log.warning("time budget %.0f s (trainer.max_time): %.2f steps/s over the first %d steps, %s; LR schedule "
                    "resized to total_steps=%d and training stops there", self.budget, 1 / seconds_per_step, steps,
                    planned_text, self.total_steps)

    def _rebuilt(self, pl_module: pl.LightningModule, old, step: int):
        """A scheduler like ``old`` over ``self.total_steps`` steps (from the module's ``scheduler_factory``, the
        config's partial), advanced so that the step Lightning takes after this hook brings it to ``step``."""
        factory = getattr(pl_module, "scheduler_factory", None)
        if factory is None:
            raise TypeError(f"cannot rebuild {type(old).__name__}: the module has no scheduler_factory")
        with warnings.catch_warnings():  # stepping a fresh scheduler to `step` without optimizer steps is intended
            warnings.simplefilter("ignore", UserWarning)
            scheduler = factory(old.optimizer, total_steps=self.total_steps)
            for _ in range(step - 1):
                scheduler.step()
        return scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "sized": self.sized, "elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps, self.sized = state_dict["total_steps"], state_dict["sized"]
        self._offset = float(state_dict["elapsed"])


class NonFiniteGuard(Callback):
    """Skips every optimizer step whose loss, network output or gradient is not finite; stops a run that diverged.

    Before each optimizer step it reads, in one host sync, the step's loss and log-probs (``pl_module.last_step``,
    a :class:`crnn.module.StepOutputs`) and the 2-norm of all gradients. The outputs matter because under
    ``zero_infinity`` a sample with NaN log-probs has loss 0 and zero gradient, so a network that already produces
    NaN would otherwise train on silently. A bad step's gradients are dropped (set to ``None``: the optimizer
    changes no weight, weight decay and momentum included) and the module's buffers (BatchNorm running statistics,
    which the forward pass already updated from the bad batch) are restored, so the batch leaves no trace; a
    warning is logged and ``train/nonfinite_batches`` (the count so far) goes up; ``max_in_a_row`` bad steps in a row
    raise :class:`crnn.errors.TrainingDiverged` naming the step, the last finite loss and the likely causes, and any
    validation of non-finite weights does too, so no such model is ever checkpointed. ``train/grad_norm`` (before
    clipping) is logged every step.

    Under ``16-mixed`` precision the gradient scaler owns inf/NaN gradients (it skips those steps and lowers its
    scale), so there only the loss and outputs are checked. Under data-parallel training a step is skipped on
    every process if it is bad on any.

    Args:
        max_in_a_row: consecutive non-finite steps that stop training.
    """

    def __init__(self, max_in_a_row: int = 5) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # non-finite steps in this run (restored on resume)
        self.in_a_row = 0
        self.last_finite: tuple[int, float] | None = None  # (step, train loss)
        self._buffers: list[torch.Tensor] = []  # the module's buffers before this step's forward pass

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._buffers = [buffer.detach().clone() for buffer in pl_module.buffers()]  # a few KB for BatchNorm

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        step = getattr(pl_module, "last_step", None)
        device = grad_norm.device
        loss = step.loss.float().to(device) if step is not None else torch.zeros((), device=device)
        # NaN or +inf (-inf is a log-prob of 0, which a confident network may produce)
        outputs_finite = (step.log_probs < math.inf).all().to(device) if step is not None else torch.tensor(True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        values = torch.stack([loss, outputs_finite.float().to(device), grad_norm.float()])
        loss_value, outputs_ok, norm = values.tolist()  # the one host sync
        problems = [what for what, bad in (("loss", not math.isfinite(loss_value)), ("outputs", not outputs_ok),
                                           ("gradients", scaler is None and not math.isfinite(norm))) if bad]
        if trainer.strategy.reduce_boolean_decision(bool(problems), all=False):
            self._skip(trainer, pl_module, optimizer, problems or ["values on another process"])
        else:
            self.in_a_row = 0
            self.last_finite = (trainer.global_step, loss_value)
        pl_module.log("train/grad_norm", norm)
        pl_module.log("train/nonfinite_batches", float(self.skipped))

    def _skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer, problems: list[str]) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(pl_module.buffers(), self._buffers):
                buffer.copy_(saved)
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite %s, batch skipped (%d non-finite so far, %d in a row of at most %d)",
                    trainer.global_step, " and ".join(problems), self.skipped, self.in_a_row, self.max_in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(f"training diverged: {self.in_a_row} steps in a row up to step "
                                   f"{trainer.global_step} had non-finite {' and '.join(problems)}; "
                                   f"{self._last_finite()}; {self.likely_causes(trainer)}")

    def _last_finite(self) -> str:
        if self.last_finite is None:
            return "no step had a finite loss"
        return f"last finite train/loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}"

    @staticmethod
    def likely_causes(trainer: pl.Trainer) -> str:
        """The usual remedies, with the run's learning rate, precision and clipping."""
        lr = learning_rate(trainer)
        causes = [f"a learning rate too high (lr {lr:.3g} at this step: lower optimizer.lr)"]
        if trainer.precision not in ("32-true", "64-true", "32", "64"):
            causes.append(f"reduced precision (trainer.precision={trainer.precision}: try 32-true or bf16-mixed)")
        if not trainer.gradient_clip_val:
            causes.append("no gradient clipping (set trainer.gradient_clip_val, e.g. 5)")
        return "likely causes: " + ", ".join(causes) + ", or broken input data"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        tensors = [*pl_module.named_parameters(), *pl_module.named_buffers()]
        bad = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            raise TrainingDiverged(f"training diverged: non-finite weights at step {trainer.global_step} "
                                   f"({', '.join(bad[:3]) or 'on another process'}); {self._last_finite()}; "
                                   f"{self.likely_causes(trainer)}")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.in_a_row = state_dict["skipped"], state_dict["in_a_row"]


class InterruptCheckpoint(Callback):
    """Saves the training state to ``path`` when Ctrl-C (SIGINT) or SIGTERM interrupts ``fit``, so that
    ``python train.py ... ckpt_path=<path>`` resumes from there.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the next batch boundary and Ctrl-C into a
    ``KeyboardInterrupt`` wherever it lands; both reach ``on_exception`` before Lightning tears the run down and
    exits (status 1). ``signal`` is then ``"SIGTERM"`` or ``"SIGINT"`` (``None`` before). A Ctrl-C inside an
    optimizer step may save that step half done; resuming redoes at most the interrupted step.

    Args:
        path: the checkpoint file, e.g. ``<run dir>/checkpoints/last.ckpt`` (the one resumes are made from).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.signal: str | None = None
        self.saved = False  # whether the interruption came during fit and its state was saved

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.signal = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"
        else:
            return
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            self.saved = True
            log.warning("%s at step %d: saved %s", self.signal, trainer.global_step, self.path)


class CTCDiagnostics(Callback):
    """Watches for CTC's most common failure, a network that outputs only blanks, and logs what shows it.

    Logs, every ``every_n_steps`` training steps, ``train/blank_share`` (valid frames whose most likely class is
    the blank) and ``train/target_blank_share`` (the blank's share of the alignment targets γ, what CTC pushes
    the frames towards: a network that trains well approaches it from above). Validation logs ``val/blank_share``
    and ``val/empty_share`` (lines read as empty) itself (:class:`crnn.module.CRNNModule`); ``train/infeasible``
    and ``train/grad_norm`` (:class:`NonFiniteGuard`) complete the picture.

    If every validation line is read as empty for ``patience`` validations in a row while ``val/loss`` moved by
    less than ``plateau`` (relative) over them, it warns once with the usual remedies.
    """

    def __init__(self, every_n_steps: int = 50, patience: int = 3, plateau: float = 0.05) -> None:
        self.every_n_steps = every_n_steps
        self.patience = patience
        self.plateau = plateau
        self._losses: list[float] = []  # val/loss of the validations in a row with only empty predictions
        self.warned = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = getattr(pl_module, "last_step", None)
        if step is None or not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        from crnn.module import blank_share  # the module imports this file

        blank = pl_module.charset.blank
        with torch.no_grad():
            gamma = ctc_alignment_targets(step.log_probs.float(), batch["targets"], step.lengths,
                                          batch["target_lengths"], blank)  # (T, B, C); 0 rows: infeasible/padding
            target_share = gamma[..., blank].sum() / gamma.sum().clamp_min(1e-12)
        pl_module.log("train/blank_share", blank_share(step.log_probs, step.lengths, blank))
        pl_module.log("train/target_blank_share", target_share)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.warned:
            return
        empty, loss = trainer.callback_metrics.get("val/empty_share"), trainer.callback_metrics.get("val/loss")
        if empty is None or loss is None or float(empty) < 1.0:
            self._losses = []
            return
        self._losses.append(float(loss))
        if len(self._losses) < self.patience:
            return
        first, last = self._losses[-self.patience], self._losses[-1]
        if abs(last - first) <= self.plateau * abs(first):
            self.warned = True
            log.warning("CTC collapse: every validation line has been read as empty for %d validations while "
                        "val/loss stayed at %.4g; usual remedies: a lower learning rate (optimizer.lr), more frames "
                        "per character (wider images or fewer width pools: see train/infeasible), a longer warm-up, "
                        "checking that labels match the images (data.charset, gt.txt)", len(self._losses), last)


class SkippedSamples(Callback):
    """Logs each sample the loader skipped while reading (``batch["skipped"]`` of
    :func:`data.batching.collate_lines`: an image that passed the setup check but failed to decode, under
    ``data.bad_input.unreadable_image=skip``) and logs their count as ``train/skipped_samples`` (val and test
    count theirs as ``val/skipped`` and ``test/skipped``, :meth:`crnn.module.CRNNModule._evaluate`)."""

    def __init__(self) -> None:
        self.counts = {"train": 0, "val": 0, "test": 0}

    def _note(self, stage: str, batch) -> None:
        for what in batch.get("skipped", ()):
            self.counts[stage] += 1
            log.warning("%s sample skipped (%d so far in %s): %s", stage, self.counts[stage], stage, what)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._note("train", batch)
        pl_module.log("train/skipped_samples", float(self.counts["train"]), reduce_fx="max")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._note("val", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._note("test", batch)


class LineProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bars when stdout is a terminal; elsewhere (a log file, a cluster job) one log line
    every ``line_every_n_steps`` training steps and one per validation, instead of carriage-return bars.

    Args:
        refresh_rate: tqdm's, batches between bar updates; 0 disables bars and lines.
        line_every_n_steps: training steps between two progress lines off a terminal.
        terminal: force one mode (``None``: ``sys.stdout.isatty()``).
    """

    def __init__(self, refresh_rate: int = 10, line_every_n_steps: int = 50, terminal: bool | None = None) -> None:
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        super().__init__(refresh_rate=refresh_rate if self.terminal else 0)
        self.lines = not self.terminal and refresh_rate > 0 and line_every_n_steps > 0
        self.line_every_n_steps = line_every_n_steps

    def _metrics_text(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        return " ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                        for name, value in metrics.items() if name != "v_num")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.lines and trainer.global_step % self.line_every_n_steps == 0:
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            log.info("epoch %d step %d/%s: %s", trainer.current_epoch, trainer.global_step, total,
                     self._metrics_text(trainer, pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.lines and not trainer.sanity_checking and trainer.state.fn == "fit":
            log.info("epoch %d step %d validated: %s", trainer.current_epoch, trainer.global_step,
                     self._metrics_text(trainer, pl_module))
