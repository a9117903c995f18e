"""`with polykv.apply(model, plan_or_policy): model.generate(...)` — the one public way to compress a model.

Inside the block every new prefill (a forward that starts from no cache or an empty one) gets a `PolyKVCache` that
compresses each layer right after its prefill attention ran, as the plan says; the following tokens (generation, or
a question fed as a chunk) attend only to what was kept. On exit the model is exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from transformers.cache_utils import Cache

from polykv.attention import forward_input, polykv_attention
from polykv.cache import PolyKVCache
from polykv.compat import cache_key_in
from polykv.settings import LayerSetting, capped, from_layer_dicts, from_plan, load_settings, uniform


def num_layers(model: nn.Module) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def resolve_settings(model: nn.Module, spec) -> list[LayerSetting]:
    """Accepts a Plan, a plan path, a list of {policy, budget, params} dicts or LayerSettings, or (policy, budget).

    Budgets come back as each layer holds them: at most window - 1 on a sliding layer (`settings.capped`).
    """
    from polykv.models import fingerprint

    n = num_layers(model)
    fp = fingerprint(model.config)
    if isinstance(spec, (str, Path)):
        return capped(load_settings(spec, n, fp), fp)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        return capped(uniform(spec[0], int(spec[1]), n), fp)
    if hasattr(spec, "layers") and hasattr(spec, "check_model"):
        return capped(from_plan(spec, n, fp), fp)
    if isinstance(spec, Sequence) and spec and all(isinstance(s, LayerSetting) for s in spec):
        if len(spec) != n:
            raise ValueError(f"{len(spec)} layer settings for a model with {n} layers")
        return capped(spec, fp)
    if isinstance(spec, Sequence):
        return capped(from_layer_dicts(list(spec), n), fp)
    raise TypeError(
        f"cannot apply {type(spec).__name__}: pass a Plan, a plan path, a list of settings or (policy, budget)"
    )


@contextmanager
def apply(model: nn.Module, plan_or_policy) -> Iterator[list[LayerSetting]]:
    """Compress every prefill inside the block with `plan_or_policy`; yields the per-layer settings."""
    settings = resolve_settings(model, plan_or_policy)

    def use_polykv_cache(module, args, kwargs):
        key = cache_key_in(kwargs, model)
        cache = kwargs.get(key)
        empty = cache is None or (
            isinstance(cache, Cache) and not isinstance(cache, PolyKVCache) and cache.get_seq_length() == 0
        )
        if empty and kwargs.get("use_cache", True) is not False and forward_input(args, kwargs) is not None:
            kwargs[key] = PolyKVCache.for_config(model.config, settings=settings)
        return args, kwargs

    # registered first so that it runs before the padding tracker that polykv_attention installs
    handle = model.register_forward_pre_hook(use_polykv_cache, with_kwargs=True, prepend=True)
    try:
        with polykv_attention(model):
            yield settings
    finally:
        handle.remove()
