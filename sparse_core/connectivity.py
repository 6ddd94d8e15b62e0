"""Effective density: the share of prunable weights on at least one input-to-output path.

A kept weight whose source unit receives no input (its value is a constant: the bias through the
activation, which the next layer could absorb into its own bias) or whose target unit reaches no
output computes nothing the network's answer depends on; nominal density counts it anyway. This is
Vysogorets & Kempe 2021 ("Connectivity matters: neural network pruning through the lens of effective
sparsity"), computed exactly on the mask graph: a unit is active when it is reachable from the input
and reaches the output; a weight is effective when its source is reachable from the input and its
target reaches the output. Convolutions count per channel (a channel pair is connected when any tap of
its kernel is kept). The prunable layers must form a chain (each layer's inputs are the previous
layer's outputs, channel for channel: the MLP and VGG-16 do); for any other graph the figures are NaN.
"""

from __future__ import annotations

import torch


def _adjacency(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool: whether unit/channel ``in`` feeds ``out`` through any kept weight."""
    mask = mask.bool().cpu()
    return mask if mask.dim() == 2 else mask.flatten(2).any(2)


def effective(masks: dict[str, torch.Tensor]) -> dict | None:
    """{"effective_density", "effective_weights", "effective_units": {layer: active units}} of the chain of
    ``masks`` (in forward order), or None when the layers do not form a chain."""
    names = list(masks)
    if any(m.dim() < 2 for m in masks.values()):  # a declared prunable layer that is not a unit-to-unit map
        return None
    adj = [_adjacency(masks[n]) for n in names]
    if any(a.shape[1] != b.shape[0] for a, b in zip(adj[1:], adj[:-1])):
        return None
    reach_in = [torch.ones(adj[0].shape[1], dtype=torch.bool)]  # inputs of layer l reachable from the input
    for a in adj:
        reach_in.append((a & reach_in[-1][None, :]).any(1))
    reach_out = [torch.ones(adj[-1].shape[0], dtype=torch.bool)]  # outputs of layer l that reach the output
    for a in reversed(adj):
        reach_out.append((a & reach_out[-1][:, None]).any(0))
    reach_out = reach_out[::-1]  # reach_out[l]: inputs of layer l; reach_out[l + 1]: its outputs
    kept_total = eff_total = total = 0
    units = {}
    for i, (name, mask) in enumerate(zip(names, masks.values())):
        m = mask.bool().cpu()
        shape = (m.shape[0], m.shape[1]) + (1,) * (m.dim() - 2)
        ok = reach_in[i][None, :].view(1, -1, *shape[2:]) & reach_out[i + 1][:, None].view(-1, 1, *shape[2:])
        eff_total += int((m & ok).sum())
        kept_total += int(m.sum())
        total += m.numel()
        if i < len(names) - 1:
            units[name] = int((reach_in[i + 1] & reach_out[i + 1]).sum())
    return {"effective_density": eff_total / total, "effective_weights": eff_total, "effective_units": units}
