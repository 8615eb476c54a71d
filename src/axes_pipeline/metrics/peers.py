"""Who a channel's peers are (METHODS §1, ``metrics.peers``): the whole layer, or its conv group.

A channel of a grouped conv (ResNeXt, RegNet) or a depthwise conv (MobileNet, EfficientNet,
ConvNeXt) is computed from its own group's input channels only. ``layer`` (default) keeps the
paper's definition for every conv: peers are all other channels of the layer. ``group``: the
peers of a channel are the other channels of its conv group, so peer overlap, the hulls, the
full-peer explanation, S and R_T are computed within each group; a depthwise channel then has no
peers (peer overlap 0, empty hull). Input capture keeps the layer's σ0² in both modes, so I_X
stays comparable across the groups of one layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from axes_pipeline.errors import UserError
from axes_pipeline.metrics.axes import channel_axes_from_moments, sigma0_sq
from axes_pipeline.metrics.gaussian import dead_channels

__all__ = ["PEER_MODES", "channel_axes_by_peers", "check_peers"]

PEER_MODES = ("layer", "group")


def check_peers(peers: str) -> None:
    if peers not in PEER_MODES:
        raise UserError(f"unknown metrics.peers {peers!r}; choose one of: {', '.join(PEER_MODES)}")


def channel_axes_by_peers(cov: Tensor, unit, *, peers: str = "layer", **knobs) -> dict[str, Tensor]:
    """:func:`channel_axes_from_moments` of one layer (``cov``: ``[C+1, C+1]``, target first)
    with the peers of ``metrics.peers``; ``unit``: the layer's ConvUnit."""
    check_peers(peers)
    groups = int(getattr(unit.conv, "groups", 1))
    if peers == "layer" or groups == 1:
        return channel_axes_from_moments(cov, **knobs)
    var = torch.diagonal(cov)[1:]
    dead = dead_channels(var)
    s0 = float(sigma0_sq(var, dead, knobs["sigma0"]))   # the layer's scale, shared by its groups
    # the layer decides who is dead, as in ``layer`` mode: a group's own relative threshold would
    # call a channel live that is dead next to the layer's largest variance; a zero row is dead in any group
    mask = torch.cat([torch.ones(1, dtype=cov.dtype, device=cov.device), (~dead).to(cov.dtype)])   # target row kept
    cov = cov * mask[:, None] * mask[None, :]
    per = unit.conv.out_channels // groups
    out: dict[str, Tensor] = {}
    for g in range(groups):   # the channels of one conv group are each other's peers
        idx = torch.arange(g * per, (g + 1) * per, device=cov.device)
        rows = torch.cat([torch.zeros(1, dtype=torch.long, device=cov.device), idx + 1])
        part = channel_axes_from_moments(cov[rows][:, rows], **{**knobs, "sigma0": s0 if s0 > 0 else 1.0})
        for k, v in part.items():
            if k not in out:
                out[k] = torch.zeros((cov.shape[0] - 1,), dtype=v.dtype, device=v.device)
            out[k][idx] = v
    return out
