"""Count tensor -> Python conversions (host-device syncs on a GPU) while code runs.

Every ``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``bool(t)`` (a Python ``if`` on a tensor)
forces the host to wait for the device. The step of a hina_kohya optimizer must make none.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class SyncCounter:
    def __init__(self) -> None:
        self.count = 0
        self.by_method: dict[str, int] = {}


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS if hasattr(torch.Tensor, name)}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counter.count += 1
            counter.by_method[name] = counter.by_method.get(name, 0) + 1
            return fn(self, *args, **kwargs)
        return counted

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
