"""Build everything a training run needs from a composed Hydra config, train, test, report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, Timer
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

from crnn.callbacks import TimeBudgetSchedule
from crnn.finetune import prepare_finetuning
from crnn.module import CRNNModule

log = logging.getLogger(__name__)


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
    """Seed, fit (resuming from ``cfg.ckpt_path`` if set), then validate and test the best checkpoint (the
    last weights if none was saved).

    Returns the metrics also written to ``<paths.output_dir>/final_metrics.json``: ``val/cer``,
    ``val/acc``, ``test/cer``, ``test/acc`` (float), ``train_seconds`` (fit wall time), ``epochs``,
    ``steps`` (int), ``stop_reason`` (:func:`stop_reason`) and ``best_checkpoint`` (path, "" if none), plus any
    other ``val/*``/``test/*`` logged. A run cut short by ``trainer.max_time`` logs a warning. With
    ``trainer.overfit_batches=N`` the datamodule serves the same ``N`` batches' lines every epoch.
    """
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    overfit_batches = cfg.trainer.get("overfit_batches", 0)
    if overfit_batches:
        if not isinstance(overfit_batches, int):
            raise ValueError(f"trainer.overfit_batches must be a whole number of batches, got {overfit_batches}")
        datamodule.overfit(overfit_batches)
    module = build_module(cfg, datamodule)
    prepare_finetuning(module, cfg)  # init_from=, freeze=, finetune.*
    callbacks, loggers = instantiate_dict(cfg.get("callbacks")), instantiate_dict(cfg.get("logger"))
    if not loggers and any(isinstance(callback, LearningRateMonitor) for callback in callbacks):
        log.info("no logger: the learning-rate monitor is left out")
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fitted = {"train_seconds": round(time.perf_counter() - start, 2), "epochs": trainer.current_epoch,
              "steps": trainer.global_step, "stop_reason": stop_reason(trainer), "stop_detail": stop_detail(trainer)}
    if fitted["stop_reason"] == "max_time":
        log.warning("training stopped by trainer.max_time=%s after %d steps (%d of at most %d epochs), before its "
                    "schedule ended; set trainer.max_time=null (or longer) to train fully",
                    cfg.trainer.get("max_time"), trainer.global_step, trainer.current_epoch, trainer.max_epochs)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("no best checkpoint was saved; validating and testing the current weights")
    metrics: dict[str, float | int | str] = {}
    for run in (trainer.validate, trainer.test):
        metrics.update({k: float(v) for k, v in run(module, datamodule=datamodule, ckpt_path=best or None)[0].items()})
    metrics.update(fitted, best_checkpoint=best)

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary_line(metrics: dict[str, float | int | str]) -> str:
    """One line with the headline numbers of :func:`train`'s result."""
    return (
        f"val/cer={metrics['val/cer']:.4f} val/acc={metrics['val/acc']:.4f} "
        f"test/cer={metrics['test/cer']:.4f} test/acc={metrics['test/acc']:.4f} "
        f"epochs={metrics['epochs']} steps={metrics['steps']} train_seconds={metrics['train_seconds']:.1f} "
        f"stop={metrics['stop_reason']}{' (' + metrics['stop_detail'] + ')' if metrics.get('stop_detail') else ''} "
        f"best_checkpoint={metrics['best_checkpoint'] or '-'}"
    )
