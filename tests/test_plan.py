"""Plan format tests: schema, round trips, deterministic bytes, validation errors, model checks, budget units."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from polykv.errors import PlanError, PlanMismatchError
from polykv.plan import (
    SCHEMA_PATH,
    CostModel,
    LayerPlan,
    Plan,
    fingerprint_hash,
    plan_schema,
    schema_version_for,
    uniform_plan,
)
from polykv.precision import kv_bytes

ROOT = Path(__file__).resolve().parents[1]


def fp(num_layers: int = 3, **kw) -> dict:
    d = {
        "model_type": "llama",
        "num_layers": num_layers,
        "num_kv_heads": [2] * num_layers,
        "head_dim": [16] * num_layers,
        "layer_types": ["full_attention"] * num_layers,
        "sliding_window": None,
    }
    d.update(kw)
    return d


def gemma_like() -> dict:
    return fp(
        4,
        model_type="gemma3_text",
        num_kv_heads=[1] * 4,
        head_dim=[256] * 4,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=8,
    )


def plan_dict(**changes) -> dict:
    d = json.loads(uniform_plan("org/model", fp(), "snapkv", 32, {"window": 8}).to_json())
    d.update(changes)
    return d


def precision_plan(fingerprint: dict | None = None, bits: tuple[int, ...] = (4, 16, 2)) -> Plan:
    """snapkv at 32 tokens on every layer, the layers' bits cycling through `bits` (version 2 unless all are 16)."""
    fingerprint = fingerprint or fp()
    cm = CostModel.for_fingerprint(fingerprint, precision=True)
    layers = [
        LayerPlan(i, "snapkv", cm.effective(i, 32), {"window": 8}, None, bits[i % len(bits)])
        for i in range(cm.num_layers)
    ]
    provenance = {"polykv_version": "0", "solver": "test"}
    return Plan(schema_version_for(layers), "m", fingerprint, 32.0, cm.total(32), cm.unit, layers, None, provenance)


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_schema_copies_identical_and_valid():
    assert SCHEMA_PATH.read_bytes() == (ROOT / "plans" / "schema" / "plan.schema.json").read_bytes()
    jsonschema.Draft202012Validator.check_schema(plan_schema())


def test_fingerprint_hash_is_short_and_key_order_free():
    a = fp()
    b = dict(reversed(list(a.items())))
    assert fingerprint_hash(a) == fingerprint_hash(b)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint_hash(a))
    assert fingerprint_hash(a) != fingerprint_hash(fp(4))


def test_round_trip_and_deterministic_bytes(tmp_path):
    plan = uniform_plan("org/model", fp(), "snapkv", 32, {"window": 8, "kernel": 5})
    plan.layers[1] = LayerPlan(1, "h2o", 16, {}, 0.1 + 0.2)
    plan.predicted_loss = 1 / 3
    text = plan.to_json()
    assert text.endswith("}\n") and '\n    {"layer": 0, ' in text
    assert Plan.from_dict(json.loads(text)).to_json() == text
    assert Plan.from_dict(json.loads(uniform_plan("m", fp(), "h2o", 8).to_json())) == uniform_plan("m", fp(), "h2o", 8)
    plan.save(tmp_path / "a.json")
    plan.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes() == text.encode()
    assert Plan.load(tmp_path / "a.json").to_json() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp files left
    d = json.loads(text)
    assert list(d)[:2] == ["schema_version", "model"]
    assert d["layers"][0]["params"] == {"kernel": 5, "pooling": "avg", "window": 8}  # completed with the default
    assert list(d["layers"][0]["params"]) == ["kernel", "pooling", "window"]
    assert d["layers"][1]["predicted_loss"] == 0.3  # 12 significant digits
    assert d["fingerprint_hash"] == fingerprint_hash(fp()) and d["used_budget"] == 80
    jsonschema.validate(d, plan_schema())


def test_uniform_plan_tokens():
    plan = uniform_plan("m", fp(), "streaming", 64)
    assert plan.budget_unit == "tokens" and plan.total_budget == 192 and plan.used_budget == 192
    assert [lp.layer for lp in plan.layers] == [0, 1, 2]


def test_bytes_unit_for_sliding_and_unequal_layers():
    g = gemma_like()
    cm = CostModel.for_fingerprint(g)
    # window 8: the next query sees itself and the 7 columns before it, so a sliding layer holds at most 7
    assert cm.unit == "bytes" and cm.per_token == (1024,) * 4 and cm.caps == (7, 7, 7, None)
    plan = uniform_plan("gemma", g, "snapkv", 32)
    assert [lp.budget for lp in plan.layers] == [7, 7, 7, 32]
    assert plan.total_budget == plan.used_budget == 1024 * (7 * 3 + 32)
    mixed = fp(2, num_kv_heads=[2, 4])
    assert CostModel.for_fingerprint(mixed).unit == "bytes"
    assert uniform_plan("m", mixed, "h2o", 10).total_budget == (2 * 2 * 16 * 2 + 2 * 4 * 16 * 2) * 10


def test_check_model_names_both_fingerprints():
    plan = uniform_plan("org/model", fp(), "snapkv", 32)
    plan.check_model(fp())
    other = fp(4, model_type="qwen2")
    with pytest.raises(PlanMismatchError) as exc:
        plan.check_model(other, model="org/other")
    msg = str(exc.value)
    for part in ("org/model", "org/other", fingerprint_hash(fp()), fingerprint_hash(other)):
        assert part in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("layers"), "'layers' is a required property"),
        (lambda d: d["layers"][1].update(budget=-4), "layers/1/budget"),
        (lambda d: d["layers"][0].update(policy="nope"), "unknown policy nope"),
        (lambda d: d["layers"][2].update(budget=100), "over total_budget"),
        (lambda d: d["layers"].pop(), "2 layers but its fingerprint has 3"),
        (lambda d: d["layers"][0].update(layer=1), "in order"),
        (lambda d: d.update(fingerprint_hash="0" * 12), "fingerprint was edited"),
        (lambda d: d.update(schema_version=3), "schema_version 3 is not supported"),
        (lambda d: d.update(budget_unit="bytes"), "needs 'tokens'"),
        (lambda d: d.update(extra=1), "Additional properties"),
    ],
)
def test_load_rejects_bad_plans(tmp_path, mutate, match):
    d = plan_dict()
    d.pop("used_budget")
    mutate(d)
    with pytest.raises(PlanError, match=match) as exc:
        Plan.load(write(tmp_path, d))
    assert str(tmp_path) in str(exc.value) and "\n" not in str(exc.value)


def test_load_rejects_non_json_and_nan(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(write(tmp_path, "{nope"))
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(
            write(tmp_path, json.dumps(plan_dict()).replace('"predicted_loss": null', '"predicted_loss": NaN', 1))
        )
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_unknown_policy_check_uses_registry(tmp_path, monkeypatch):
    import polykv.plan as plan_mod

    monkeypatch.setattr(plan_mod, "_known_policies", lambda: ["snapkv"])
    Plan.load(write(tmp_path, plan_dict()))
    monkeypatch.setattr(plan_mod, "_known_policies", lambda: ["h2o"])
    with pytest.raises(PlanError, match="unknown policy snapkv; known: h2o"):
        Plan.load(write(tmp_path, plan_dict()))
    Plan.load(write(tmp_path, plan_dict()), check_policies=False)


def test_save_refuses_over_budget_plan(tmp_path):
    plan = uniform_plan("m", fp(), "snapkv", 32)
    plan.layers[0] = LayerPlan(0, "snapkv", 64, {})
    with pytest.raises(PlanError, match="over total_budget"):
        plan.save(tmp_path / "p.json")
    assert not any(tmp_path.iterdir())


def test_docs_example_is_a_valid_plan():
    doc = (ROOT / "docs" / "plan-format.md").read_text()
    example = re.search(r"```json\n(.*?)```", doc, re.S).group(1)
    plan = Plan.from_dict(json.loads(example))
    assert plan.to_json() == example


# --- KV precision: schema_version 2 -----------------------------------------------------------------------------------


def test_checked_in_plans_are_version_1_at_16_bits_and_rewrite_byte_identical():
    paths = sorted((ROOT / "plans").glob("*/avg*.json"))
    assert paths
    for path in paths:
        plan = Plan.load(path)
        assert plan.schema_version == 1 and {lp.bits for lp in plan.layers} == {16}
        assert plan.to_json() == path.read_text(encoding="utf-8")


def test_version_2_round_trip_with_bits_on_every_layer(tmp_path):
    plan = precision_plan()
    text = plan.to_json()
    d = json.loads(text)
    assert d["schema_version"] == 2 and d["budget_unit"] == "bytes"
    assert [layer["bits"] for layer in d["layers"]] == [4, 16, 2]
    assert list(d["layers"][0])[:5] == ["layer", "policy", "budget", "bits", "params"]
    # bytes of each layer's storage (2 KV heads, head dim 16, 32 tokens) against the uniform 16-bit plan's
    assert d["used_budget"] == kv_bytes(32, 2, 16, 4) + 4096 + kv_bytes(32, 2, 16, 2) == 1408 + 4096 + 896
    assert d["total_budget"] == 3 * 4096
    jsonschema.validate(d, plan_schema())
    plan.save(tmp_path / "p.json")
    loaded = Plan.load(tmp_path / "p.json")
    assert loaded == plan and loaded.to_json() == text
    assert [lp.bits for lp in loaded.layers] == [4, 16, 2]


def test_version_2_on_sliding_layers_caps_tokens_before_pricing_bits():
    plan = precision_plan(gemma_like(), bits=(2,))
    assert [lp.budget for lp in plan.layers] == [7, 7, 7, 32]
    assert plan.used_budget == 3 * kv_bytes(7, 1, 256, 2) + kv_bytes(32, 1, 256, 2)
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_all_16_bit_layers_are_version_1_without_bits():
    layers = precision_plan(bits=(16,)).layers
    assert schema_version_for(layers) == 1
    text = uniform_plan("m", fp(), "snapkv", 32, {"window": 8}).to_json()
    assert '"bits"' not in text and json.loads(text)["schema_version"] == 1


def test_plan_hash_covers_bits():
    assert precision_plan().plan_hash != precision_plan(bits=(4, 16, 4)).plan_hash
    assert precision_plan().plan_hash == Plan.from_dict(json.loads(precision_plan().to_json())).plan_hash


def test_bits_below_16_need_version_2_and_a_supported_width():
    plan = precision_plan()
    plan.schema_version = 1
    with pytest.raises(PlanError, match="layers below 16 bits need plan schema_version 2"):
        plan.to_json()
    for bad in (3, 32, "4"):
        with pytest.raises(PlanError, match="bits must be 16, 8, 4 or 2"):
            LayerPlan(0, "snapkv", 8, {}, None, bad)


def _v2(mutate) -> dict:
    d = json.loads(precision_plan().to_json())
    mutate(d)
    return d


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["layers"][0].update(bits=3), "layers/0: bits 3 is not supported; use 16, 8, 4 or 2"),
        (lambda d: d["layers"][2].update(bits=32), "layers/2: bits 32 is not supported"),
        (lambda d: d["layers"][1].update(bits="4"), "layers/1: bits '4' is not supported"),
        (lambda d: d["layers"][1].pop("bits"), "'bits' is a required property"),
        (lambda d: d.update(schema_version=1), "layers/0 has bits, which needs schema_version 2"),
        (lambda d: d.update(schema_version=7), "schema_version 7 is not supported .*reads 1 and 2"),
        (lambda d: d.update(budget_unit="tokens"), "budget_unit"),
        (lambda d: d["layers"][1].update(bits=8), "used_budget 6400 does not match the layers"),
        (lambda d: d["layers"][0].update(budget=1000), "over total_budget"),
        (lambda d: d.update(target={"engine": "hf", "reference_context": 64}), "whose layers run at 16 bits"),
    ],
)
def test_load_rejects_bad_version_2_plans(tmp_path, mutate, match):
    with pytest.raises(PlanError, match=match) as exc:
        Plan.load(write(tmp_path, _v2(mutate)))
    assert str(tmp_path) in str(exc.value) and "\n" not in str(exc.value)


# --- fuzzing: arbitrary JSON either loads or raises PlanError, never anything else ----------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EDGES = [
    0,
    -1,
    2.0,
    1e308,
    10**400,
    float("inf"),
    float("-inf"),
    float("nan"),
    "snapkv",
    "tokens",
    "bytes",
    "full",
    "sliding_attention",
    [],
    {},
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 300)
    | st.text(max_size=6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(EDGES)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_plan_error(d) -> None:
    try:
        plan = Plan.from_dict(d)
    except PlanError as exc:
        assert "\n" not in str(exc)
        return
    json.loads(plan.to_json())  # whatever loads also serialises


@st.composite
def mutated_plans(draw):
    """A valid plan (tokens or bytes unit) with a few of its values replaced by arbitrary JSON or removed."""
    fingerprint = draw(st.sampled_from([fp(), gemma_like(), fp(2, num_kv_heads=[2, 4])]))
    if draw(st.booleans()):
        d = json.loads(uniform_plan("m", fingerprint, "snapkv", draw(st.integers(1, 64)), {"window": 8}).to_json())
    else:
        d = json.loads(precision_plan(fingerprint, draw(st.sampled_from([(4, 16, 2), (8,), (16,)]))).to_json())
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["top", "fingerprint", "layer", "provenance"]))
        obj = {
            "top": d,
            "fingerprint": d.get("fingerprint"),
            "provenance": d.get("provenance"),
            "layer": draw(st.sampled_from(d["layers"]))
            if isinstance(d.get("layers"), list) and d["layers"] and all(isinstance(x, dict) for x in d["layers"])
            else None,
        }[target]
        if not isinstance(obj, dict) or not obj:
            continue
        key = draw(st.sampled_from(sorted(obj)))
        if draw(st.booleans()):
            obj[key] = draw(st.one_of(st.sampled_from(EDGES), JSON))
        else:
            del obj[key]
    return d


@FUZZ
@given(JSON)
def test_fuzz_from_dict_arbitrary_json(d):
    _load_or_plan_error(d)


@FUZZ
@given(mutated_plans())
def test_fuzz_from_dict_mutated_plans(d):
    _load_or_plan_error(d)


def _json_bytes(d) -> bytes:
    """JSON text as a file could hold it: Python's NaN/Infinity literals, and 1e400 for numbers beyond a double."""
    return json.dumps(d, default=str).replace("Infinity", "1e400").encode()


@FUZZ
@given(
    st.one_of(
        mutated_plans().map(_json_bytes),
        JSON.map(_json_bytes),
        st.binary(max_size=64),
        st.text(max_size=64).map(str.encode),
    )
)
def test_fuzz_load_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    try:
        Plan.load(path)
    except PlanError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_every_field_with_every_edge_value():
    """Systematic companion of the fuzzers: each value of a valid plan replaced by each edge value, or removed."""
    bases = [uniform_plan("m", f, "snapkv", 16, {"window": 8}) for f in (fp(), gemma_like())] + [precision_plan()]
    for base in (json.loads(plan.to_json()) for plan in bases):
        paths = [(k,) for k in base] + [("fingerprint", k) for k in base["fingerprint"]]
        paths += [("layers", 0, k) for k in base["layers"][0]] + [("provenance", k) for k in base["provenance"]]
        paths += [("layers", 0, "params", "window"), ("fingerprint", "num_kv_heads", 0), ("fingerprint", "head_dim", 1)]
        for path in paths:
            for value in [*EDGES, None, True, "x", [1], {"a": 1}, "<delete>"]:
                d = json.loads(json.dumps(base))
                obj = d
                for key in path[:-1]:
                    obj = obj[key]
                if value == "<delete>":
                    del obj[path[-1]]
                else:
                    obj[path[-1]] = value
                try:
                    _load_or_plan_error(d)
                except Exception as exc:
                    raise AssertionError(f"{path} = {value!r}: {type(exc).__name__}: {exc}") from exc
