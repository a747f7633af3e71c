"""Build everything a training run needs from a composed Hydra config, train, test, report."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import NoReturn

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, Timer
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

from crnn.callbacks import InterruptCheckpoint, NonFiniteGuard, TimeBudgetSchedule
from crnn.config_check import check_config
from crnn.errors import ConfigError, RunFailed, TrainingDiverged
from crnn.checkpoints import check_resumable, read_checkpoint
from crnn.finetune import prepare_finetuning
from crnn.module import CRNNModule

log = logging.getLogger(__name__)

COUNTS = ("/lines", "/unemittable", "/skipped")
"""Suffixes of the logged metrics that are line counts (ints in ``final_metrics.json``)."""


NOISE_WARNINGS = (  # third-party warnings every run printed, about library internals the user cannot act on
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of a torch API it still calls
)
NOISE_INFO = ("💡 Tip:", "TPU available:", "HPU available:")  # Lightning's adverts and hardware we never use


class _DropNoise(logging.Filter):
    """Drops Lightning's log lines that start with one of :data:`NOISE_INFO`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(NOISE_INFO)


def quiet_third_party() -> None:
    """Filter the third-party deprecation warnings and tips that every run printed (:data:`NOISE_WARNINGS`,
    :data:`NOISE_INFO`); idempotent. Warnings about this project's own use of a library still show."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropNoise) for existing in logger.filters):
            logger.addFilter(_DropNoise())


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a name -> config mapping (``callbacks``, ``logger``);
    entries set to ``null`` are skipped."""
    if not cfg:
        return []
    return [instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> CRNNModule:
    """The :class:`CRNNModule` of ``cfg.model``/``loss``/``decoder``/``optimizer``/``scheduler``/``module``,
    sized for ``datamodule.charset`` (classes and blank) and ``cfg.data.height``."""
    charset = datamodule.charset
    return CRNNModule(
        charset=charset.characters,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        blank=charset.blank,
        height=cfg.data.height,
        loss=instantiate(cfg.loss, blank=charset.blank),
        decoder=instantiate(cfg.decoder),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        **cfg.get("module", {}),
    )


def stop_reason(trainer: pl.Trainer) -> str:
    """Why ``trainer.fit`` ended: ``"fast_dev_run"``, ``"interrupted"``, ``"time_budget"`` (the end of a schedule
    that :class:`crnn.callbacks.TimeBudgetSchedule` sized to ``trainer.max_time``), ``"max_time"`` (the ``Timer``
    ran out), ``"max_steps"``, ``"max_epochs"``, or else ``"early_stopping"`` (``"callback"`` without an
    EarlyStopping; :func:`stop_detail` says which rule fired)."""
    if trainer.fast_dev_run:
        return "fast_dev_run"
    if trainer.interrupted:
        return "interrupted"
    budgets = [callback for callback in trainer.callbacks if isinstance(callback, TimeBudgetSchedule)]
    if any(budget.total_steps is not None and trainer.global_step >= budget.total_steps for budget in budgets):
        return "time_budget"
    timers = [callback for callback in trainer.callbacks if isinstance(callback, Timer)]
    if any(timer.time_remaining() is not None and timer.time_remaining() <= 0 for timer in timers):
        return "max_time"
    if 0 <= trainer.max_steps <= trainer.global_step:
        return "max_steps"
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        return "max_epochs"
    return "early_stopping" if trainer.early_stopping_callbacks else "callback"


def stop_detail(trainer: pl.Trainer) -> str:
    """Which rule of the early-stopping callback stopped ``fit``, e.g. ``val/cer < 0.003`` or ``no val/cer
    improvement in 5 validations (best 0.0123)``; "" if none stopped it."""
    for callback in trainer.early_stopping_callbacks:
        monitor, order = callback.monitor, callback.order_dict[callback.mode]
        detail = {
            EarlyStoppingReason.STOPPING_THRESHOLD: f"{monitor} {order} {callback.stopping_threshold}",
            EarlyStoppingReason.DIVERGENCE_THRESHOLD: f"{monitor} beyond {callback.divergence_threshold}",
            EarlyStoppingReason.NON_FINITE_METRIC: f"{monitor} is not finite",
            EarlyStoppingReason.PATIENCE_EXHAUSTED: f"no {monitor} improvement in {callback.patience} validations "
                                                    f"(best {float(callback.best_score):.4f})",
        }.get(callback.stopping_reason)
        if detail:
            return detail
    return ""


def train(cfg: DictConfig) -> dict[str, float | int | str]:
    """Check the config, seed, fit (resuming from ``cfg.ckpt_path`` if set), then validate and test the best
    checkpoint (the last weights if none was saved).

    Returns the metrics also written to ``<paths.output_dir>/final_metrics.json``: ``val/cer``,
    ``val/acc``, ``test/cer``, ``test/acc`` (float, under ``protocol``), ``val/lines``, ``test/lines`` (every line
    scored), ``val/unemittable``, ``test/unemittable`` (those the model cannot emit), ``val/skipped``,
    ``test/skipped`` (images that failed to decode mid-run under ``unreadable_image=skip``: not scored), ``protocol`` (of the
    metrics, :attr:`crnn.metrics.TextMetrics.protocol_name`), ``train_seconds`` (fit wall time), ``epochs``,
    ``steps``, ``nonfinite_batches`` (int), ``stop_reason`` (:func:`stop_reason`) and ``best_checkpoint`` (path,
    "" if none), plus any other ``val/*``/``test/*`` logged. A run cut short by ``trainer.max_time`` logs a
    warning. With ``trainer.overfit_batches=N`` the datamodule serves the same ``N`` batches' lines every epoch.

    Raises :class:`crnn.errors.RunFailed` (one line, no traceback under ``train.py``, exit status 1): a
    :class:`~crnn.errors.ConfigError` before any work; a :class:`~crnn.errors.CheckpointError` for a ``ckpt_path``
    that cannot be read or resumed; and, with ``final_metrics.json`` written first with a ``failure`` message,
    when training diverged (``stop_reason: diverged``), was interrupted by Ctrl-C or SIGTERM (``interrupted``;
    ``checkpoints/last.ckpt`` saved to resume from) or left no usable model (val CER >= ``cfg.max_usable_cer``;
    in a sweep this one is only recorded, as ``failure`` in the returned and written metrics, and the sweep goes on).
    """
    check_config(cfg)
    quiet_third_party()
    ckpt_path = cfg.get("ckpt_path")
    resume = read_checkpoint(ckpt_path) if ckpt_path else None
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    overfit_batches = cfg.trainer.get("overfit_batches", 0)
    if overfit_batches:
        if not isinstance(overfit_batches, int):
            raise ValueError(f"trainer.overfit_batches must be a whole number of batches, got {overfit_batches}")
        datamodule.overfit(overfit_batches)
    module = build_module(cfg, datamodule)
    if resume is not None:
        check_resumable(resume, module, ckpt_path)
        del resume
    try:
        prepare_finetuning(module, cfg)  # init_from=, freeze=, finetune.*
    except (ValueError, FileNotFoundError) as err:  # its messages name the key: one line, like the config checks
        raise ConfigError(str(err)) from err
    callbacks, loggers = instantiate_dict(cfg.get("callbacks")), instantiate_dict(cfg.get("logger"))
    if not loggers and any(isinstance(callback, LearningRateMonitor) for callback in callbacks):
        log.info("no logger: the learning-rate monitor is left out")
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    done = fit(trainer, module, datamodule, ckpt_path, output_dir)
    if done["stop_reason"] == "max_time":
        log.warning("training stopped by trainer.max_time=%s after %d steps (%d of at most %d epochs), before its "
                    "schedule ended; set trainer.max_time=null (or longer) to train fully",
                    cfg.trainer.get("max_time"), trainer.global_step, trainer.current_epoch, trainer.max_epochs)
    metrics = evaluate_best(trainer, module, datamodule, output_dir, done)
    failure = unusable(metrics, cfg.get("max_usable_cer", 1.0)) if not trainer.fast_dev_run else ""
    if failure:
        if not in_multirun():
            fail(output_dir, metrics, RunFailed(failure))
        log.warning("%s (recorded, not raised: in a sweep a useless run is a result too)", failure)
        metrics["failure"] = failure
    write_metrics(output_dir, metrics)
    return metrics


def fit(trainer: pl.Trainer, module: CRNNModule, datamodule: pl.LightningDataModule, ckpt_path: str | None,
        output_dir: Path) -> dict[str, float | int | str]:
    """``trainer.fit``; returns ``train_seconds``, ``epochs``, ``steps``, ``nonfinite_batches``, ``stop_reason``
    and ``stop_detail``. A run that diverged or was interrupted writes them to ``final_metrics.json`` with its
    ``failure`` and raises :class:`RunFailed` (:class:`TrainingDiverged` for the former)."""
    start = time.perf_counter()

    def fitted(reason: str) -> dict[str, float | int | str]:
        guards = [callback for callback in trainer.callbacks if isinstance(callback, NonFiniteGuard)]
        return {"train_seconds": round(time.perf_counter() - start, 2), "epochs": trainer.current_epoch,
                "steps": trainer.global_step, "nonfinite_batches": sum(guard.skipped for guard in guards),
                "stop_reason": reason, "stop_detail": stop_detail(trainer) if reason != "diverged" else ""}

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingDiverged as err:
        fail(output_dir, {**fitted("diverged"), "best_checkpoint": ""}, err)
    except SystemExit:  # Lightning exits so after Ctrl-C or SIGTERM, once InterruptCheckpoint has saved
        if not trainer.interrupted:
            raise
        fail(output_dir, {**fitted("interrupted"), "best_checkpoint": ""}, RunFailed(interrupted_message(trainer)))
    return fitted(stop_reason(trainer))


def evaluate_best(trainer: pl.Trainer, module: CRNNModule, datamodule: pl.LightningDataModule, output_dir: Path,
              done: dict[str, float | int | str]) -> dict[str, float | int | str]:
    """Validate and test the best checkpoint (the current weights if none was saved); returns their metrics with
    ``done`` (:func:`fit`'s) and ``best_checkpoint``. Interrupted, it fails like :func:`fit`."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("no best checkpoint was saved; validating and testing the current weights")
    metrics: dict[str, float | int | str] = {}
    try:
        for run in (trainer.validate, trainer.test):
            results = run(module, datamodule=datamodule, ckpt_path=best or None)[0]
            metrics.update({name: int(value) if name.endswith(COUNTS) else float(value)
                            for name, value in results.items()})
    except SystemExit:  # Ctrl-C or SIGTERM while testing: the training is done, the result is not
        if not trainer.interrupted:
            raise
        fail(output_dir, {**done, "stop_reason": "interrupted", "best_checkpoint": best},
             RunFailed(interrupted_message(trainer)))
    return {**metrics, **done, "best_checkpoint": best, "protocol": module.metrics["test"].protocol_name}


def unusable(metrics: dict[str, float | int | str], max_usable_cer: float | None) -> str:
    """Why the tested model is of no use (its ``val/cer`` is ``max_usable_cer`` or more, or NaN), or "" if it is
    (or the rule is off, ``None``). 1.0 is the CER of reading nothing, which a network stuck at all-blank output
    reads exactly."""
    if max_usable_cer is None or metrics["val/cer"] < max_usable_cer:
        return ""
    best = metrics["best_checkpoint"]
    return (f"no usable model: the {'best checkpoint reads' if best else 'final weights read'} "
            f"val/cer={metrics['val/cer']:.4f} >= max_usable_cer={max_usable_cer}"
            f"{' (nothing read right, e.g. only blanks)' if max_usable_cer >= 1 else ''} after {metrics['steps']} "
            f"steps, stop={metrics['stop_reason']}; train longer "
            f"(trainer.max_time=null, more epochs) or see val/blank_share and the CTC diagnostics")


def in_multirun() -> bool:
    """Whether this is one job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_metrics(output_dir: Path, metrics: dict[str, float | int | str]) -> None:
    """``<output_dir>/final_metrics.json``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def fail(output_dir: Path, metrics: dict[str, float | int | str], error: RunFailed) -> NoReturn:
    """Write ``metrics`` with ``failure: <the error's message>`` to ``final_metrics.json``, then raise ``error``."""
    write_metrics(output_dir, {**metrics, "failure": str(error)})
    raise error


def interrupted_message(trainer: pl.Trainer) -> str:
    """What interrupted ``fit`` and how to resume, from the :class:`InterruptCheckpoint` callback."""
    saver = next((callback for callback in trainer.callbacks if isinstance(callback, InterruptCheckpoint)), None)
    if saver is None or saver.signal is None:
        return (f"interrupted at step {trainer.global_step}; no checkpoint saved at the interruption "
                "(callbacks.interrupt_checkpoint is off): resume from the last validation's checkpoints/last.ckpt")
    if not saver.saved:  # after fit: validating or testing the trained model
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        return (f"interrupted by {saver.signal} while validating/testing after training ({trainer.global_step} "
                f"steps); the trained model is in {best or saver.path.parent}: test it with scripts/evaluate.py")
    return (f"interrupted by {saver.signal} at step {trainer.global_step}; saved {saver.path}: resume with the same "
            f"overrides plus ckpt_path={saver.path}")


def summary_line(metrics: dict[str, float | int | str]) -> str:
    """One line with the headline numbers of :func:`train`'s result."""
    return (
        f"val/cer={metrics['val/cer']:.4f} val/acc={metrics['val/acc']:.4f} "
        f"test/cer={metrics['test/cer']:.4f} test/acc={metrics['test/acc']:.4f} "
        f"test/lines={metrics['test/lines']} test/unemittable={metrics['test/unemittable']} "
        f"{'test/skipped=' + str(metrics['test/skipped']) + ' ' if metrics.get('test/skipped') else ''}"
        f"protocol={metrics['protocol']} "
        f"epochs={metrics['epochs']} steps={metrics['steps']} train_seconds={metrics['train_seconds']:.1f} "
        f"stop={metrics['stop_reason']}{' (' + metrics['stop_detail'] + ')' if metrics.get('stop_detail') else ''} "
        f"best_checkpoint={metrics['best_checkpoint'] or '-'}"
    )


def report(line: str) -> None:
    """Print ``line`` and write it to the run's log files (Hydra's ``train.log``) too, without the console
    handler repeating it."""
    print(line)
    record = logging.LogRecord(log.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def remove_unstarted_run(output_dir: str) -> None:
    """Delete the run directory Hydra made for a run that stopped before any work, if it holds nothing but
    Hydra's config copy (``.hydra``) and ``train.log`` (a directory resumed into keeps its checkpoints, logs...)."""
    path = Path(output_dir)
    if path.is_dir() and {entry.name for entry in path.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(path)
        log.info("removed the run directory %s of a run that never started", path)
