"""Scaffolding shared by the tests: composing ``conf/train.yaml``, importing a script, random CTC batches.

Test modules import these helpers directly (``from conftest import compose_train``): pytest puts this folder
on ``sys.path`` (no ``__init__.py`` here, so the default ``prepend`` import mode applies).
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from pathlib import Path
from types import ModuleType

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import brute_force

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ------------------------------------------------------------------------------------------------ configs
def compose_train(*overrides: str, output_dir: str | Path = "/tmp/unused", hydra: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, ``paths.output_dir`` set to ``output_dir`` (outside a
    Hydra run it has no value); ``hydra=True`` keeps the ``hydra`` node (sweeper params, sweep dir).

    ``max_usable_cer=null`` (an override wins): the tests' runs of a few steps learn nothing, which a real run
    reports as a failure (tests/test_guard.py tests that rule)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", "max_usable_cer=null", *overrides],
                       return_hydra_config=hydra)


def config_options(group: str) -> list[str]:
    """The options of a config group: the names of ``conf/<group>/*.yaml``, sorted."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def text_large_overrides(folder: Path) -> list[str]:
    """What ``data=text_large`` needs on top of the defaults: a character file of 2000 CJK characters (written
    to ``folder``) and a CJK font (Debian's ``fonts-wqy-microhei``, which ``.ci/run`` installs; skip without it)."""
    import pytest

    wqy = Path("/usr/share/fonts/truetype/wqy")
    if not wqy.is_dir():
        pytest.skip("data=text_large needs a CJK font: apt-get install fonts-wqy-microhei")
    characters = Path(folder) / "cjk_characters.txt"
    characters.write_text("\n".join(map(chr, range(0x4E00, 0x4E00 + 2000))), encoding="utf-8")
    return [f"data.charset_file={characters}", f"data.fonts=[{wqy}]"]


# ------------------------------------------------------------------------------------------------ scripts
def load_script(name: str) -> ModuleType:
    """The tool ``scripts/<name>.py`` as the module ``scripts.<name>`` (to call its ``main(argv)`` in-process)."""
    return importlib.import_module(f"scripts.{name}")


# ------------------------------------------------------------------------------------------------ CTC batches
Range = int | tuple[int, int]


@dataclasses.dataclass
class Batch:
    """A CTC batch as labels plus logits, handing out ``F.ctc_loss``'s arguments in every target format.

    ``logits`` ``(T, B, C)`` are unnormalised (``log_probs`` is their ``log_softmax``) unless ``normalised``:
    then they are used as log-probs as they are (e.g. integer log-probs, for exact ties).
    """

    logits: torch.Tensor
    labels: list[list[int]]
    input_lengths: list[int]
    blank: int
    pad_extra: int = 1  # padding slots beyond the longest target, in padded()
    normalised: bool = False

    @property
    def log_probs(self) -> torch.Tensor:
        return self.logits if self.normalised else self.logits.log_softmax(-1)

    @property
    def target_lengths(self) -> list[int]:
        return [len(row) for row in self.labels]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    def padded(self) -> torch.Tensor:
        """``(B, S)`` labels, ``S = max(target_lengths) + pad_extra``; past each row's length junk that cycles
        through every class id, the blank included (so code that reads padding shows up)."""
        width = max(self.target_lengths, default=0) + self.pad_extra
        rows = [row + [(self.blank + 1 + b + j) % self.num_classes for j in range(width - len(row))]
                for b, row in enumerate(self.labels)]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)

    def concatenated(self) -> torch.Tensor:
        return torch.tensor([c for row in self.labels for c in row], dtype=torch.long)

    def args(self, log_probs: torch.Tensor | None = None, concatenated: bool = False):
        """``F.ctc_loss``'s positional tensors ``(log_probs, targets, input_lengths, target_lengths)``."""
        log_probs = self.log_probs if log_probs is None else log_probs
        targets = self.concatenated() if concatenated else self.padded()
        lengths = [torch.tensor(lengths, dtype=torch.long) for lengths in (self.input_lengths, self.target_lengths)]
        return (log_probs, targets, *lengths)

    def sample(self, b: int, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``(T_b, C)`` log-probs of sample ``b``, its valid frames only."""
        log_probs = self.log_probs if log_probs is None else log_probs
        return log_probs[: self.input_lengths[b], b]


def random_batch(
    seed: int,
    *,
    frames: Range = (1, 5),
    classes: Range = (2, 4),
    batch: Range = (1, 3),
    max_label_len: int = 3,
    blank_last: bool = False,
    feasible: bool = False,
    min_input_length: int = 0,
    repeats: bool = False,
    integer: bool = False,
    scale: float = 1.5,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
) -> Batch:
    """The one seeded random CTC batch of the tests (tiny by default, for the enumeration in ``brute_force``).

    Sizes ``frames`` (T), ``classes`` (C), ``batch`` (B): an int is used as is, a ``(lo, hi)`` pair is drawn from
    (inclusive). Blank is class 0, or ``C - 1`` with ``blank_last``. Each target has 0 to ``max_label_len``
    labels (equal neighbours happen; ``repeats`` forces a run of equal labels at the start of the second row);
    the padded form carries junk past each length (:meth:`Batch.padded`, 0 to 2 extra columns). Sample 0 spans
    all T frames, the others ``min_input_length .. T``; with ``feasible`` each at least the fewest frames its
    target needs (T grows if it must), so every sample has an alignment. ``integer``: log-probs in {-2, -1, 0},
    used unnormalised (sums are exact, ties common); else ``scale * randn`` logits.
    """
    rng = random.Random(seed)
    size = lambda value: value if isinstance(value, int) else rng.randint(*value)  # noqa: E731
    num_frames, num_classes, num_samples = size(frames), size(classes), size(batch)
    blank = num_classes - 1 if blank_last else 0
    ids = [c for c in range(num_classes) if c != blank]
    labels = [[rng.choice(ids) for _ in range(rng.randint(0, max_label_len))] for _ in range(num_samples)]
    if repeats:
        row = labels[min(1, num_samples - 1)]
        run = min(4, max_label_len)
        row[:run] = [row[0] if row else rng.choice(ids)] * run
    needed = [max(min_input_length, brute_force.fewest_frames(row, blank) if feasible else 0) for row in labels]
    num_frames = max(num_frames, *needed)
    input_lengths = [num_frames] + [rng.randint(low, num_frames) for low in needed[1:]]
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    shape = (num_frames, num_samples, num_classes)
    if integer:
        logits = torch.randint(-2, 1, shape, generator=generator).to(dtype)
    else:
        logits = scale * torch.randn(shape, generator=generator, dtype=dtype)
    return Batch(logits.requires_grad_(requires_grad), labels, input_lengths, blank, pad_extra=rng.randint(0, 2),
                 normalised=integer)
