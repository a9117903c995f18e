"""One place that speaks both names of the cache argument.

transformers 5.24 renamed the models' `past_key_values` argument to `cache` (the old name warns, and goes in 5.40);
the attention modules now receive `cache=`. Code that passes or intercepts the cache goes through these helpers so
that it works on both sides of the rename.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from torch import nn

NEW, OLD = "cache", "past_key_values"


@cache
def _argument_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return NEW if NEW in params else OLD


def cache_argument(model: nn.Module) -> str:
    """The keyword this model's forward takes its KV cache under."""
    return _argument_of(type(model))


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`model(..., **with_cache(model, cache))`: pass a cache under the name the installed transformers expects."""
    return {cache_argument(model): cache}


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache among a forward's keyword arguments (hooks see whichever name the caller or model used)."""
    cache = kwargs.get(NEW)
    return cache if cache is not None else kwargs.get(OLD)


def cache_key_in(kwargs: dict[str, Any], model: nn.Module) -> str:
    """The key a hook should set a cache under: the one already present, else the model's own."""
    for key in (NEW, OLD):
        if key in kwargs:
            return key
    return cache_argument(model)


def output_cache(output: Any) -> Any:
    """The cache a forward returned (`output.cache` from 5.24 on, `output.past_key_values` before)."""
    cache = getattr(output, NEW, None)
    return cache if cache is not None else getattr(output, OLD, None)
