"""Networks as the brain step sees them.

Owns feeding the 92 stimuli to a network as it was trained (crop, resize, quantise, grey, standardise),
every stage's flattened features, and the layer RDMs of the trained network and of its controls
(``CONTROLS``: the same architecture untrained with the run's seed, and the raw pixels as fed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bioplaus.analysis.brain_data import RSA92
from bioplaus.analysis.brain_rsa import features_rdm

CONTROLS = ("untrained", "pixels")


def stimuli_tensor(images: np.ndarray, input_shape, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, C, h, w) float, as the network saw its training images.

    Centre-crop to the input's aspect ratio, bilinear antialiased resize, 8-bit quantisation (training
    pixels are uint8), grayscale (ITU-R 601 luma) when the network has one input channel, then the
    training split's per-channel standardisation.
    """
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ValueError(f"brain similarity needs an image network with 1 or 3 input channels; input {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    H, W = x.shape[2:]
    if H * w != W * h:  # crop the longer side so the aspect ratio matches, no distortion
        ch, cw = (H, round(H * w / h)) if W * h > H * w else (round(W * h / w), W)
        top, left = (H - ch) // 2, (W - cw) // 2
        x = x[:, :, top:top + ch, left:left + cw]
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 1).mul(255).round().div(255)
    if c == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean, std = torch.as_tensor(mean).float().cpu(), torch.as_tensor(std).float().cpu()
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


@torch.no_grad()
def layer_features(net, x: torch.Tensor) -> list[dict[str, Any]]:
    """Every stage's output for the stimuli, flattened: [{layer, layer_name, layer_type, features}]."""
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    outs = net.activations(x.to(param.device, param.dtype))
    net.train(was_training)
    stages = net.stages
    return [{"layer": i + 1, "layer_name": "head" if i == len(stages) - 1 else f"block{i + 1}",
             "layer_type": type(stages[i].layer).__name__,
             "features": out.flatten(1).double().cpu().numpy()} for i, out in enumerate(outs)]


def untrained_network(meta: dict, seed: int):
    """The checkpoint's architecture freshly initialised with ``seed`` (torch's global RNG untouched)."""
    from omegaconf import OmegaConf

    from bioplaus.algorithms.arch import ARCHS
    from bioplaus.orchestrator.build import build_network
    from bioplaus.orchestrator.config import typed

    spec = ARCHS[meta["arch"]]
    model_cfg = typed(spec.config, OmegaConf.create(meta["config"].get("model", {})), "model")
    with torch.random.fork_rng(devices=[]):  # seeded as the trial's network is
        net = build_network(spec, model_cfg, tuple(meta["input_shape"]), meta["num_classes"], seed)
    return net.eval()


def network_rdms(net, meta: dict, data: RSA92, rdm: str = "correlation",
                 controls=CONTROLS, seed: int | None = None) -> list[dict[str, Any]]:
    """Layer RDMs of a network and its controls: [{control, layer, layer_name, layer_type, n_features,
    n_degenerate, rdm (vector)}]. ``meta`` as from ``load_network`` (input_shape, mean, std, config)."""
    seed = int(meta.get("config", {}).get("seed", 0) if seed is None else seed)
    x = stimuli_tensor(data.images, meta["input_shape"], meta["mean"], meta["std"])
    nets = [("none", net)]
    if "untrained" in controls:
        nets.append(("untrained", untrained_network(meta, seed).to(next(net.parameters()).device)))
    entries = []
    for control, n in nets:
        for f in layer_features(n, x):
            vec, bad = features_rdm(f["features"], rdm)
            entries.append({"control": control, **{k: f[k] for k in ("layer", "layer_name", "layer_type")},
                            "n_features": f["features"].shape[1], "n_degenerate": bad, "rdm": vec})
    if "pixels" in controls:
        feats = x.flatten(1).double().numpy()
        vec, bad = features_rdm(feats, rdm)
        entries.append({"control": "pixels", "layer": 0, "layer_name": "pixels", "layer_type": "input",
                        "n_features": feats.shape[1], "n_degenerate": bad, "rdm": vec})
    return entries
