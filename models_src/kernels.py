"""Kernel choice for small decoding steps.

oneDNN (mkldnn), which torch uses on CPUs for GELU and ``nn.LSTM`` among others, sets up a
primitive on every call: cheap beside training's large tensors, but most of the cost of a
one-token generation step. Over a window of tokens oneDNN wins, so only one-token steps
switch (figures in benchmarks/README.md). The two kernels agree to the last bits, not bit
for bit.
"""

from __future__ import annotations

import torch


class aten_kernels:  # noqa: N801 - used like a function: ``with aten_kernels():``
    """Within it, ATen's own CPU kernels instead of oneDNN's (the previous choice comes
    back on exit). The switch is process-wide; generation runs on one thread per process
    (a server's scheduler), and the other kernel would only change the last bits."""

    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        self._previous = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)

    def __exit__(self, *exc) -> None:
        torch._C._set_mkldnn_enabled(self._previous)
