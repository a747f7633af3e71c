"""Counting host synchronisations: a loop over time must not read tensor values back to Python once per step.

On CUDA each such read (``bool(t)``, ``t.item()``, ``t.tolist()``, ...) stalls the host until the device catches
up, so a per-step one serialises the whole loop. Python reads of tensor values all go through
``__torch_function__``, so a :class:`TorchFunctionMode` sees them on the CPU too: the count must not grow with
the number of frames.
"""

from collections import Counter
from collections.abc import Callable

from torch.overrides import TorchFunctionMode

VALUE_READS = {"__bool__", "__int__", "__float__", "__index__", "__len__", "item", "tolist", "nonzero"}


class ValueReadCounter(TorchFunctionMode):
    """Counts the tensor-to-Python value reads made while active (including inside autograd backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in VALUE_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def value_reads(run: Callable[[], object]) -> Counter:
    """Value reads made by ``run()``."""
    with ValueReadCounter() as counter:
        run()
    return counter.reads
