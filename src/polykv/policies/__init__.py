"""Eviction policies: one small frozen dataclass per file, registered here by name.

Adding a policy, everything to touch:

1. `src/polykv/policies/<name>.py`: a `Policy` subclass (see `policies.base`) with the class attribute `name`,
   its parameters as dataclass fields with defaults (they are stored in plans), `score()`, and `window_size` /
   `queries_needed()` / `needs_cumulative` / `budget_dependent` if it reads window queries, cumulative attention or
   the budget, and `attention_span()` if it changes the attention itself rather than what is kept (`window`).
   Module docstring: what it keeps and why. Each field's range and description in `CONSTRAINTS` of
   `policies/schema.py`, then regenerate the parameter schema (`python -m polykv.policies.schema`).
2. `_POLICIES` below: import the class and append it. Registry order is the order of `policy_names()` (calibration,
   `eval --methods uniform:*`, report colours), so append rather than insert.
3. `tests/test_policies.py`: a brute-force reference in `REFERENCES` (plain loops over the eager model's attention,
   queries, keys and values; one or more parameter sets), and the name in `test_registry_names`. A registered
   policy without a reference fails `test_every_registered_policy_has_a_reference`; the per-policy tests of
   test_policies.py and test_cache.py are driven by `policy_names()`.
4. Docs: the policy table in README.md ("Policies") and the list in docs/plan-format.md (`policy`); a colour in
   `POLICY_COLORS` in cli/polykv_cli/plan_cmd.py (optional: unknown names get a spare one).
5. Plans: calibrations measure every registered policy by default, so a new policy reaches the checked-in plans
   only after `make plans` recalibrates and re-solves them.
6. Other runtimes: the policy's section in docs/plan-spec.md, the same rule in conformance/reference.py, its cases
   in `specs()` of conformance/build.py, then `python conformance/build.py` (tests/test_conformance.py fails for a
   registered policy without vectors covering ties, a budget >= the context and GQA).
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
from polykv.policies.window import Window

_POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (Full, Streaming, SnapKV, H2O, TOVA, KNorm, Random, ExpectedAttention, SnapKVForward, Window)
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
