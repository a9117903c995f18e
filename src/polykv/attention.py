"""The attention wrapper that makes a ragged `PolyKVCache` correct on sdpa and eager.

transformers builds one mask per layer type, sized from one layer; with per-layer budgets that mask is wrong (or the
wrong shape) for every other layer. We register two attention functions, `polykv_sdpa` and `polykv_eager`, through
transformers' `AttentionInterface` (and their masks through `AttentionMaskInterface`); they delegate to the real sdpa
or the model's own eager function and, when the layer's cache is a `PolyKVCache`:
- on the prefill of an empty layer, use transformers' mask unchanged, then let the cache compress or record the
  layer (so later layers see the uncompressed prefill, as in SnapKV); a layer whose setting windows the attention
  itself (`policies.window`, engine semantics) gets its own window-and-sinks mask in the prefill too;
- afterwards, build this layer's own mask from the columns it kept (`PolyKVLayer.visible`);
- after each call, let a sliding layer drop what no later query can attend to (`PolyKVLayer.drop_unreachable`),
  except in a cache that records observations (a capture keeps every column for calibration to read).
A forward pre-hook on each attention module hands the cache to the function (modules do not pass it on).
Nothing global is patched: models not switched to these implementations are untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from polykv import kernels
from polykv.cache import PolyKVCache, PolyKVLayer
from polykv.compat import cache_in
from polykv.shared_prefix import SharedPrefixCache, shared_prefix_attention

CACHE_KWARG = "polykv_cache"
BASES = ("sdpa", "eager")


def softmax_scale(query: Tensor, scaling: float | None) -> float:
    """The logit scale of an attention call: the module's own `scaling` when it passes one (e.g. Gemma's
    query_pre_attn_scalar ** -0.5), else sdpa's default 1 / sqrt(head_dim) of `query` (..., head_dim)."""
    return float(scaling) if scaling is not None else query.shape[-1] ** -0.5


def _base_function(base: str, module: nn.Module) -> Callable:
    if base == "sdpa":
        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'")
    return eager


def _make_wrapper(base: str) -> Callable:
    def polykv_attention(module, query, key, value, attention_mask, **kwargs):
        cache = kwargs.pop(CACHE_KWARG, None)
        fn = _base_function(base, module)
        if not isinstance(cache, PolyKVCache):
            return fn(module, query, key, value, attention_mask, **kwargs)
        if isinstance(cache, SharedPrefixCache):
            if kwargs.get("s_aux") is not None:
                raise NotImplementedError("attention sinks (s_aux) are not supported by a shared-prefix batch")
            scaling = softmax_scale(query, kwargs.get("scaling"))
            layer = cache.layers[module.layer_idx]
            kernels.note("decode" if query.shape[2] == 1 else "chunk", "torch shared-prefix")
            return shared_prefix_attention(layer, query, scaling, kwargs.get("softcap")), None
        if base == "sdpa" and kwargs.get("s_aux") is not None:
            raise RuntimeError(
                "this model has attention sinks (s_aux), which transformers' sdpa ignores; "
                "load it with attn_implementation='eager'"
            )
        layer = cache.layers[module.layer_idx]
        if layer.fresh:
            kernels.note("prefill", f"torch {base}")
            if layer.span is None:
                out = fn(module, query, key, value, attention_mask, **kwargs)
            else:
                visible = span_prefill_mask(layer, query, cache.column_valid)
                out = _attend(fn, base, module, query, key, value, visible, kwargs)
            cache_after_prefill(cache, module.layer_idx, query, kwargs.get("scaling"), kwargs.get("softcap"))
        else:
            if cache.observer is not None:
                cache.observer.record_chunk(module.layer_idx, query)
            q_cols = torch.arange(layer.seen - query.shape[2], layer.seen, device=query.device)
            out = _attend(fn, base, module, query, key, value, layer.visible(q_cols, cache.column_valid), kwargs)
        if cache.observer is None:  # a recording cache keeps every column; one that serves drops what is out of reach
            layer.drop_unreachable()
        return out

    polykv_attention.__name__ = f"polykv_{base}"
    return polykv_attention


def _attend(fn, base: str, module, query: Tensor, key: Tensor, value: Tensor, visible: Tensor | None, kwargs: dict):
    """Attention of the new queries over every stored token of a layer, under its own visibility mask (or None).

    One-token steps take the flash-decoding kernel (unmasked layers on the Triton backend) or the grouped masked
    torch path; calls with attention sinks (`s_aux`, a learned per-head logit in every softmax, gpt-oss) take the
    model's own function, which adds them: neither fast path implements sinks.
    """
    q_len = query.shape[2]
    sinks = kwargs.get("s_aux") is not None
    if visible is None and q_len == 1 and not sinks and kernels.routes_to_triton(key):
        return _decode_kernel(query, key, value, kwargs), None
    if visible is not None and q_len == 1 and not sinks:
        kernels.note("decode", "torch masked")
        return _masked_decode(query, key, value, visible, kwargs), None
    kernels.note("decode" if q_len == 1 else "chunk", f"torch {base}")
    if visible is not None:
        groups = query.shape[1] // key.shape[1]
        if visible.shape[1] > 1 and groups > 1:
            visible = visible.repeat_interleave(groups, dim=1)
        if base == "eager":
            visible = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~visible, torch.finfo(query.dtype).min
            )
    return fn(module, query, key, value, visible, **kwargs)


def span_prefill_mask(layer: PolyKVLayer, query: Tensor, column_valid: Tensor | None) -> Tensor:
    """(B, 1, q, T) prefill mask of a layer with a span: each query sees its window and its row's sinks, as an
    engine prefills a sliding-window layer; a padding query also sees itself, so that no softmax row is empty."""
    layer.start_span(query.shape[0], column_valid, query.device)
    q_cols = torch.arange(layer.seen - query.shape[2], layer.seen, device=query.device)
    itself = q_cols.view(1, 1, -1, 1) == layer.columns[:, :1].unsqueeze(-2)
    return layer.visible(q_cols, column_valid) | itself


def _decode_kernel(query: Tensor, key: Tensor, value: Tensor, kwargs: dict) -> Tensor:
    """One-token attention over the whole stored cache with the flash-decoding kernel; (B, 1, Hq, D) like sdpa."""
    lengths = torch.full(key.shape[:2], key.shape[2], dtype=torch.int32, device=key.device)
    scaling = softmax_scale(query, kwargs.get("scaling"))
    out = kernels.decode_attention(query[:, :, 0], key, value, lengths, scaling, kwargs.get("softcap"))
    return out.unsqueeze(1).to(query.dtype)


def _masked_decode(query: Tensor, key: Tensor, value: Tensor, visible: Tensor, kwargs: dict) -> Tensor:
    """One-token attention under a (B, Hkv or 1, 1, N) visibility mask, grouped by KV head; (B, 1, Hq, D)."""
    scaling = softmax_scale(query, kwargs.get("scaling"))
    out = kernels.reference.masked_decode_attention(
        query[:, :, 0], key, value, visible[:, :, 0], scaling, kwargs.get("softcap")
    )
    return out.unsqueeze(1).to(query.dtype)


def cache_after_prefill(cache: PolyKVCache, layer_idx: int, query: Tensor, scaling, softcap) -> None:
    """Record and/or compress one layer right after its prefill attention ran."""
    from polykv.observe import observe_layer

    layer = cache.layers[layer_idx]
    layer.fresh = False
    setting = cache.settings[layer_idx] if cache.settings is not None else None
    if cache.observer is None and setting is None:
        return
    device = layer.keys.device  # this layer's, not the input's: with a device_map the layers span devices
    valid = cache.column_valid
    if valid is None:
        valid = torch.ones(query.shape[0], layer.seen, dtype=torch.bool, device=device)
    valid = valid.to(device)
    scaling = softmax_scale(query, scaling)
    if cache.observer is not None:
        cache.observer.record(layer_idx, layer, query, scaling, softcap, valid)
    if setting is not None:
        obs = observe_layer(
            layer_idx,
            layer,
            query,
            scaling,
            softcap,
            valid,
            queries=setting.policy.queries_needed(),
            cumulative=setting.policy.needs_cumulative,
        )
        layer.keep(setting.kept_indices(obs))


_registered = False


def register() -> None:
    """Register `polykv_sdpa` / `polykv_eager` with transformers (idempotent, adds names, replaces nothing)."""
    global _registered
    if _registered:
        return
    for base, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(f"polykv_{base}", _make_wrapper(base))
        AttentionMaskInterface.register(f"polykv_{base}", mask)
    _registered = True


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not mods:
        raise RuntimeError(f"{type(model).__name__}: no attention modules with layer_idx found; unsupported model")
    return mods


def _inject_cache(module, args, kwargs):
    cache = cache_in(kwargs)
    if isinstance(cache, PolyKVCache):
        kwargs[CACHE_KWARG] = cache
    return args, kwargs


def forward_input(args, kwargs) -> Tensor | None:
    """The new tokens a model forward receives (`input_ids`, else `inputs_embeds`, else the first positional
    argument), or None; shape (batch, new tokens, ...)."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    return x


def _track_padding(module, args, kwargs):
    cache = cache_in(kwargs)
    x = forward_input(args, kwargs)
    if isinstance(cache, PolyKVCache) and x is not None:
        cache.track_padding(kwargs.get("attention_mask"), x.shape[1], x.shape[0], x.device)
    return args, kwargs


@contextmanager
def polykv_attention(model: nn.Module) -> Iterator[str]:
    """Switch `model` to the matching polykv attention implementation for the duration; yields its name."""
    register()
    current = model.config._attn_implementation
    base = current.removeprefix("polykv_")
    if base not in BASES:
        raise RuntimeError(
            f"attention implementation {current!r} is not supported by the compressed cache; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    handles = [m.register_forward_pre_hook(_inject_cache, with_kwargs=True) for m in _attention_modules(model)]
    handles.append(model.register_forward_pre_hook(_track_padding, with_kwargs=True))
    name = f"polykv_{base}"
    model.set_attn_implementation(name)
    try:
        yield name
    finally:
        model.set_attn_implementation(current)
        for h in handles:
            h.remove()
