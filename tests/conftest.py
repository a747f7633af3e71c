"""Scaffolding shared by the tests: composing ``conf/train.yaml``, importing a script, random CTC batches.

Test modules import these helpers directly (``from conftest import compose_train``): pytest puts this folder
on ``sys.path`` (no ``__init__.py`` here, so the default ``prepend`` import mode applies).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ------------------------------------------------------------------------------------------------ configs
def compose_train(*overrides: str, output_dir: str | Path = "/tmp/unused", hydra: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, ``paths.output_dir`` set to ``output_dir`` (outside a
    Hydra run it has no value); ``hydra=True`` keeps the ``hydra`` node (sweeper params, sweep dir)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides], return_hydra_config=hydra)


def config_options(group: str) -> list[str]:
    """The options of a config group: the names of ``conf/<group>/*.yaml``, sorted."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ scripts
def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (to call its ``main(argv)`` in-process)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
