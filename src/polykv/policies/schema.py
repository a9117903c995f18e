"""Generate the JSON Schema of every registered policy's parameters from the policies' dataclass fields.

Types and defaults come from the fields; what a field's type cannot say (ranges, allowed strings) and a one-line
description come from `CONSTRAINTS`, which must name every field of every registered policy (tested). The result is
shipped as polykv/schema/policy-params.schema.json (read by `polykv.policy_params`, without torch); regenerate it
after changing a policy's fields with `python -m polykv.policies.schema`.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, fields
from typing import Any

from polykv.policies import make_policy, policy_names
from polykv.policy_params import PARAMS_SCHEMA_PATH

JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}

#: (policy, field) -> (extra JSON Schema keywords, description)
CONSTRAINTS: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("streaming", "sinks"): (
        {"minimum": 0},
        "First real tokens always kept (attention sinks); with a smaller budget, the first `budget` real tokens.",
    ),
    ("snapkv", "window"): (
        {"minimum": 1},
        "Trailing prompt queries whose attention scores the tokens before them; their own tokens are always kept.",
    ),
    ("snapkv", "kernel"): ({"minimum": 1}, "Pooling kernel over the prefix scores, in tokens (1: no pooling)."),
    ("snapkv", "pooling"): ({"enum": ["avg", "max"]}, "Pooling of the prefix scores: mean or maximum."),
    ("h2o", "recent_fraction"): (
        {"minimum": 0, "maximum": 1},
        "Share of the budget given to the most recent tokens: floor(budget x recent_fraction) are always kept.",
    ),
    ("random", "seed"): (
        {"minimum": 0, "maximum": 2**32 - 1},
        "Seed of the draw; layer l draws from MT19937 seeded with (seed x 100003 + l) mod 2^32.",
    ),
    ("expected_attention", "window"): (
        {"minimum": 1},
        "Trailing prompt queries summarised by a Gaussian per query head; their tokens are kept if keep_window.",
    ),
    ("expected_attention", "keep_window"): ({}, "Always keep the window's own tokens."),
    ("snapkv_forward", "window"): (
        {"minimum": 1},
        "Trailing prompt queries whose attention scores the tokens before them; their own tokens are always kept.",
    ),
    ("snapkv_forward", "span"): (
        {"minimum": 1},
        "Each token scores the highest window attention among itself and the span - 1 tokens before it.",
    ),
    ("window", "window"): (
        {"minimum": 0},
        "Positions each token attends to, itself included, in prefill and decode (0: the budget minus sinks); "
        "the layer's budget is window + sinks.",
    ),
    ("window", "sinks"): (
        {"minimum": 0},
        "First real tokens every token also attends to (TensorRT-LLM sink_token_length; 0 for transformers, vLLM, "
        "llama.cpp).",
    ),
}


def params_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of policy `name`'s `params` object: every field typed, constrained, with its default."""
    cls = type(make_policy(name))
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    for f in fields(cls):
        if (name, f.name) not in CONSTRAINTS:
            raise KeyError(f"add ({name!r}, {f.name!r}) to CONSTRAINTS in {__name__}")
        if f.default is MISSING:
            raise ValueError(f"policy {name!r} field {f.name!r} has no default; plans need one")
        extra, description = CONSTRAINTS[(name, f.name)]
        properties[f.name] = {
            "description": description,
            "type": JSON_TYPES[hints[f.name]],
            **extra,
            "default": f.default,
        }
    return {
        "title": f"{name} parameters",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def document() -> dict[str, Any]:
    """The whole schema: validates one plan layer ({"policy", "params", ...}); each policy's own under `$defs`."""
    names = policy_names()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:polykv:schema:policy-params:1",
        "title": "PolyKV policy parameters",
        "description": (
            "Parameters of every registered eviction policy, generated from the policies' dataclass fields "
            "(python -m polykv.policies.schema). Validates one entry of a plan's `layers`; `$defs/<policy>` is the "
            "schema of that policy's `params`. Plans store every parameter; a missing one means its `default`. "
            "See docs/plan-spec.md."
        ),
        "type": "object",
        "required": ["policy", "params"],
        "properties": {"policy": {"enum": names}, "params": {"type": "object"}},
        "allOf": [
            {
                "if": {"properties": {"policy": {"const": name}}, "required": ["policy"]},
                "then": {"properties": {"params": {"$ref": f"#/$defs/{name}"}}},
            }
            for name in names
        ],
        "$defs": {name: params_schema(name) for name in names},
    }


def render() -> str:
    """The schema file's text (deterministic: fixed key order, 2-space indents, trailing newline)."""
    return json.dumps(document(), indent=2, ensure_ascii=True) + "\n"


def main() -> None:
    PARAMS_SCHEMA_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PARAMS_SCHEMA_PATH}")


if __name__ == "__main__":
    main()
