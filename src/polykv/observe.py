"""Turning one layer's prefill into a `LayerObservation`, live (during prefill) or recorded (for capture)."""

from __future__ import annotations

from torch import Tensor

from polykv.cache import PolyKVLayer
from polykv.policies import LayerObservation
from polykv.policies.scoring import cumulative_attention


def observe_layer(
    layer_idx: int,
    layer: PolyKVLayer,
    query: Tensor,
    scaling: float,
    softcap: float | None,
    valid: Tensor,
    queries: int,
    cumulative: bool,
) -> LayerObservation:
    """What policies need from this layer's prefill: the keys/values it stored and the queries that produced them.

    `query` is (B, Hq, T, D), the whole prefill's queries; only the last `queries` are kept in the observation.
    On a sliding layer the cumulative attention is the layer's own (each query sees only its window).
    """
    keys, values = layer.keys, layer.values
    tokens = keys.shape[-2]
    window = layer.sliding_window
    cum = cumulative_attention(query, keys, scaling, valid[:, -tokens:], softcap, window) if cumulative else None
    return LayerObservation(
        layer=layer_idx,
        keys=keys,
        values=values,
        window_queries=query[:, :, max(tokens - queries, 0) : tokens] if queries else query[:, :, tokens:tokens],
        scaling=scaling,
        valid=valid[:, -tokens:],
        softcap=softcap,
        cumulative_attention=cum,
        sliding_window=window,
    )
