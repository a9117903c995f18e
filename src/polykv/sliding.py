"""How much of its past a sliding-window layer can still attend to: one rule for the cache, policies and plans.

As in transformers (`masking_utils.sliding_window_overlay`: key j is visible to query i iff j > i - sliding_window),
the query at column c sees the `window` columns c - window + 1 .. c, itself included. Once a layer has seen `seen`
columns, the next query (column `seen`) and every later one see only columns >= seen - window + 1, so at most
`window - 1` cached tokens are ever attended again; transformers' `DynamicSlidingWindowLayer` keeps exactly those.
A sliding layer therefore keeps none of the older tokens, scores only the reachable ones, and a budget above
`window - 1` buys nothing: the cost model, the uniform baselines and the byte accounting all use this capacity.
"""

from __future__ import annotations


def reach(window: int) -> int:
    """Cached tokens a sliding layer of `window` can still attend to: window - 1 (at least 1, so a budget of one
    token stays valid even for the degenerate window of 1)."""
    return max(window - 1, 1)


def capped(budget: int, window: int | None) -> int:
    """`budget` as a layer can hold it: unchanged on a full-attention layer (window None), at most `reach` else."""
    return budget if window is None else min(budget, reach(window))
