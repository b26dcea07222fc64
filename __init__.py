"""bioplaus: the reference system for comparing biologically plausible learning rules against backprop.

Subpackages, lowest layer first (``docs/architecture.md`` has the contract a test enforces):
``algorithms`` (rules, architectures, probes) and ``orchestrator.data``; ``orchestrator`` (training,
sweeps, results); ``analysis`` (reads results); ``orchestrator.cli`` composes them.
"""

from __future__ import annotations

try:
    from bioplaus._version import __version__
except ImportError:  # a source tree that was never built or installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
