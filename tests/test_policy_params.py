"""Policy parameters in plans: the shipped JSON Schema matches the policies' fields, plans always store every
parameter, and loading fills what a layer leaves out and refuses what no policy accepts."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest

from polykv.errors import PlanError
from polykv.plan import Plan, fingerprint_hash, uniform_plan
from polykv.policies import make_policy, policy_names
from polykv.policies.schema import CONSTRAINTS, document, render
from polykv.policy_params import PARAMS_SCHEMA_PATH, param_defaults, policy_params_schema


def fp() -> dict:
    return {
        "model_type": "llama",
        "num_layers": 2,
        "num_kv_heads": [2, 2],
        "head_dim": [16, 16],
        "layer_types": ["full_attention"] * 2,
        "sliding_window": None,
    }


def test_shipped_schema_is_generated_from_the_policies():
    assert PARAMS_SCHEMA_PATH.read_text(encoding="utf-8") == render(), (
        "src/polykv/schema/policy-params.schema.json is stale: run `python -m polykv.policies.schema`"
    )
    jsonschema.Draft202012Validator.check_schema(policy_params_schema())


def test_every_policy_field_is_described_and_defaulted():
    declared = {(name, f.name) for name in policy_names() for f in fields(type(make_policy(name)))}
    assert set(CONSTRAINTS) == declared, "CONSTRAINTS must name exactly the fields of the registered policies"
    for name in policy_names():
        assert param_defaults(name) == make_policy(name).params()


@pytest.mark.parametrize(
    "layer, ok",
    [
        ({"policy": "snapkv", "params": {}}, True),
        ({"policy": "snapkv", "params": {"window": 8, "pooling": "max"}}, True),
        ({"policy": "snapkv", "params": {"window": 0}}, False),
        ({"policy": "snapkv", "params": {"pooling": "min"}}, False),
        ({"policy": "h2o", "params": {"recent_fraction": 1.5}}, False),
        ({"policy": "streaming", "params": {"sinks": "4"}}, False),
        ({"policy": "tova", "params": {"window": 4}}, False),
        ({"policy": "random", "params": {"seed": -1}}, False),
    ],
)
def test_the_schema_document_validates_a_plan_layer(layer, ok):
    valid = jsonschema.Draft202012Validator(document()).is_valid(layer)
    assert valid == ok


def test_written_plans_carry_every_parameter_and_empty_params_load_as_defaults():
    plan = uniform_plan("m", fp(), "snapkv", 8)
    d = json.loads(plan.to_json())
    assert [lp["params"] for lp in d["layers"]] == [{"kernel": 5, "pooling": "avg", "window": 32}] * 2
    d["layers"][0]["params"] = {}
    d["layers"][1]["params"] = {"window": 4}
    loaded = Plan.from_dict(d)
    assert loaded.layers[0].params == make_policy("snapkv").params()
    assert loaded.layers[1].params == {"window": 4, "kernel": 5, "pooling": "avg"}
    assert json.loads(loaded.to_json())["layers"][0]["params"] == {"kernel": 5, "pooling": "avg", "window": 32}


@pytest.mark.parametrize(
    "params, match",
    [
        ({"window": 0}, r"layers/0: snapkv params/window: 0 is less than the minimum of 1"),
        ({"windw": 8}, r"layers/0: snapkv params: Additional properties are not allowed \('windw'"),
        ({"pooling": "median"}, r"layers/0: snapkv params/pooling: 'median' is not one of"),
        ({"kernel": True}, r"layers/0: snapkv params/kernel: True is not of type 'integer'"),
    ],
)
def test_bad_parameters_are_one_clear_plan_error(tmp_path, params, match):
    d = json.loads(uniform_plan("m", fp(), "snapkv", 8).to_json())
    d["layers"][0]["params"] = params
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=match) as exc:
        Plan.load(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


CHECKED_IN = sorted((Path(__file__).resolve().parents[1] / "plans").glob("*/avg*.json"))


@pytest.mark.parametrize("path", CHECKED_IN, ids=[f"{p.parent.name}/{p.name}" for p in CHECKED_IN])
def test_checked_in_plans_load_and_rewrite_byte_for_byte(path):
    """Complete params and the RFC 8785 fingerprint hash leave every shipped plan's bytes and stored hash as is."""
    text = path.read_text(encoding="utf-8")
    plan = Plan.load(path)
    assert plan.to_json() == text
    stored = json.loads(text)
    assert stored["fingerprint_hash"] == fingerprint_hash(plan.fingerprint)
    assert all(set(lp["params"]) == set(param_defaults(lp["policy"])) for lp in stored["layers"])  # already complete
