"""Measuring instruments for the plausibility criteria.

Each probe runs one ``rule.train_step`` on a batch and records what the step actually did, through
autograd and module hooks, so a rule's declaration can be checked against its behaviour:

* :func:`weight_reads` (C1): which blocks' forward weights autograd *read during a backward pass*.
  Backward reads a weight layer's ``weight`` only to compute the gradient with respect to that
  layer's input, i.e. to send an error below it through W^T: that is weight transport. (The
  gradient with respect to the weight itself needs the layer's input, not the weight.)
* :func:`gradient_crossings` (C2, C3): at which block boundaries an autograd gradient flowed from a
  block back into the block below it: an error chained through later blocks.
* :func:`layer_calls` (C3): how many times each block's weight layer was evaluated in one step.

The probes see what autograd and the modules see. A rule that computes its updates by hand (no
autograd, no module calls) is invisible to them; ``bioplaus.algorithms.criteria`` measures every rule's
criteria (weight transport by perturbation, ``bioplaus.algorithms.transport``, which needs no autograd).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from bioplaus.algorithms.rule import Rule


def _layer_weights(rule: Rule) -> dict[int, int]:
    """Storage address of every weight layer's ``weight`` -> its stage index (a residual block's convs and
    shortcut projection all count as its stage's)."""
    out = {}
    for i, stage in enumerate(rule.net.stages):
        for layer, _ in stage.weight_layers():
            w = getattr(layer, "weight", None)
            if w is not None:
                out[w.untyped_storage().data_ptr()] = i
    return out


def weight_reads(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> set[int]:
    """Indices of stages whose forward weights (any weight layer of the stage) a backward pass read during one
    train step."""
    weights = _layer_weights(rule)
    read: set[int] = set()

    def pack(t: torch.Tensor):
        try:
            return t, weights.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            return t, None

    def unpack(packed):
        t, index = packed
        if index is not None:
            read.add(index)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        rule.train_step(x, y)
    return read


@contextmanager
def _stage_input_hooks(rule: Rule, on_input):
    handles = [stage.layer.register_forward_pre_hook(lambda mod, args, i=i: on_input(i, args[0]))
               for i, stage in enumerate(rule.net.stages)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gradient_crossings(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> set[int]:
    """Boundaries ``l`` (stage l's weight-layer input, i.e. stage l-1's output) that an autograd gradient crossed."""
    crossed: set[int] = set()

    def on_input(i: int, h: torch.Tensor):
        if i > 0 and isinstance(h, torch.Tensor) and h.requires_grad:
            h.register_hook(lambda g, i=i: crossed.add(i))

    with _stage_input_hooks(rule, on_input):
        rule.train_step(x, y)
    return crossed


def layer_call_rows(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """For every stage, the batch size of each evaluation of its weight layer during one train step."""
    rows: list[list[int]] = [[] for _ in rule.net.stages]
    handles = [stage.layer.register_forward_hook(lambda m, a, o, i=i: rows[i].append(a[0].shape[0]))
               for i, stage in enumerate(rule.net.stages)]
    try:
        rule.train_step(x, y)
    finally:
        for h in handles:
            h.remove()
    return rows


def layer_calls(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """How many times each stage's weight layer was evaluated during one train step."""
    return [len(r) for r in layer_call_rows(rule, x, y)]


def label_dependent_blocks(rule: Rule, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> set[int]:
    """Hidden blocks (indices) whose one-step update changes when the labels change (C4).

    Runs one step on two deep copies of the rule from the same state and RNG, once with ``y`` and
    once with every label shifted to another class; a block whose parameters end up different
    learned from the labels. Implementation-independent: it looks only at the resulting weights.
    """
    shifted = (y + 1) % rule.net.num_classes
    results = []
    for labels in (y, shifted):
        clone = copy.deepcopy(rule)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clone.train_step(x, labels)
        results.append([torch.cat([p.detach().flatten() for p in b.parameters()]) for b in clone.net.blocks])
    return {i for i, (a, b) in enumerate(zip(*results)) if not torch.equal(a, b)}
