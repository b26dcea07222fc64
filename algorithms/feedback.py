"""Weight layers whose backward pass sends the error through a separate feedback weight ``B``.

Shared by the feedback-alignment rules: ``fa`` (B fixed and random, Lillicrap et al. 2016) and
``sign_symmetry`` (B = sign(W) times a constant, Liao, Leibo & Poggio 2016).

Forward is the layer's own function of (x, W, b). Backward gives dL/dW and dL/db exactly as autograd
does (they need the layer input and the incoming error, never W) and sends the error to the layer
input through B in place of W. W is not saved for the backward pass at all, so no backward pass can
read it — which is what the C1 probe (``bioplaus.algorithms.probes.weight_reads``) looks for. With B = W the
result is backprop's, bit for bit (tests/test_feedback_alignment.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bioplaus.algorithms.arch import Block


class _LinearFeedback(torch.autograd.Function):
    # forward and setup_context apart, and a generated vmap rule: torch.func (grad, vmap) can transform it, which
    # trains a population of networks as one batched computation (algorithms/population.py).
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, feedback):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, bias, feedback = inputs
        ctx.save_for_backward(x, feedback)  # not the weight: backward must not be able to read it
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, feedback = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad.matmul(feedback)  # the error goes down through B instead of W
        if ctx.needs_input_grad[1]:
            gw = g2.t().mm(x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


class _Conv2dFeedback(torch.autograd.Function):
    generate_vmap_rule = True  # see _LinearFeedback

    @staticmethod
    def forward(x, weight, bias, feedback, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, bias, feedback, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, feedback)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)

    @staticmethod
    def backward(ctx, grad):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        # The kernel autograd itself uses for conv2d, handed B where it would read W: the input
        # gradient is the transposed convolution of the error with B; the weight and bias
        # gradients use only x and the error, as in backprop.
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, feedback, [feedback.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, mask)
        return gx, gw, gb, None, None, None, None, None


def _feedback_forward(layer: nn.Module, feedback: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if feedback is None:
        if x.requires_grad:
            raise ValueError("the layer input needs a gradient but the layer has no feedback weight")
        # Never read (nothing below needs an error); a memory-free stand-in with W's shape, which
        # the conv backward kernel wants even when it computes no input gradient.
        feedback = layer.weight.new_zeros(()).expand(layer.weight.shape)
    if isinstance(layer, nn.Linear):
        return _LinearFeedback.apply(x, layer.weight, layer.bias, feedback)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("feedback conv layers support numeric zero padding only")
        return _Conv2dFeedback.apply(x, layer.weight, layer.bias, feedback, layer.stride, layer.padding,
                                     layer.dilation, layer.groups)
    raise TypeError(f"no feedback version of {type(layer).__name__}; supported: Linear, Conv2d")


def feedback_preact(block: Block, x: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
    """``block.preact(x)`` whose backward sends the error to ``x`` through ``feedback`` instead of W.

    ``feedback`` has the shape of ``block.layer.weight``; None where ``x`` needs no error (the first
    block's input). The layer module itself is called, its forward routed for this one call through
    the feedback function, so that module hooks (the criteria probes, profilers) see one ordinary
    evaluation of the layer.
    """
    layer = block.layer
    layer.forward = lambda inp: _feedback_forward(layer, feedback, inp)  # shadows the class method
    try:
        return layer(block.pre(x))
    finally:
        del layer.forward


def feedback_forward(block: Block, x: torch.Tensor, feedbacks: list[torch.Tensor | None]) -> torch.Tensor:
    """``block(x)`` with every weight layer's backward sending the error through its feedback weight.

    ``feedbacks`` has one entry per ``block.weight_layers()`` (None where that layer's input needs no
    error). A plain block's one layer gives ``block.post(feedback_preact(block, x, fb))`` exactly; a residual
    block's convs, projection included, each route their error through their own feedback weight.
    """
    layers = [layer for layer, _ in block.weight_layers()]
    if len(layers) == 1:
        return block.post(feedback_preact(block, x, feedbacks[0]))
    for layer, fb in zip(layers, feedbacks):
        layer.forward = lambda inp, layer=layer, fb=fb: _feedback_forward(layer, fb, inp)
    try:
        return block(x)
    finally:
        for layer in layers:
            del layer.forward


def feedback_slots(stage_index: int, block: Block) -> list[bool]:
    """Which of the block's weight layers need a feedback weight: those whose input needs an error (every
    layer inside a block; a layer reading the block input except in the first stage, whose input is data)."""
    return [stage_index > 0 or not reads_input for _, reads_input in block.weight_layers()]


def fan_in(weight: torch.Tensor) -> int:
    """Inputs per output unit of a Linear (out, in) or Conv2d (out, in/groups, kh, kw) weight."""
    return math.prod(weight.shape[1:])


def default_init_like(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A fresh draw from PyTorch's default Linear/Conv2d weight init, U(+-1/sqrt(fan_in)), times ``scale``.

    Drawn on the CPU from torch's global RNG (seeded by the trial), then moved to the weight's
    device, so the same seed gives the same matrix on every device.
    """
    bound = scale / math.sqrt(fan_in(weight))
    return (torch.rand(weight.shape, dtype=weight.dtype) * 2 - 1).mul_(bound).to(weight.device)


__all__ = ["default_init_like", "fan_in", "feedback_forward", "feedback_preact", "feedback_slots"]
