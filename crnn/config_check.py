"""Checks of a composed training config before any work: one :class:`crnn.errors.ConfigError` naming every bad
key and its value, instead of a traceback from deep inside the data pipeline or ``Trainer.fit``."""

from __future__ import annotations

import numbers
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from crnn.errors import ConfigError

DATA_DIRS = ("train_dir", "val_dir", "test_dir")


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem found in ``cfg``, each ``key=value: what is wrong``; empty if it can start a run."""
    problems: list[str] = []
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}

    def value(node, key: str):
        return node.get(key) if node is not None and key in node and not OmegaConf.is_missing(node, key) else None

    batch_size = value(data, "batch_size")
    if not (_whole(batch_size) and batch_size > 0):
        problems.append(f"data.batch_size={batch_size}: must be a positive whole number")
    height = value(data, "height")
    if not (_whole(height) and height > 0):
        problems.append(f"data.height={height}: must be a positive whole number of pixels")
    workers = value(data, "num_workers")
    if workers is not None and not (_whole(workers) and workers >= 0):
        problems.append(f"data.num_workers={workers}: must be a whole number >= 0")
    optimizer = cfg.get("optimizer")
    lr = value(optimizer, "lr")
    if optimizer is not None and "lr" in optimizer and not (_number(lr) and lr > 0):
        problems.append(f"optimizer.lr={lr}: must be a positive number")
    for key, least in (("max_epochs", -1), ("min_epochs", 0), ("max_steps", -1), ("min_steps", 0)):
        given = value(trainer, key)
        if given is not None and not (_whole(given) and given >= least):
            problems.append(f"trainer.{key}={given}: must be a whole number >= {least} (or null)")
    clip = value(trainer, "gradient_clip_val")
    if clip is not None and not (_number(clip) and clip > 0):
        problems.append(f"trainer.gradient_clip_val={clip}: must be a positive number (or null)")

    missing = [f"data.{key}" for key in DATA_DIRS if key in data.keys() and OmegaConf.is_missing(data, key)]
    if missing:
        problems.append(f"{', '.join(missing)} not set: data={cfg_choice(cfg, 'data')} needs a directory for each "
                        f"split (e.g. data.train_dir=/path/to/train)")
    absent = [f"data.{key}={value(data, key)}" for key in DATA_DIRS
              if value(data, key) is not None and not Path(str(value(data, key))).is_dir()]
    if absent:
        problems.append(f"{', '.join(absent)}: no such director{'y' if len(absent) == 1 else 'ies'}")
    if not problems and "model" in cfg:
        problems += model_problems(cfg)
    for key in ("ckpt_path", "init_from"):
        path = cfg.get(key)
        if path is not None and not Path(str(path)).is_file():
            problems.append(f"{key}={path}: no such file")
    return problems


def cfg_choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (``data=folder``), or ``?`` outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group, "?")
    except ValueError:
        return "?"


def model_problems(cfg: DictConfig) -> list[str]:
    """Whether the network of ``cfg.model`` can be built for ``cfg.data.height`` (e.g. its pools must reduce the
    height to 1 row): builds it, with two classes, on the CPU."""
    try:
        instantiate(OmegaConf.to_container(cfg.model, resolve=True), num_classes=2, height=cfg.data.height)
    except InstantiationException as err:  # Hydra's wrapper around the network's own ValueError
        return [f"data.height={cfg.data.height} does not fit model={cfg_choice(cfg, 'model')}: "
                f"{err.__cause__ or err}"]
    return []


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`crnn.errors.ConfigError` listing every problem of :func:`config_problems`, if any."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("config error: " + "; ".join(problems))
