"""The FLOPs of a call by torch's own formulas (`torch.utils.flop_counter`), counted cheaply.

`FlopCounterMode` also attributes every operator to the modules it ran in; on the CPU that made
counting a tiny-model edit take about six times the edit itself, where this plain sum takes about
2.5 times. `tests/test_flops.py` checks that both give the same total.
"""
from __future__ import annotations

from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopSum(TorchDispatchMode):
    """Inside, every operator with a FLOP formula adds its count to `total`."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs of one call of `fn`."""
    with FlopSum() as flops:
        fn()
    return flops.total
