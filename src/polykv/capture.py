"""Prefill once, compress many ways: `capture()` records a full cache plus what every policy needs.

`Capture.compress(settings)` builds a fresh `PolyKVCache` from the capture without touching it, using the same
observation and selection code as compression during prefill, so both give identical kept sets (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polykv.attention import polykv_attention
from polykv.cache import PolyKVCache, PolyKVLayer
from polykv.compat import with_cache
from polykv.observe import observe_layer
from polykv.policies import LayerObservation
from polykv.settings import LayerSetting

DEFAULT_WINDOW = 64


@dataclass
class Observer:
    """Keeps, per layer, the observation a policy would get (window queries, cumulative attention if asked)."""

    window: int = DEFAULT_WINDOW
    cumulative: bool = True
    observations: dict[int, LayerObservation] = field(default_factory=dict)
    #: queries of the chunks fed after the prefill (e.g. teacher-forced answer tokens), per layer, concatenated
    chunk_queries: dict[int, Tensor] = field(default_factory=dict)

    def record(self, layer_idx: int, layer: PolyKVLayer, query: Tensor, scaling: float, softcap, valid: Tensor) -> None:
        self.observations[layer_idx] = observe_layer(
            layer_idx, layer, query, scaling, softcap, valid, self.window, self.cumulative
        )

    def record_chunk(self, layer_idx: int, query: Tensor) -> None:
        prev = self.chunk_queries.get(layer_idx)
        self.chunk_queries[layer_idx] = query if prev is None else torch.cat([prev, query], dim=2)


@dataclass
class Capture:
    """A full-cache prefill: the cache, each layer's observation, and the logits of the last prompt token."""

    cache: PolyKVCache
    observer: Observer
    last_logits: Tensor

    @property
    def num_layers(self) -> int:
        return len(self.cache.layers)

    def observation(self, layer_idx: int) -> LayerObservation:
        return self.observer.observations[layer_idx]

    def compress(self, settings: list[LayerSetting | None]) -> PolyKVCache:
        """A new compressed cache; the capture itself is left unchanged.

        None keeps a layer as a plain cache would: whole, or on a sliding layer the tokens it can still attend to.
        A `window` setting keeps its sinks and window and masks every later step by them, but its prefill was the
        capture's full one: only compression during prefill (`polykv.apply`) windows the prefill itself.
        """
        if len(settings) != self.num_layers:
            raise ValueError(f"{len(settings)} settings for a capture of {self.num_layers} layers")
        layers = []
        for i, (src, setting) in enumerate(zip(self.cache.layers, settings, strict=True)):
            dst = clone_layer(src)
            if setting is not None:
                obs = self.observation(i)
                if (
                    setting.policy.queries_needed() > obs.window_queries.shape[2]
                    and obs.num_tokens > obs.window_queries.shape[2]
                ):
                    raise ValueError(
                        f"policy {setting.policy.name} needs {setting.policy.queries_needed()} window queries but the "
                        f"capture kept {obs.window_queries.shape[2]}; capture with a larger window"
                    )
                if setting.policy.needs_cumulative and obs.cumulative_attention is None:
                    raise ValueError(
                        f"policy {setting.policy.name} needs cumulative attention; capture with cumulative=True"
                    )
                dst.bits = setting.bits
                dst.keep(setting.kept_indices(obs))
                if setting.span is not None:  # the window slides on from here; the capture's prefill stays full
                    dst.span = setting.span
                    dst.start_span(src.keys.shape[0], self.cache.column_valid, src.keys.device)
            else:
                dst.drop_unreachable()
            layers.append(dst)
        out = PolyKVCache(layers)
        out.column_valid = self.cache.column_valid
        return out

    def uncompressed(self) -> PolyKVCache:
        """A copy holding every captured column, even those sliding layers can no longer attend to (calibration
        teacher-forces answers over it and reads their attention back over the whole prompt)."""
        out = PolyKVCache([clone_layer(layer) for layer in self.cache.layers])
        out.column_valid = self.cache.column_valid
        return out


def clone_layer(src: PolyKVLayer) -> PolyKVLayer:
    """A shallow copy sharing tensors (they are never written in place), safe to compress or extend."""
    dst = PolyKVLayer(src.sliding_window)
    dst.__dict__.update({k: v for k, v in src.__dict__.items() if k != "_buffers"})
    return dst


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    window: int = DEFAULT_WINDOW,
    cumulative: bool = True,
) -> Capture:
    """Prefill `input_ids` with the full cache and record what policies need, for every layer."""
    observer = Observer(window=window, cumulative=cumulative)
    cache = PolyKVCache.for_config(model.config, observer=observer)
    with polykv_attention(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **with_cache(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return Capture(cache=cache, observer=observer, last_logits=out.logits[:, -1, :])
