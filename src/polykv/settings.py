"""Per-layer compression settings (policy, budget, KV precision) and how a plan, a list or a policy becomes them."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from polykv.errors import InputError
from polykv.policies import LayerObservation, Policy, make_policy, ranking, select
from polykv.policies.window import span_kept
from polykv.precision import FULL_PRECISION, supported, unsupported_message
from polykv.quantize import check_bits


@dataclass(frozen=True)
class LayerSetting:
    """What one layer keeps: `budget` tokens per KV head (sinks and windows included) chosen by `policy`, stored
    at `bits` of precision (16: the model's dtype; 8, 4, 2: quantized, `polykv.quantize`)."""

    policy: Policy
    budget: int
    bits: int = 16

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.budget < 1:
            raise InputError(f"budget must be >= 1 token, got {self.budget}")
        try:
            self.policy.attention_span(self.budget)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    @property
    def span(self) -> tuple[int, int] | None:
        """(window, sinks) of a setting that windows the attention itself (`policies.window`), else None."""
        return self.policy.attention_span(self.budget)

    def kept_indices(self, obs: LayerObservation) -> Tensor:
        """(B, Hkv, K) ascending indices into the observed tokens that this setting keeps.

        The policy chooses among the tokens the layer can still attend to (`obs.in_window()`: all of them, or the
        last window - 1 on a sliding layer), so K <= window - 1 there; `full` and a budget >= that keep them all.
        A setting with a span keeps its sinks and what its window still reaches (`policies.window.span_kept`).
        """
        span = self.span
        if span is not None:
            return span_kept(obs, *span)
        view = obs.in_window()
        offset = obs.num_tokens - view.num_tokens
        budget = view.num_tokens if self.policy.name == "full" else self.budget
        if budget >= view.num_tokens:
            kept = select(view.keys.new_zeros(view.keys.shape[:3]), view.num_tokens, view.valid)
        else:
            key = ("score", self.policy, budget if self.policy.budget_dependent else None)
            if key not in view.memo:  # one score and one ranking serve every budget of a budget-free policy
                scores = self.policy.score(view, budget)
                view.memo[key] = scores, ranking(scores, view.valid)
            scores, order = view.memo[key]
            kept = select(scores, budget, view.valid, order)
        return kept + offset if offset else kept

    def describe(self) -> dict[str, Any]:
        out = {"policy": self.policy.name, "budget": self.budget, "params": self.policy.params()}
        return out if self.bits == 16 else {**out, "bits": self.bits}


def capped(settings: Sequence[LayerSetting], fingerprint: dict) -> list[LayerSetting]:
    """Each budget as its layer can hold it (`CostModel.effective`: at most window - 1 on a sliding layer), so that
    uniform baselines, plans and the cache state the same budget for the same memory. A setting with a span keeps
    its budget: that budget sets the attention window itself (`policies.window`), which the layer caps anyway."""
    from polykv.plan import CostModel

    cm = CostModel.for_fingerprint(fingerprint)
    if len(settings) != cm.num_layers:
        raise InputError(f"{len(settings)} layer settings for a model with {cm.num_layers} layers")
    return [
        s
        if s.span is not None or cm.effective(i, s.budget) == s.budget
        else replace(s, budget=cm.effective(i, s.budget))
        for i, s in enumerate(settings)
    ]


def _policy(name: str, params: dict | None) -> Policy:
    try:
        return make_policy(name, params)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def uniform(policy: str, budget: int, num_layers: int, params: dict | None = None) -> list[LayerSetting]:
    """The same policy and budget on every layer (the usual single-policy baseline)."""
    setting = LayerSetting(_policy(policy, params), budget)
    return [setting] * num_layers


def from_layer_dicts(layers: Sequence[dict], num_layers: int) -> list[LayerSetting]:
    """Settings from [{"policy", "budget", "params"?, "bits"?}, ...] (a plan's `layers`, or a bare list in a JSON
    file); a layer without "bits" is stored at 16 (the model's dtype)."""
    if len(layers) != num_layers:
        raise InputError(f"the plan has {len(layers)} layers but the model has {num_layers}; use a plan made for it")
    out = []
    for i, item in enumerate(layers):
        if not isinstance(item, dict) or "policy" not in item or "budget" not in item:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise InputError(f"layer {i} of the plan needs 'policy' and 'budget' keys, got {got}")
        budget = item["budget"]
        if not isinstance(item["policy"], str) or isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
            raise InputError(
                f"layer {i} of the plan needs a string 'policy' and an integer 'budget', "
                f"got {item['policy']!r} and {budget!r}"
            )
        bits = item.get("bits", FULL_PRECISION)
        if not supported(bits):
            raise InputError(f"layer {i} of the plan: {unsupported_message(bits)}")
        out.append(LayerSetting(_policy(item["policy"], item.get("params")), int(budget), bits))
    return out


def load_settings(path: str | Path, num_layers: int, fingerprint: dict | None = None) -> list[LayerSetting]:
    """Settings from a plan file (the `polykv solve` format, checked against the model) or a bare JSON list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"plan file {path} does not exist; check the path or run `polykv solve`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read plan {path} as UTF-8 JSON ({exc}); pass a plan written by `polykv solve`"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"plan {path} is not valid JSON ({exc.msg} at line {exc.lineno}); regenerate it") from None
    if isinstance(data, list):
        return from_layer_dicts(data, num_layers)
    from polykv.plan import Plan

    return from_plan(Plan.load(path), num_layers, fingerprint)


def from_plan(plan, num_layers: int, fingerprint: dict | None = None) -> list[LayerSetting]:
    """Settings from a loaded `Plan` (each layer at its `bits`), after checking it was made for this model (when a
    fingerprint is given)."""
    if fingerprint is not None:
        plan.check_model(fingerprint)
    return from_layer_dicts(
        [
            {"policy": layer.policy, "budget": layer.budget, "params": layer.params, "bits": layer.bits}
            for layer in plan.layers
        ],
        num_layers,
    )
