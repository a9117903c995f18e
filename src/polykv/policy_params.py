"""Policy parameters as plans store them: the JSON Schema of every policy's parameters, defaults and checks.

The schema (polykv/schema/policy-params.schema.json) is generated from the policies' dataclass fields by
`python -m polykv.policies.schema`; reading it needs no torch, so the solver and plan tools can complete and check
parameters without importing the policies. A plan always stores a policy's full parameter set: `complete_params`
fills what a layer leaves out (an empty `params` means the defaults) from the schema's `default` values.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

PARAMS_SCHEMA_PATH = Path(__file__).parent / "schema" / "policy-params.schema.json"


@cache
def policy_params_schema() -> dict:
    """The shipped policy-parameter schema document (one subschema per policy under `$defs`)."""
    return json.loads(PARAMS_SCHEMA_PATH.read_text(encoding="utf-8"))


def params_schema(policy: str) -> dict | None:
    """The JSON Schema of one policy's `params` object, or None for a policy the schema does not know."""
    return policy_params_schema()["$defs"].get(policy)


def param_defaults(policy: str) -> dict[str, Any] | None:
    """Every parameter of `policy` with its default, or None for a policy the schema does not know."""
    schema = params_schema(policy)
    if schema is None:
        return None
    return {name: spec["default"] for name, spec in schema["properties"].items()}


def complete_params(policy: str, params: Any) -> Any:
    """`params` with every parameter the layer leaves out set to its default (unchanged for unknown policies)."""
    defaults = param_defaults(policy)
    if defaults is None or not isinstance(params, dict):
        return params
    return {**defaults, **params}


def params_problem(policy: str, params: Any) -> str | None:
    """One line saying why `params` are not valid parameters of `policy`, or None (also for unknown policies)."""
    import jsonschema

    schema = params_schema(policy)
    if schema is None:
        return None
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(params))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{policy} params{'/' + where if where else ''}: {error.message}"
