"""Conformance cases: one layer's prefill as small nested lists, and what PolyKV keeps from it.

A case (conformance/README.md, docs/plan-spec.md) gives one sequence's keys and values (Hkv x T x D), every prompt
query (Hq x T x D), the number of left-padding columns, the softmax scaling, the optional logit soft-cap and sliding
window, the layer index, a policy with its parameters and a budget. `kept_indices` runs it through the same path as
compression during prefill (`observe.observe_layer`, then `LayerSetting.kept_indices`), so the expected indices
that conformance/build.py stores are what this code does, and tests/test_conformance.py checks they stay so.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from polykv.observe import observe_layer
from polykv.policies import LayerObservation, Policy, make_policy, ranking
from polykv.policies.window import span_count
from polykv.settings import LayerSetting


def case_policy(case: dict[str, Any]) -> Policy:
    return make_policy(case["policy"], case["params"])


def observation(case: dict[str, Any]) -> LayerObservation:
    """The `LayerObservation` compression would build from the case's prefill (batch of one)."""
    keys = torch.tensor(case["keys"], dtype=torch.float32)[None]
    values = torch.tensor(case["values"], dtype=torch.float32)[None]
    queries = torch.tensor(case["queries"], dtype=torch.float32)[None]
    tokens = keys.shape[2]
    valid = (torch.arange(tokens) >= case["padding"])[None]
    policy = case_policy(case)
    layer = SimpleNamespace(keys=keys, values=values, sliding_window=case.get("sliding_window"))
    return observe_layer(
        case["layer"],
        layer,  # the stored keys and values of the layer, as a PolyKVLayer holds them after prefill
        queries,
        float(case["scaling"]),
        case.get("softcap"),
        valid,
        policy.queries_needed(),
        policy.needs_cumulative,
    )


def kept_indices(case: dict[str, Any]) -> list[list[int]]:
    """Per KV head, the ascending token indices the case's policy keeps at its budget."""
    obs = observation(case)
    kept = LayerSetting(case_policy(case), int(case["budget"])).kept_indices(obs)
    return kept[0].tolist()


def ranked(case: dict[str, Any]) -> tuple[LayerObservation, Tensor, int] | None:
    """The tokens the case's policy ranks, their scores (Hkv, T') and how many of them are kept; None when nothing
    is ranked (`full`, or everything is kept). Eviction policies rank the tokens the layer can still attend to
    (`LayerObservation.in_window`) and keep `budget`; a policy that windows the attention itself (`window`) ranks
    all of them and keeps its sinks and its window (`policies.window.span_count`). The scores are informative;
    conformance is judged on the kept indices."""
    obs, policy = observation(case), case_policy(case)
    span = LayerSetting(policy, int(case["budget"])).span
    if span is not None:
        view, count = obs, span_count(obs, *span)
    else:
        view, count = obs.in_window(), int(case["budget"])
    if policy.name == "full" or count >= view.num_tokens:
        return None
    return view, policy.score(view, count)[0], count


def boundary_ties(case: dict[str, Any]) -> list[bool]:
    """Per KV head, whether the last kept and the first dropped token score the same (padding counted as -inf):
    the heads where the tie-breaking rule decides the kept set. Empty when nothing is ranked."""
    found = ranked(case)
    if found is None:
        return []
    view, s, count = found
    order = ranking(s[None], view.valid)[0]
    masked = s.float().masked_fill(~view.valid[0], float("-inf"))
    return [bool(masked[h, order[h, count - 1]] == masked[h, order[h, count]]) for h in range(s.shape[0])]
