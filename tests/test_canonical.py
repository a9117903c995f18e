"""RFC 8785 canonical JSON against the RFC's published examples, and the hashes built on it (fingerprint, data,
plan) including the compatibility of hashes stored before."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict

import pytest

from polykv.canonical import canonical_json, number
from polykv.data import Sample, data_hash
from polykv.errors import PlanError
from polykv.plan import (
    LayerPlan,
    Plan,
    fingerprint_hash,
    fingerprint_hash_matches,
    legacy_fingerprint_hash,
    uniform_plan,
)

#: RFC 8785 section 3.2.2: input and canonical output
RFC_INPUT = r"""{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"""
RFC_OUTPUT = (
    r"""{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"""
    r""""string":"€$\u000f\nA'B\"\\\\\"/"}"""
)

#: RFC 8785 section 3.2.3: property sorting by UTF-16 code units
RFC_SORTING = r"""{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}"""
RFC_SORTED_VALUES = [
    "Carriage Return",
    "One",
    "Control",
    "Latin Small Letter O With Diaeresis",
    "Euro Sign",
    "Emoji: Grinning Face",
    "Hebrew Letter Dalet With Dagesh",
]

#: RFC 8785 appendix B: IEEE 754 bit patterns and their canonical text
RFC_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


def test_rfc8785_example_text_and_utf8_bytes():
    text = canonical_json(json.loads(RFC_INPUT))
    assert text == RFC_OUTPUT
    assert text.encode("utf-8").hex().startswith("7b226c69746572616c73223a5b6e756c6c2c")
    assert b"\xe2\x82\xac$\\u000f\\nA'B" in text.encode("utf-8")  # the euro sign raw, controls escaped


def test_rfc8785_property_sorting():
    text = canonical_json(json.loads(RFC_SORTING))
    assert [v for _, v in json.loads(text, object_pairs_hook=list)] == RFC_SORTED_VALUES


@pytest.mark.parametrize("bits, expected", RFC_NUMBERS)
def test_rfc8785_numbers(bits, expected):
    assert number(struct.unpack(">d", bytes.fromhex(bits))[0]) == expected


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_nan_and_infinity_are_refused(bits):
    with pytest.raises(ValueError, match="finite"):
        canonical_json([struct.unpack(">d", bytes.fromhex(bits))[0]])


def test_python_values():
    assert (
        canonical_json({"b": [1, 2.0, -0.0, None, True, False], "a": (1.5,)})
        == '{"a":[1.5],"b":[1,2,0,null,true,false]}'
    )
    assert canonical_json(2**53) == "9007199254740992" and canonical_json(10**21) == "1e+21"
    assert canonical_json("\x00\x1f\x7f\u2028") == '"\\u0000\\u001f\x7f\u2028"'
    with pytest.raises(ValueError, match="double"):
        canonical_json(2**53 + 1)
    with pytest.raises(ValueError, match="surrogate"):
        canonical_json("\ud800")
    with pytest.raises(TypeError, match="keys"):
        canonical_json({1: "a"})
    with pytest.raises(TypeError, match="set"):
        canonical_json({1, 2})


def fingerprint(model_type: str = "llama") -> dict:
    return {
        "model_type": model_type,
        "num_layers": 2,
        "num_kv_heads": [2, 2],
        "head_dim": [16, 16],
        "layer_types": ["full_attention"] * 2,
        "sliding_window": None,
    }


def test_fingerprint_hash_is_unchanged_for_ascii_fingerprints():
    assert fingerprint_hash(fingerprint()) == legacy_fingerprint_hash(fingerprint())
    assert fingerprint_hash(fingerprint()) == hashlib.sha256(canonical_json(fingerprint()).encode()).hexdigest()[:12]


def test_plan_with_a_legacy_fingerprint_hash_still_loads(tmp_path):
    """A non-ASCII fingerprint hashes differently under RFC 8785 (raw UTF-8, not \\u escapes); files written with the
    old hash keep loading, and a hash matching neither is still refused."""
    fp = fingerprint("llamä")
    assert fingerprint_hash(fp) != legacy_fingerprint_hash(fp)
    d = json.loads(uniform_plan("m", fp, "h2o", 8).to_json())
    d["fingerprint_hash"] = legacy_fingerprint_hash(fp)
    assert Plan.from_dict(d).fingerprint_hash == fingerprint_hash(fp)
    assert fingerprint_hash_matches(fp, legacy_fingerprint_hash(fp)) and not fingerprint_hash_matches(fp, "0" * 12)
    d["fingerprint_hash"] = "0" * 12
    with pytest.raises(PlanError, match="does not match the fingerprint"):
        Plan.from_dict(d)


def test_data_hash_is_unchanged_for_any_strings():
    """Samples hold only strings, for which RFC 8785 and the sorted, unescaped json.dumps hashed before agree."""
    samples = [
        Sample("id-1", "qa", 'ctx \x00\x01\t\n\r"\\ é € 😀 \u2028 \x7f', "why?", ["a", "b"]),
        Sample("id-2", "code", "x", "y", ["z"]),
    ]
    old = json.dumps([asdict(s) for s in samples], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert data_hash(samples) == hashlib.sha256(old.encode("utf-8")).hexdigest()[:16]


def test_plan_hash_covers_what_a_runtime_does():
    plan = uniform_plan("m", fingerprint(), "snapkv", 8, {"window": 4})
    h = plan.plan_hash
    assert len(h) == 16 and int(h, 16) >= 0
    explicit = uniform_plan("m", fingerprint(), "snapkv", 8, {"window": 4, "kernel": 5, "pooling": "avg"})
    explicit.provenance = {"polykv_version": "0", "solver": "dp"}
    explicit.predicted_loss, explicit.model = 1.5, "other"
    assert explicit.plan_hash == h  # defaults written out, provenance, losses and the model name do not count
    changed = uniform_plan("m", fingerprint(), "snapkv", 8, {"window": 4})
    changed.layers[1] = LayerPlan(1, "snapkv", 8, {"window": 4, "kernel": 3})
    assert changed.plan_hash != h
    assert uniform_plan("m", fingerprint(), "snapkv", 7, {"window": 4}).plan_hash != h
    assert uniform_plan("m", fingerprint("qwen2"), "snapkv", 8, {"window": 4}).plan_hash != h
