"""Spiking building blocks in discrete time, vectorised over batch and neurons (a loop over time steps only).

Reusable by any spiking rule. Conventions: a spike train is a float tensor of 0/1 with time first,
``(T, B, N)``; every random draw comes from torch's global RNG (which the trial seeds), so the same
seed gives the same spikes.

* encoders: :func:`to_intensity` (a standardised batch back to [0, 1] intensities), :func:`poisson_encode`
  (rate coding: a Bernoulli spike per step with probability proportional to intensity) and
  :func:`latency_encode` (one spike per input, earlier for brighter inputs);
* :func:`lif_run`: leaky integrate-and-fire neurons with a refractory period, reset to zero, optional
  winner-take-all and lateral inhibition inside the layer;
* :func:`spike_trace` and :func:`stdp_update`: trace-based pair STDP (pre-before-post potentiates,
  post-before-pre depresses); :func:`conv_stdp_update` the same rule for a convolution's shared kernel
  (every position's pre/post pairs added into the one kernel they share);
* :func:`per_position`: conv feature maps ``(T, B, F, H, W)`` as ``(T, B*H*W, F)`` rows, so that
  :func:`lif_run`'s winner-take-all and lateral inhibition act across the maps at each position.
"""

from __future__ import annotations

import math

import torch
from torch.nn.grad import conv2d_weight


# --- encoders ---------------------------------------------------------------------------------------
def to_intensity(x: torch.Tensor) -> torch.Tensor:
    """Each sample min-max scaled to [0, 1] over all its features.

    The trial hands rules standardised batches (pixel/255 minus the mean, over the std, per channel);
    per channel that is an increasing affine map, so for one-channel images this gives back pixel/255
    exactly up to the sample's own contrast stretch (MNIST digits span 0..255, so there it is exact).
    Per sample: no sample depends on the rest of the batch.
    """
    flat = x.flatten(1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


def poisson_encode(intensity: torch.Tensor, steps: int, max_rate: float) -> torch.Tensor:
    """Rate coding: ``(steps, *intensity.shape)`` spikes, each step a Bernoulli draw with probability
    ``max_rate * intensity`` (Poisson process in the small-probability limit). Torch's global RNG."""
    p = (max_rate * intensity).clamp(0.0, 1.0)
    u = torch.rand((steps, *p.shape), device=p.device, dtype=p.dtype)
    return (u < p).to(p.dtype)


def latency_encode(intensity: torch.Tensor, steps: int, cutoff: float = 0.05) -> torch.Tensor:
    """Latency coding: one spike per input at step round((1 - intensity) * (steps - 1)); inputs dimmer than
    ``cutoff`` stay silent. Deterministic."""
    t_spike = ((1.0 - intensity) * (steps - 1)).round().long()
    t = torch.arange(steps, device=intensity.device).view(-1, *[1] * intensity.dim())
    return ((t == t_spike) & (intensity >= cutoff)).to(intensity.dtype)


# --- neurons --------------------------------------------------------------------------------------
def decay_factor(tau: float) -> float:
    """Per-step decay exp(-1/tau) of a quantity with time constant ``tau`` (in steps); tau <= 0: no memory."""
    return math.exp(-1.0 / tau) if tau > 0 else 0.0


def lif_run(current: torch.Tensor, threshold: torch.Tensor, *, tau_mem: float, refractory: int,
            wta: bool = True, inhibition: float = 0.0) -> torch.Tensor:
    """Leaky integrate-and-fire neurons driven by ``current`` ``(T, B, N)``; returns spikes ``(T, B, N)``.

    Each step: v <- decay * v + I (neurons out of their refractory period), a neuron spikes when
    v >= threshold (per neuron, shape (N,) or broadcastable), its v resets to 0 and it is silent for
    ``refractory`` steps. With ``wta`` at most one neuron per sample spikes per step: the one with the
    largest overshoot (a hard winner-take-all, the limit of Diehl & Cook's strong inhibitory population).
    Each spike lowers every *other* neuron of the same sample by ``inhibition * threshold`` (lateral
    inhibition), floored at ``-threshold`` so inhibition cannot silence a neuron for ever.
    """
    steps, n_batch, n = current.shape
    decay = decay_factor(tau_mem)
    v = current.new_zeros(n_batch, n)
    wait = torch.zeros(n_batch, n, dtype=torch.int32, device=current.device)  # refractory steps left
    spikes = torch.empty_like(current)
    thr = threshold.expand(n_batch, n)
    for t in range(steps):
        free = wait == 0
        v = torch.where(free, v * decay + current[t], torch.zeros_like(v))
        over = v - thr
        fire = over >= 0
        if wta:
            winner = torch.zeros_like(fire).scatter_(1, over.argmax(1, keepdim=True), True)
            fire = fire & winner
        s = fire.to(current.dtype)
        v = torch.where(fire, torch.zeros_like(v), v)
        if inhibition > 0:
            others = s.sum(1, keepdim=True) - s
            v = torch.maximum(v - inhibition * thr * others, -thr)
        wait = torch.where(fire, torch.full_like(wait, refractory), (wait - 1).clamp_min(0))
        spikes[t] = s
    return spikes


# --- traces and STDP ------------------------------------------------------------------------------
def spike_trace(spikes: torch.Tensor, tau: float) -> torch.Tensor:
    """Trace of a spike train ``(T, ...)``: set to 1 at a spike, decaying by exp(-1/tau) per step in between
    (Diehl & Cook's nearest-spike trace). Same shape as ``spikes``; the value at t includes the spike at t."""
    decay = decay_factor(tau)
    out = torch.empty_like(spikes)
    x = torch.zeros_like(spikes[0])
    for t in range(spikes.shape[0]):
        x = torch.where(spikes[t] > 0, torch.ones_like(x), x * decay)
        out[t] = x
    return out


def stdp_update(pre: torch.Tensor, post: torch.Tensor, *, tau_pre: float, tau_post: float, eta_post: float,
                eta_pre: float, x_tar: float = 0.0) -> torch.Tensor:
    """Pair STDP weight change ``(N_post, N_pre)`` from spike trains ``pre`` ``(T, B, N_pre)`` and ``post``
    ``(T, B, N_post)``, summed over the batch (each sample's change as if presented alone).

    * potentiation at every post spike: + eta_post * (x_pre(t) - x_tar), x_pre the presynaptic trace
      including pre spikes at t (a pre spike in the same step as the post spike counts as causal);
    * depression at every pre spike: - eta_pre * x_post(t-1), the postsynaptic trace of *earlier* post
      spikes (a post spike shortly before the pre spike).

    Only the two spike trains enter: no label, no error, no weight of any other layer.
    """
    x_pre = spike_trace(pre, tau_pre)
    x_post = spike_trace(post, tau_post)
    x_post_before = torch.cat([torch.zeros_like(x_post[:1]), x_post[:-1]])
    ltp = post.flatten(0, 1).t() @ (x_pre - x_tar).flatten(0, 1)
    ltd = x_post_before.flatten(0, 1).t() @ pre.flatten(0, 1)
    return eta_post * ltp - eta_pre * ltd


def conv_stdp_update(pre: torch.Tensor, post: torch.Tensor, weight_shape: tuple[int, ...], *, padding: int,
                     tau_pre: float, tau_post: float, eta_post: float, eta_pre: float,
                     x_tar: float = 0.0) -> torch.Tensor:
    """Pair STDP for a stride-1 convolution: ``pre`` ``(T, B, C, H, W)`` and ``post`` ``(T, B, F, H', W')``
    spike trains -> the change of the shared kernel ``weight_shape`` ``(F, C, k, k)``.

    Exactly :func:`stdp_update` applied to every (sample, position) as its own pair of layers, pre = the
    k x k input patch, post = the F maps there, summed over positions (the kernel is shared): each kernel
    entry sums post spike x pre trace over the positions it connects. Computed as the correlation of the
    two trains (``conv2d_weight``: a convolution of the traces, no autograd graph), not by unfolding patches.
    Zero padding is no input: it neither potentiates (no ``x_tar`` offset there) nor depresses.
    """
    x_pre = spike_trace(pre, tau_pre)
    x_post = spike_trace(post, tau_post)
    x_post_before = torch.cat([torch.zeros_like(x_post[:1]), x_post[:-1]])
    ltp = conv2d_weight((x_pre - x_tar).flatten(0, 1), weight_shape, post.flatten(0, 1), padding=padding)
    ltd = conv2d_weight(pre.flatten(0, 1), weight_shape, x_post_before.flatten(0, 1), padding=padding)
    return eta_post * ltp - eta_pre * ltd


def per_position(maps: torch.Tensor) -> torch.Tensor:
    """``(T, B, F, H, W)`` -> ``(T, B*H*W, F)``: one row per (sample, position), the F maps as its neurons."""
    steps, n_batch, n_maps, h, w = maps.shape
    return maps.permute(0, 1, 3, 4, 2).reshape(steps, n_batch * h * w, n_maps)


def from_per_position(rows: torch.Tensor, n_batch: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`per_position`: ``(T, B*H*W, F)`` -> ``(T, B, F, H, W)``."""
    steps, _, n_maps = rows.shape
    return rows.view(steps, n_batch, h, w, n_maps).permute(0, 1, 4, 2, 3)


__all__ = ["conv_stdp_update", "decay_factor", "from_per_position", "latency_encode", "lif_run", "per_position",
           "poisson_encode", "spike_trace", "stdp_update", "to_intensity"]
