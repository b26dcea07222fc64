"""What identifies a run's configuration: the trial-config keys that decide its numbers, their hash, their differences.

Final run ids carry :func:`config_hash`; a resumed sweep compares its settings with the manifest's through
:func:`config_differences`; keys that only say where files are or how many threads compute
(:data:`PLACE_KEYS`) never count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Trial-config keys that say where files are or how many threads compute, never what is computed.
PLACE_KEYS = ("out", "data.root", "data.mirror", "data.download", "train.threads")


def flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.epochs": 3, ...}`` (lists stay values)."""
    out = {}
    for k, v in config.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def result_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What of a run's trial config decides its numbers: all of it but the seed and :data:`PLACE_KEYS`, flat."""
    return {k: v for k, v in flat(config).items() if k != "seed" and k not in PLACE_KEYS}


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of :func:`result_config` (hp, model, data, training budget): the configuration a run ran."""
    text = json.dumps(result_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for every key of :func:`result_config` that differs (absent on one side: None)."""
    a, b = result_config(old), result_config(new)
    return [f"{k} {json.dumps(a.get(k), default=str)} -> {json.dumps(b.get(k), default=str)}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
