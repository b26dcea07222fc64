"""Trained networks on disk: the network's weights plus what is needed to rebuild and feed it.

Saved as plain tensors and Python values, so loading uses ``torch.load(weights_only=True)``: no
pickle of code, safe for files from elsewhere. Written atomically (the results writer's temp file + rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bioplaus.algorithms.arch import ARCHS, Network
from bioplaus.orchestrator.config import typed


def atomic_write(path: str | Path, write) -> Path:
    """The results writer's atomic write, imported when a network is written: training itself must not need
    the results layer's table libraries (a machine that only times trials may lack them)."""
    from bioplaus.orchestrator.results import atomic_write as write_atomically

    return write_atomically(path, write)


def save_network(path: str | Path, net: Network, config: dict, mean: torch.Tensor, std: torch.Tensor,
                 classes: list[str]) -> Path:
    """Write ``net``'s weights with its trial config and the training split's normalisation."""
    payload = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "config": config,
               "arch": net.arch, "input_shape": list(net.input_shape), "num_classes": net.num_classes,
               "mean": mean.detach().cpu(), "std": std.detach().cpu(), "classes": list(classes)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def write_network_file(path: str | Path, data: bytes) -> Path:
    """Write a saved network's bytes (as a worker on another node sent them back) atomically to ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[Network, dict[str, Any]]:
    """Rebuild a saved network (eval mode) and return it with its metadata (config, mean, std, classes)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    spec = ARCHS[payload["arch"]]
    model_cfg = typed(spec.config, OmegaConf.create(payload["config"].get("model", {})), "model")
    net = spec.build(model_cfg, tuple(payload["input_shape"]), payload["num_classes"])
    net.load_state_dict(payload["state_dict"])
    return net.to(device).eval(), {k: v for k, v in payload.items() if k != "state_dict"}
