"""Forward reads of a weight that a rule writes out by hand, marked for the weight-transport probe.

A rule evaluates a weight layer forwards through ``F.linear``/``F.conv2d`` (a module call or a functional
call), and the C1 probe (``bioplaus.algorithms.transport``) recognises those calls. Where a rule instead
multiplies a weight by presynaptic quantities in its own arithmetic (the perturbation rules' grouped readout
shifts, ``change * W``), it takes the weight through :func:`forward_weight`: the weight itself, except inside
the probe, which hands back the unperturbed weight so that a forward read is not mistaken for transport.
Only forward reads may go through it: a weight applied to an error from its output side is transport and must
read the parameter itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

_substitute: Callable[[torch.Tensor], torch.Tensor] | None = None


def forward_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a forward evaluation reads it (itself, outside the C1 probe)."""
    return weight if _substitute is None else _substitute(weight)


@contextmanager
def substituting(substitute: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, :func:`forward_weight` returns ``substitute(weight)`` (the C1 probe's hook)."""
    global _substitute
    saved, _substitute = _substitute, substitute
    try:
        yield
    finally:
        _substitute = saved
