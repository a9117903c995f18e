"""The conformance vectors (conformance/vectors/*.json) against PolyKV's policies and the specification's reference.

Every case must give its expected kept indices both through PolyKV's compression path (`polykv.conformance`) and
through conformance/reference.py (docs/plan-spec.md written as plain Python), and every registered policy must have
vectors covering ties, a budget at or above the context and GQA. A policy change that moves a kept set fails here:
regenerate with `python conformance/build.py` only when the change is intended (and say so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from polykv.conformance import boundary_ties, kept_indices
from polykv.policies import make_policy, policy_names

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "conformance" / "vectors"
REQUIRED_TAGS = ("ties", "budget_ge_context", "gqa")

sys.path.insert(0, str(ROOT / "conformance"))
import reference  # noqa: E402  (conformance/reference.py, not a package)


def load(policy: str) -> list[dict]:
    data = json.loads((VECTORS / f"{policy}.json").read_text(encoding="utf-8"))
    assert data["format"] == 1 and data["policy"] == policy
    return data["cases"]


def all_cases() -> list[dict]:
    return [case for path in sorted(VECTORS.glob("*.json")) for case in load(path.stem)]


CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_polykv_keeps_the_expected_tokens(case):
    assert kept_indices(case) == case["expected"]["kept"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_specification_reference_keeps_the_expected_tokens(case):
    assert reference.kept_for_case(case) == case["expected"]["kept"]


def test_every_registered_policy_has_vectors_for_ties_full_budget_and_gqa():
    assert sorted(p.stem for p in VECTORS.glob("*.json")) == sorted(policy_names())
    assert set(reference.POLICIES) == set(policy_names()), "conformance/reference.py lacks a registered policy"
    for policy in policy_names():
        cases = load(policy)
        assert len(cases) >= 3, policy
        tags = {tag for case in cases for tag in case["tags"]}
        missing = [t for t in REQUIRED_TAGS if t not in tags]
        assert not missing, f"{policy} has no vector tagged {', '.join(missing)}; add one in conformance/build.py"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_is_tiny_explicit_and_tagged_truthfully(case):
    tokens, kv_heads = len(case["keys"][0]), len(case["keys"])
    assert 8 <= tokens <= 40 and 1 <= kv_heads <= 2 and len(case["queries"]) % kv_heads == 0
    assert {len(v) for head in case["keys"] + case["values"] + case["queries"] for v in head} == {4}
    assert case["params"] == make_policy(case["policy"], case["params"]).params()  # every parameter written out
    tags = set(case["tags"])
    assert ("gqa" in tags) == (len(case["queries"]) > kv_heads)
    assert ("budget_ge_context" in tags) == (case["budget"] >= tokens)
    tied = any(boundary_ties(case)) or (case["policy"] == "full" and case["budget"] < tokens)
    assert ("ties" in tags) == tied
