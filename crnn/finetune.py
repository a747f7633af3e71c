"""Fine-tuning: start a run from a checkpoint's weights (also with another charset), freeze parts, scale their rate.

``init_from=PATH.ckpt`` loads the network's weights only: the optimizer, LR schedule, epoch/step counters and
callbacks start fresh (``ckpt_path=`` instead resumes all of them). The checkpoint's charset may differ from the
data's: the classifier (the final ``Linear``, ``model.classifier``, one row of ``weight (C, H)`` and ``bias (C,)``
per class) keeps the rows of characters in both charsets and of the blank, moved to their new class ids; rows of
new characters keep the fresh module's initialisation, rows of characters that are gone are dropped. Every other
tensor must have the same shape in both networks.

``freeze=cnn`` (``rnn``, ``classifier`` or a list) stops training those parts: their parameters get no gradient
and are left out of the optimizer, and they stay in eval mode while training (batch-norm statistics fixed, no
dropout), see :meth:`crnn.module.CRNNModule.train`. ``finetune.pretrained_lr_scale`` puts every trained parameter
outside the classifier in a parameter group whose learning rate is scaled by that factor. The classifier counts
as new and keeps the full rate: after a charset change it holds fresh rows that share its tensors with the kept
ones (one rate per tensor), and even its kept rows must be re-balanced against the new classes in the softmax.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from crnn.checkpoints import read_checkpoint
from data.charset import Charset

if TYPE_CHECKING:
    from crnn.module import CRNNModule

log = logging.getLogger(__name__)

CLASSIFIER = "classifier"
"""Attribute of the network holding its final ``Linear`` (one output row per class)."""


@dataclass(frozen=True)
class CharsetTransfer:
    """How the classifier rows of a checkpoint's charset map onto a run's charset.

    ``kept``: characters in both (rows copied), ``new``: only in the run's (fresh rows), ``dropped``: only in the
    checkpoint's (rows discarded), each in the run's (``new``) or the checkpoint's (``dropped``) class order.
    ``rows`` maps each run class id whose row comes from the checkpoint to its checkpoint class id, the blank's
    included.
    """

    kept: str
    new: str
    dropped: str
    rows: dict[int, int]

    def summary(self, examples: int = 8) -> str:
        """One line: ``classifier rows: kept 10 ('0', ...), new 26 ('a', ...), dropped 0 characters``."""

        def some(chars: str) -> str:
            more = ", ..." if len(chars) > examples else ""
            return f" ({', '.join(map(repr, chars[:examples]))}{more})" if chars else ""

        return (f"classifier rows: kept {len(self.kept)}{some(self.kept)}, new {len(self.new)}{some(self.new)}, "
                f"dropped {len(self.dropped)}{some(self.dropped)} characters")


def charset_transfer(old: Charset, new: Charset) -> CharsetTransfer:
    """The row mapping from the checkpoint's charset ``old`` to the run's ``new`` (blank to blank, whatever the
    two blank ids are)."""
    old_chars = set(old.characters)
    new_chars = set(new.characters)
    kept = "".join(c for c in new.characters if c in old_chars)
    rows = {new.blank: old.blank} | {new.encode(c)[0]: old.encode(c)[0] for c in kept}
    return CharsetTransfer(kept=kept, new="".join(c for c in new.characters if c not in old_chars),
                           dropped="".join(c for c in old.characters if c not in new_chars), rows=rows)


def transfer_rows(pretrained: torch.Tensor, fresh: torch.Tensor, rows: Mapping[int, int]) -> torch.Tensor:
    """``fresh`` (``(C_new, ...)``) with row ``i`` replaced by ``pretrained[rows[i]]`` (``pretrained``
    ``(C_old, ...)``) for every ``i`` in ``rows``; a new tensor."""
    merged = fresh.detach().clone()
    if rows:
        new_ids, old_ids = map(list, zip(*rows.items()))
        merged[new_ids] = pretrained[old_ids].to(merged.dtype)
    return merged


def _load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, read by :func:`crnn.checkpoints.read_checkpoint` (``weights_only=True``: no
    pickled code runs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from={path}: no such file")
    return read_checkpoint(path)  # one error naming a damaged or foreign file


def _check_input_format(path: str | os.PathLike, hparams: Mapping, module: CRNNModule) -> None:
    """The checkpoint's network must read images like the run's: same height and channels."""
    height = hparams.get("height", 32)
    channels = hparams["model"].get("in_channels", 1)
    if height != module.input_format.height:
        raise ValueError(f"init_from={path}: the checkpoint's model reads images {height} px high, this run's "
                         f"{module.input_format.height} px (data.height); fine-tune at data.height={height}")
    if channels != module.input_format.channels:
        raise ValueError(f"init_from={path}: the checkpoint's model reads {channels}-channel images, this run's "
                         f"{module.input_format.channels}-channel ones (data.channels / model.in_channels)")


def _config_differences(old: Mapping, new: Mapping) -> str:
    """``"; model config differs: rnn_hidden 64 in the checkpoint, 32 here"`` (or "" if the configs agree)."""
    differing = [f"{key} {old.get(key)!r} in the checkpoint, {new.get(key)!r} here"
                 for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return f"; model config differs: {', '.join(differing)}" if differing else ""


def load_pretrained(module: CRNNModule, path: str | os.PathLike) -> CharsetTransfer:
    """Load the network weights of the checkpoint at ``path`` into ``module`` (a
    :class:`crnn.module.CRNNModule`), mapping classifier rows from the checkpoint's charset to the module's
    (:func:`charset_transfer`); nothing else of the checkpoint is used.

    Raises ``ValueError`` naming ``init_from`` when the checkpoint's image height or channels differ from the
    module's, or when a tensor other than the classifier's class dimension has another shape or is missing on
    one side (naming the parameter, both shapes and the differing model config keys). A model config that
    differs without changing any shape (e.g. other ``pools``) only logs a warning.
    """
    checkpoint = _load_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    _check_input_format(path, hparams, module)
    prefix = "model."
    pretrained = {key.removeprefix(prefix): value for key, value in checkpoint["state_dict"].items()
                  if key.startswith(prefix)}
    fresh = module.model.state_dict()
    differences = _config_differences(hparams["model"], module.hparams.model)
    missing, unexpected = sorted(set(fresh) - set(pretrained)), sorted(set(pretrained) - set(fresh))
    if missing or unexpected:
        raise ValueError(f"init_from={path}: the checkpoint's network has other parameters than this run's model "
                         f"(missing from the checkpoint: {missing[:4]}, not in the model: {unexpected[:4]})"
                         f"{differences}")
    classifier = getattr(module.model, CLASSIFIER, None)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"init_from needs a network whose final Linear is its `{CLASSIFIER}` attribute")
    rows_of = {f"{CLASSIFIER}.{name}" for name, _ in classifier.named_parameters()}
    for key, tensor in fresh.items():
        old_shape, new_shape = tuple(pretrained[key].shape), tuple(tensor.shape)
        free = 1 if key in rows_of else 0  # the classifier's class dimension may differ
        if old_shape[free:] != new_shape[free:]:
            raise ValueError(f"init_from={path}: parameter model.{key} has shape {old_shape} in the checkpoint but "
                             f"{new_shape} in this run's model{differences}")
    old_charset = Charset(hparams["charset"], blank=hparams.get("blank", 0))
    if pretrained[f"{CLASSIFIER}.weight"].shape[0] != old_charset.num_classes:
        raise ValueError(f"init_from={path}: the checkpoint's classifier has "
                         f"{pretrained[f'{CLASSIFIER}.weight'].shape[0]} rows for {old_charset.num_classes} classes")
    if differences:  # e.g. other pools: the same tensors, another network
        log.warning("init_from=%s: the weights fit this run's model, but its config is not the checkpoint's%s",
                    path, differences)
    transfer = charset_transfer(old_charset, module.charset)
    merged = {key: transfer_rows(pretrained[key], fresh[key], transfer.rows) if key in rows_of else pretrained[key]
              for key in fresh}
    module.model.load_state_dict(merged)
    return transfer


def trainable_parts(model: nn.Module) -> list[str]:
    """Names of the network's direct children that hold parameters (the CRNN's ``cnn``, ``rnn``, ``classifier``):
    what ``freeze=`` accepts."""
    return [name for name, child in model.named_children() if next(child.parameters(), None) is not None]


def parse_parts(model: nn.Module, parts: str | Iterable[str] | None) -> tuple[str, ...]:
    """``freeze``'s value (``None``, ``"cnn"``, ``["cnn", "rnn"]``) as a tuple of part names; an unknown name is an
    error that lists the known ones."""
    if parts is None:
        return ()
    names = (parts,) if isinstance(parts, str) else tuple(parts)
    known = trainable_parts(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"freeze={list(names)}: unknown part(s) {unknown}; the model's parts are {known}")
    if set(names) == set(known):
        raise ValueError(f"freeze={list(names)} freezes every part of the model: nothing would be trained")
    return names


def freeze(module: CRNNModule, parts: Sequence[str]) -> None:
    """Stop training ``parts`` of ``module.model``: no gradients, left out of the optimizer
    (:func:`param_groups`), kept in eval mode while training (``module.frozen_parts``, read by
    :meth:`crnn.module.CRNNModule.train`)."""
    for part in parts:
        getattr(module.model, part).requires_grad_(False)
    module.frozen_parts = tuple(parts)
    module.train(module.training)  # frozen parts to eval mode now, not only at the next train()


def param_groups(module: nn.Module, pretrained_lr_scale: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups: the trained (``requires_grad``) parameters of ``module`` (a
    :class:`crnn.module.CRNNModule`) in one group, or, with ``pretrained_lr_scale != 1``, in a group
    ``"pretrained"`` (all but the classifier) with ``lr_scale=pretrained_lr_scale`` and a group ``"classifier"``
    with ``lr_scale=1`` (empty groups left out). ``lr_scale`` multiplies the optimizer's learning rate
    (:func:`scale_learning_rates`); ``name`` names the group in the learning-rate monitor's logs."""
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if pretrained_lr_scale == 1.0:
        return [{"params": [p for _, p in trained]}]
    head = f"model.{CLASSIFIER}."
    groups = [{"name": "pretrained", "lr_scale": pretrained_lr_scale,
               "params": [p for name, p in trained if not name.startswith(head)]},
              {"name": CLASSIFIER, "lr_scale": 1.0, "params": [p for name, p in trained if name.startswith(head)]}]
    return [group for group in groups if group["params"]]


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each parameter group's ``lr`` by its ``lr_scale`` (call before a scheduler is built, which takes
    the groups' rates as their initial ones)."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)


def per_group_max_lr(factory: Callable, optimizer: torch.optim.Optimizer) -> Callable:
    """``factory`` (a scheduler ``functools.partial``) with a scalar ``max_lr`` (OneCycleLR, as in the default
    ``scheduler.max_lr: ${optimizer.lr}``) turned into one value per parameter group, scaled by the group's
    ``lr_scale``: OneCycleLR sets every group's rate from ``max_lr``, so a scalar would undo the scaling. Unchanged
    if every scale is 1 or ``max_lr`` is not a given number."""
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    max_lr = getattr(factory, "keywords", {}).get("max_lr")
    if all(scale == 1.0 for scale in scales) or not isinstance(max_lr, (int, float)):
        return factory
    return functools.partial(factory, max_lr=[max_lr * scale for scale in scales])


def prepare_finetuning(module: CRNNModule, cfg: DictConfig) -> None:
    """Apply the run config's fine-tuning keys to a freshly built ``module``: ``init_from`` (load weights,
    :func:`load_pretrained`, logging the charset transfer), ``freeze`` (:func:`freeze`) and
    ``finetune.pretrained_lr_scale`` (kept as ``module.pretrained_lr_scale`` for its optimizer,
    :func:`param_groups`). ``init_from`` with ``ckpt_path`` is an error (resuming restores the weights anyway);
    ``freeze``/``pretrained_lr_scale`` without either is one too (nothing pretrained)."""
    init_from, resume = cfg.get("init_from"), cfg.get("ckpt_path")
    parts = cfg.get("freeze")
    parts = parse_parts(module.model, list(parts) if isinstance(parts, ListConfig) else parts)
    scale = float(cfg.get("finetune", {}).get("pretrained_lr_scale", 1.0))
    if init_from and resume:
        raise ValueError(f"init_from={init_from} and ckpt_path={resume}: pass one; ckpt_path resumes a run (its "
                         "weights included), so to resume a fine-tuning run drop init_from and keep freeze/finetune.*")
    if (parts or scale != 1.0) and not (init_from or resume):
        raise ValueError(f"freeze={list(parts)} / finetune.pretrained_lr_scale={scale} need pretrained weights: "
                         "set init_from=PATH.ckpt (or ckpt_path= to resume a fine-tuning run)")
    if not scale > 0:
        raise ValueError(f"finetune.pretrained_lr_scale must be > 0, got {scale} (use freeze= to stop training a part)")
    if init_from:
        transfer = load_pretrained(module, init_from)
        blank = f"blank {transfer.rows[module.charset.blank]} -> {module.charset.blank}"
        log.info("init_from=%s: weights loaded (fresh optimizer and schedule); %s; %s", init_from,
                 transfer.summary(), blank)
    if parts:
        freeze(module, parts)
        log.info("freeze=%s: %d parameters frozen, in eval mode while training (the modules Lightning reports "
                 "in eval mode)", list(parts),
                 sum(p.numel() for p in module.model.parameters() if not p.requires_grad))
    module.pretrained_lr_scale = scale
