"""Eviction policies: one small frozen dataclass per file, registered here by name.

To add a policy: write `policies/<name>.py` with a `Policy` subclass (class attribute `name`, fields = parameters
with documented defaults, a `score()`), and add it to `_POLICIES` below.
"""

from __future__ import annotations

from typing import Any

from polykv.policies.base import LayerObservation, Policy, ranking, select
from polykv.policies.expected_attention import ExpectedAttention
from polykv.policies.full import Full
from polykv.policies.h2o import H2O
from polykv.policies.knorm import KNorm
from polykv.policies.random import Random
from polykv.policies.snapkv import SnapKV
from polykv.policies.snapkv_forward import SnapKVForward
from polykv.policies.streaming import Streaming
from polykv.policies.tova import TOVA

_POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Full, Streaming, SnapKV, H2O, TOVA, KNorm, Random, ExpectedAttention, SnapKVForward)
}


def policy_names() -> list[str]:
    """Registered policy names, in registry order."""
    return list(_POLICIES)


def make_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    """Build a policy from its name and parameters (as stored in a plan); clear errors for unknown ones."""
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(_POLICIES)}")
    cls = _POLICIES[name]
    params = dict(params or {})
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"policy {name!r} has no parameter(s) {', '.join(unknown)}; its parameters are: "
            f"{', '.join(sorted(fields)) or 'none'}"
        )
    return cls(**params)


__all__ = ["LayerObservation", "Policy", "ranking", "select", "policy_names", "make_policy"]
