"""Architectures: blocks compose to the network, shapes follow the dataset, nothing is hard-coded."""

from __future__ import annotations

import pytest
import torch

from bioplaus.algorithms.arch import ARCHS, Block
from bioplaus.orchestrator.config import typed


def build(arch, input_shape, num_classes=10, **model):
    spec = ARCHS[arch]
    return spec.build(typed(spec.config, model, "model"), input_shape, num_classes)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_blocks_compose_to_the_network_for_any_input_shape(arch, input_shape):
    net = build(arch, input_shape, num_classes=7).eval()
    x = torch.randn(5, *input_shape)
    h = x
    for stage in net.stages:
        assert isinstance(stage, Block)
        h = stage.post(stage.preact(h))
    assert h.shape == (5, 7)
    assert torch.allclose(net(x), h) and torch.allclose(net.activations(x)[-1], h)
    assert net.shapes()[-1] == (7,) and len(net.shapes()) == len(net.stages)


def test_default_widths_match_the_documented_shapes():
    mlp = build("mlp", (1, 28, 28))
    assert [s.layer.weight.shape for s in mlp.stages] == [(1000, 784), (1000, 1000), (10, 1000)]
    assert len(build("cnn", (1, 28, 28)).blocks) == 3
    deep = build("deep_cnn", (3, 32, 32))
    assert len(deep.blocks) == 6 and isinstance(deep.blocks[0].norm, torch.nn.BatchNorm2d)
    assert deep.shapes()[-2] == (128, 4, 4)


def test_model_overrides_and_bad_values():
    net = build("cnn", (3, 32, 32), channels=[8], activation="tanh", norm="layer", pool="avg")
    assert len(net.blocks) == 1 and isinstance(net.blocks[0].act, torch.nn.Tanh)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        build("mlp", (1, 8, 8), activation="swishy")
    with pytest.raises(ValueError, match="cnn needs image input"):
        build("cnn", (64,))
    with pytest.raises(ValueError, match="too small"):
        build("cnn", (1, 8, 8), channels=[4, 4, 4, 4])
