"""LightningModule tying a CRNN, a CTC loss, a decoder and text metrics together."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from crnn.callbacks import PROVISIONAL_STEPS, TimeBudgetSchedule
from crnn.decoding import Decoder, GreedyDecoder
from crnn.finetune import param_groups, per_group_max_lr, scale_learning_rates
from crnn.metrics import TextMetrics
from data.charset import Charset
from losses import CTCLoss, required_frames

log = logging.getLogger(__name__)


class InputFormat(NamedTuple):
    """Image channels (1 grey, 3 RGB) and height in px that a recogniser takes."""

    channels: int
    height: int


Batch = Mapping[str, torch.Tensor | list[str]]
"""``images`` (B, channels, H, W) float, ``widths`` (B,) int64, ``targets`` (B, S) int64 padded,
``target_lengths`` (B,) int64, ``texts`` list of B str (empty: every sample was skipped, see
:func:`data.batching.collate_lines`)."""


class StepOutputs(NamedTuple):
    """What the latest training step computed, detached, for callbacks (:class:`crnn.callbacks.NonFiniteGuard`,
    :class:`crnn.callbacks.CTCDiagnostics`): ``log_probs`` (T, B, C), ``lengths`` (B,) int64, ``loss`` scalar."""

    log_probs: torch.Tensor
    lengths: torch.Tensor
    loss: torch.Tensor


def blank_share(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """Share of the valid frames of ``log_probs (T, B, C)`` (``lengths (B,)``) whose most likely class is ``blank``:
    near 1 for a network collapsed to all-blank output."""
    frames = torch.arange(log_probs.shape[0], device=log_probs.device)[:, None] < lengths.to(log_probs.device)
    return ((log_probs.argmax(-1) == blank) & frames).sum() / frames.sum().clamp_min(1)


class CRNNModule(pl.LightningModule):
    """Trains a text-line recogniser with any CTC-style loss; validates/tests with a decoder and CER/accuracy.

    Everything inference needs (``charset``, ``blank``, ``height``, ``model``) is saved as hyper-parameters,
    so ``CRNNModule.load_from_checkpoint(path)`` rebuilds the network without Hydra configs.

    Args:
        charset: the characters in class order (see :class:`data.charset.Charset`).
        model: Hydra config (``_target_`` + kwargs) of the network; ``num_classes`` and ``height`` are
            filled in here. The network maps ``(images (B,1,H,W), widths (B,))`` to
            ``(log_probs (T,B,C), lengths (B,))``.
        blank: CTC blank class id.
        height: input image height in pixels.
        loss: module with :func:`torch.nn.functional.ctc_loss`'s forward signature; defaults to
            :class:`losses.CTCLoss` with ``zero_infinity=True``.
        decoder: a :class:`crnn.decoding.Decoder` (``decoder(log_probs, lengths, blank) -> Decoded``);
            defaults to :class:`crnn.decoding.GreedyDecoder`.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra ``_partial_``); needed to train.
        scheduler: optional ``scheduler(optimizer, ...) -> LRScheduler``; if it takes ``total_steps`` and
            none is given (e.g. ``OneCycleLR``), the run's length in scheduler steps is passed
            (``trainer.estimated_stepping_batches``, or ``trainer.max_epochs`` for a per-epoch schedule).
        scheduler_interval: ``"step"`` or ``"epoch"``: when the scheduler steps.
        num_logged_samples: validation lines whose prediction is logged as text each epoch while fitting
            (the first line of evenly spaced batches).
        protocol: how ``val/``/``test/`` metrics compare prediction and label: ``raw``, ``caseless`` or
            ``alnum36`` (see :mod:`crnn.metrics`); ``nfkc``: Unicode NFKC-normalise both first.

    Validation and test score every line of their sets, also lines the model cannot emit (a label character
    outside the charset, or a label needing more CTC frames than the image gives): ``{stage}/lines`` counts the
    lines and ``{stage}/unemittable`` those. ``{stage}/loss`` is the loss over the emittable lines only (a CTC
    loss is undefined for the others; a batch without any adds nothing).
    """

    def __init__(
        self,
        charset: str,
        model: Mapping,
        blank: int = 0,
        height: int = 32,
        loss: nn.Module | None = None,
        decoder: Decoder | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        scheduler_interval: str = "step",
        num_logged_samples: int = 4,
        protocol: str = "raw",
        nfkc: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "decoder", "optimizer", "scheduler"])
        self.charset = Charset(charset, blank=blank)
        self.model = instantiate(model, num_classes=self.charset.num_classes, height=height)
        self.loss = loss if loss is not None else CTCLoss(blank=blank, zero_infinity=True)
        self.decoder = decoder if decoder is not None else GreedyDecoder()
        if hasattr(self.decoder, "bind"):  # decoders with an LM, lexicon or allowed characters need the charset
            self.decoder.bind(self.charset)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.metrics = nn.ModuleDict({stage: TextMetrics(protocol, nfkc) for stage in ("val", "test")})
        self._samples: list[tuple[str, str]] = []
        self.last_step: StepOutputs | None = None
        # set by crnn.finetune.prepare_finetuning (freeze=, finetune.pretrained_lr_scale)
        self.frozen_parts: tuple[str, ...] = ()
        self.pretrained_lr_scale = 1.0

    def train(self, mode: bool = True) -> CRNNModule:
        """``nn.Module.train``, but the frozen parts of the network (``freeze=``) stay in eval mode: their
        batch-norm statistics stay the pretrained ones and their dropout stays off. Lightning switches modes
        with ``train()``/``eval()`` (or restores each submodule's captured mode), so this covers every switch."""
        super().train(mode)
        for part in self.frozen_parts:
            getattr(self.model, part).eval()
        return self

    @property
    def input_format(self) -> InputFormat:
        """The images the network takes: ``(channels, height)``, from the hyper-parameters (so also of a module
        rebuilt from a checkpoint). Networks without an ``in_channels`` argument take grey images."""
        return InputFormat(self.hparams.model.get("in_channels", 1), self.hparams.height)

    def forward(self, images: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs (T, B, C), lengths (B,) int64)`` of the network."""
        return self.model(images, widths)

    @torch.no_grad()
    def predict_texts(self, images: torch.Tensor, widths: torch.Tensor) -> list[str]:
        """Text of each image of a padded batch ``images (B, channels, H, W)``, ``widths (B,)``; call ``eval()``
        first."""
        return self.decode(*self(images, widths))

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Text of each line of ``log_probs (T, B, C)`` with ``lengths (B,)`` valid frames, by ``self.decoder``."""
        return [self.charset.decode(ids) for ids in self.decoder(log_probs, lengths, self.charset.blank).labels]

    def compute_loss(self, log_probs: torch.Tensor, lengths: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss in float32 with autocast off, whatever the trainer's precision."""
        with torch.autocast(self.device.type, enabled=False):
            return self.loss(log_probs.float(), batch["targets"], lengths, batch["target_lengths"])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if not batch["texts"]:  # every sample skipped: no step
            return None
        log_probs, lengths = self(batch["images"], batch["widths"])
        loss = self.compute_loss(log_probs, lengths, batch)
        self.last_step = StepOutputs(log_probs.detach(), lengths, loss.detach())
        needed = required_frames(batch["targets"], batch["target_lengths"])
        batch_size = len(batch["texts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/infeasible", (lengths < needed).sum().float(), on_step=False, on_epoch=True,
                 reduce_fx="sum", batch_size=batch_size, sync_dist=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, list[str]]:
        """Returns ``{"preds": texts}`` for callbacks (e.g. :class:`crnn.callbacks.PredictionWriter`)."""
        return {"preds": self._evaluate(batch, batch_idx, "test")}

    def emittable(self, lengths: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``(B,)`` bool: the lines the model can emit at all: every label character is in the charset (the
        targets of the others leave those characters out) and ``lengths`` (frames) suffice for the target."""
        known = set(self.charset.characters)
        in_charset = torch.tensor([set(text) <= known for text in batch["texts"]], device=lengths.device)
        needed = required_frames(batch["targets"], batch["target_lengths"]).to(lengths.device)
        return in_charset & (lengths >= needed)

    def _evaluate(self, batch: Batch, batch_idx: int, stage: str) -> list[str]:
        # images that failed to decode mid-epoch (unreadable_image=skip): not scored, so counted
        self.log(f"{stage}/skipped", float(len(batch.get("skipped", ()))), on_step=False, on_epoch=True,
                 reduce_fx="sum", sync_dist=True, batch_size=1)
        if not batch["texts"]:  # every sample skipped
            return []
        log_probs, lengths = self(batch["images"], batch["widths"])
        batch_size = len(batch["texts"])
        emittable = self.emittable(lengths, batch)
        for name, count in (("lines", float(len(emittable))), ("unemittable", (~emittable).sum().float())):
            self.log(f"{stage}/{name}", count, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True,
                     batch_size=1)  # summed over batches and processes
        scored = int(emittable.sum())  # the loss is over the lines the model can emit
        if scored == len(emittable):
            loss = self.compute_loss(log_probs, lengths, batch)
        elif scored:
            emitted = {key: batch[key][emittable] for key in ("targets", "target_lengths")}
            loss = self.compute_loss(log_probs[:, emittable], lengths[emittable], emitted)
        if scored:
            self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=scored, sync_dist=True)
        preds = self.decode(log_probs, lengths)
        # CTC health (crnn.callbacks.CTCDiagnostics): frames whose best class is the blank, lines read as empty
        self.log(f"{stage}/blank_share", blank_share(log_probs, lengths, self.charset.blank), batch_size=batch_size,
                 sync_dist=True)
        self.log(f"{stage}/empty_share", sum(not pred for pred in preds) / batch_size, batch_size=batch_size,
                 sync_dist=True)
        self.metrics[stage].update(preds, batch["texts"])
        if stage == "val" and batch_idx % self._sample_stride() == 0:
            self._samples.append((preds[0], batch["texts"][0]))
        return preds

    def _sample_stride(self) -> int:
        """Batches between two logged validation samples, so that they come from across the set (whose batches
        may go by image width)."""
        batches = self.trainer.num_val_batches[0] if self.trainer.num_val_batches else 1
        if not math.isfinite(batches):  # a loader without a length
            return 1
        return max(1, int(batches) // max(1, self.hparams.num_logged_samples))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and self._samples:
            self._log_samples()
        self._samples = []

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=stage == "val")

    def _log_samples(self) -> None:
        lines = [f"{pred!r} (target {target!r})" for pred, target in self._samples[: self.hparams.num_logged_samples]]
        if self.trainer.is_global_zero:
            log.info("val samples at step %d: %s", self.global_step, "; ".join(lines))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("val/samples", "  \n".join(lines), self.global_step)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("CRNNModule needs an optimizer factory to train")
        optimizer = self.optimizer_factory(param_groups(self, self.pretrained_lr_scale))
        scale_learning_rates(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        given = getattr(self.scheduler_factory, "keywords", {})
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters and "total_steps" not in given:
            kwargs["total_steps"] = self._schedule_length()
        # kept on the module: TimeBudgetSchedule rebuilds the scheduler from it
        self.scheduler_factory = per_group_max_lr(self.scheduler_factory, optimizer)
        scheduler = {"scheduler": self.scheduler_factory(optimizer, **kwargs),
                     "interval": self.hparams.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _schedule_length(self) -> int:
        """Scheduler steps in the whole run (``total_steps`` of e.g. OneCycleLR): optimizer steps with
        ``scheduler_interval="step"``, epochs with ``"epoch"``. A run bounded only by a time budget (a
        :class:`crnn.callbacks.TimeBudgetSchedule` with ``max_time``) gets a provisional length that the callback
        replaces once it has measured the step rate."""
        if self.hparams.scheduler_interval == "epoch":
            total = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else math.inf
        else:
            total = self.trainer.estimated_stepping_batches
        if math.isfinite(total):
            return int(total)
        budgets = [callback for callback in self.trainer.callbacks
                   if isinstance(callback, TimeBudgetSchedule) and callback.budget is not None]
        if budgets and self.hparams.scheduler_interval == "step":
            return PROVISIONAL_STEPS
        raise ValueError(f"the scheduler needs the run's length in {self.hparams.scheduler_interval}s, but the "
                         "trainer has no bound: set trainer.max_epochs (or +trainer.max_steps) or trainer.max_time, "
                         "give scheduler.total_steps, or pass scheduler=null")
