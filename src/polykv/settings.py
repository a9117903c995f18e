"""Per-layer compression settings (policy + budget) and how a plan, a list or one policy turns into them."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from polykv.errors import InputError
from polykv.policies import LayerObservation, Policy, make_policy, ranking, select


@dataclass(frozen=True)
class LayerSetting:
    """What one layer keeps: `budget` tokens per KV head (sinks and windows included) chosen by `policy`."""

    policy: Policy
    budget: int

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise InputError(f"budget must be >= 1 token, got {self.budget}")

    def kept_indices(self, obs: LayerObservation) -> Tensor:
        """(B, Hkv, K) ascending indices this setting keeps; `full` and budget >= context keep everything."""
        budget = obs.num_tokens if self.policy.name == "full" else self.budget
        if budget >= obs.num_tokens:
            return select(obs.keys.new_zeros(obs.keys.shape[:3]), obs.num_tokens, obs.valid)
        key = ("score", self.policy, budget if self.policy.budget_dependent else None)
        if key not in obs.memo:  # one score and one ranking serve every budget of a budget-free policy
            scores = self.policy.score(obs, budget)
            obs.memo[key] = scores, ranking(scores, obs.valid)
        scores, order = obs.memo[key]
        return select(scores, budget, obs.valid, order)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.policy.name, "budget": self.budget, "params": self.policy.params()}


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
    """Settings from [{"policy", "budget", "params"?}, ...] (a plan's `layers`, or a bare list in a JSON file)."""
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
        out.append(LayerSetting(_policy(item["policy"], item.get("params")), int(budget)))
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
    """Settings from a loaded `Plan`, after checking it was made for this model (when a fingerprint is given)."""
    if fingerprint is not None:
        plan.check_model(fingerprint)
    return from_layer_dicts(
        [{"policy": layer.policy, "budget": layer.budget, "params": layer.params} for layer in plan.layers], num_layers
    )
