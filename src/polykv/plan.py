"""The plan: which (policy, budget, bits) each layer gets, as a JSON file that `polykv solve` writes and `apply` reads.

A plan is tied to one model geometry (its *fingerprint*: layers, KV heads and head dim per layer, layer types,
sliding window) and checked against it before use. Its bytes are deterministic: the same plan always serialises to
the same text (fixed key order, sorted free-form dicts, floats rounded to 12 significant digits, no timestamps).

Budget unit. A layer's budget is always in tokens (kept per KV head). What the plan bounds is the summed *cost*:
- "tokens" when every layer has the same KV heads and head dim and no layer slides: cost = budget, and
  total_budget = average_budget x num_layers;
- "bytes" otherwise: cost of layer l = 2 (K and V) x num_kv_heads[l] x head_dim[l] x 2 bytes (a 16-bit cache) x
  min(budget, window - 1) on sliding layers (what they can still attend to, `polykv.sliding`; they never hold
  more) and x budget elsewhere. total_budget is the cost of the uniform plan at average_budget, so average_budget
  keeps meaning "tokens per layer" and the uniform plan is always within budget. The element size only scales both
  sides of the constraint, so the same plan is right for any cache dtype.

KV precision. A layer may also store its cache quantised (`bits` 8, 4 or 2; 16 = the model's dtype). A plan whose
layers are all at 16 bits is schema_version 1 (no `bits` key, costed as above). A plan with any layer below 16 bits
is schema_version 2: `bits` on every layer, unit "bytes" whatever the geometry, the cost of a layer being the exact
bytes of its quantised storage (`polykv.precision.kv_bytes`), and total_budget still the bytes of the uniform 16-bit
plan at average_budget, so a 4-bit layer holds about 3-4x the tokens of a 16-bit one for the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from polykv.canonical import canonical_json
from polykv.errors import PlanError, PlanMismatchError
from polykv.io import atomic_write_text
from polykv.policy_params import complete_params, params_problem
from polykv.precision import ELEMENT_BYTES, FULL_PRECISION, describe_supported, kv_bytes, supported
from polykv.sliding import reach

#: the version of plans whose layers are all at 16 bits (the format of every plan written before KV precision)
SCHEMA_VERSION = 1
#: the version of plans with some layer below 16 bits (`bits` on every layer, costs in bytes)
PRECISION_SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (SCHEMA_VERSION, PRECISION_SCHEMA_VERSION)
BYTES_PER_ELEMENT = ELEMENT_BYTES
SCHEMA_PATH = Path(__file__).parent / "schema" / "plan.schema.json"
FINGERPRINT_KEYS = ("model_type", "num_layers", "num_kv_heads", "head_dim", "layer_types", "sliding_window")


def fingerprint_hash(fp: dict) -> str:
    """Short stable id of a fingerprint: sha256 of its RFC 8785 canonical JSON (UTF-8), first 12 hex chars."""
    return hashlib.sha256(canonical_json(fp).encode("utf-8")).hexdigest()[:12]


def legacy_fingerprint_hash(fp: dict) -> str:
    """The fingerprint hash of plans and calibrations written before `fingerprint_hash` followed RFC 8785 (Python's
    sorted, ASCII-escaped JSON). Both agree on every fingerprint whose strings are ASCII (every model so far)."""
    text = json.dumps(fp, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprint_hash_matches(fp: dict, stored: Any) -> bool:
    """Whether a stored fingerprint hash belongs to `fp` (the RFC 8785 hash, or the legacy one of older files)."""
    try:
        current = fingerprint_hash(fp)
    except (TypeError, ValueError):  # a value canonical JSON cannot hold (e.g. an integer beyond a double)
        current = None
    return stored == current or stored == legacy_fingerprint_hash(fp)


def plan_hash(layers: list[dict], fingerprint: dict, schema_version: int = SCHEMA_VERSION) -> str:
    """The id of what a plan makes a runtime do: first 16 hex chars of the sha256 of the RFC 8785 canonical JSON of
    {"fingerprint", "layers": [{"layer", "policy", "budget", "params"}], "schema_version"}, params complete, and
    each layer's "bits" (16 when absent) in schema_version 2.

    Provenance, predicted losses and the budget totals are left out: two plans that compress a model the same way
    share a hash, and an empty `params` hashes like the same defaults written out (docs/plan-spec.md).
    """
    precision = schema_version >= PRECISION_SCHEMA_VERSION
    content = {
        "schema_version": schema_version,
        "fingerprint": fingerprint,
        "layers": [
            {
                "layer": lp["layer"],
                "policy": lp["policy"],
                "budget": lp["budget"],
                **({"bits": lp.get("bits", FULL_PRECISION)} if precision else {}),
                "params": complete_params(lp["policy"], lp.get("params", {})),
            }
            for lp in layers
        ],
    }
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()[:16]


def describe_fingerprint(fp: dict) -> str:
    """One-line human summary of a fingerprint, for error messages and `plan show`."""
    heads = sorted(set(fp.get("num_kv_heads") or []))
    dims = sorted(set(fp.get("head_dim") or []))
    sliding = sum("sliding" in t for t in fp.get("layer_types") or [])
    text = f"{fp.get('model_type', '?')}, {fp.get('num_layers', '?')} layers, kv heads {heads}, head dim {dims}"
    return text + (f", {sliding} sliding (window {fp.get('sliding_window')})" if sliding else "")


def check_fingerprint(fp: Any) -> None:
    """Raise PlanError unless `fp` has the fingerprint keys with per-layer lists of the right length."""
    if not isinstance(fp, dict) or any(k not in fp for k in FINGERPRINT_KEYS):
        have = sorted(fp) if isinstance(fp, dict) else type(fp).__name__
        raise PlanError(f"fingerprint needs keys {', '.join(FINGERPRINT_KEYS)} (got {have}); take it from the model")
    n = fp["num_layers"]
    for key in ("num_kv_heads", "head_dim", "layer_types"):
        if not isinstance(fp[key], list) or len(fp[key]) != n:
            raise PlanError(f"fingerprint {key} must list one value per layer ({n}); regenerate the fingerprint")


@dataclass(frozen=True)
class CostModel:
    """What a budget costs on each layer, in the plan's unit (see the module docstring).

    `per_token` is the cost of one 16-bit token per KV head; `geometry` the (num_kv_heads, head_dim) of each layer,
    which prices the layers below 16 bits (`polykv.precision.kv_bytes`; only in unit "bytes").
    """

    unit: str
    per_token: tuple[int, ...]
    caps: tuple[int | None, ...]
    geometry: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_fingerprint(cls, fp: dict, precision: bool = False) -> CostModel:
        """The cost model of a plan for `fp`: of schema_version 1, or with `precision` of schema_version 2 (bytes
        whatever the geometry, so that layers may differ in bits)."""
        check_fingerprint(fp)
        n = fp["num_layers"]
        window = fp["sliding_window"]
        caps = tuple(reach(window) if ("sliding" in t and window) else None for t in fp["layer_types"])
        geometry = tuple((int(h), int(d)) for h, d in zip(fp["num_kv_heads"], fp["head_dim"], strict=True))
        if not precision and len(set(geometry)) == 1 and all(c is None for c in caps):
            return cls("tokens", (1,) * n, caps, geometry)
        per_token = tuple(kv_bytes(1, h, d, FULL_PRECISION) for h, d in geometry)
        return cls("bytes", per_token, caps, geometry)

    @property
    def num_layers(self) -> int:
        return len(self.per_token)

    def effective(self, layer: int, budget: int) -> int:
        """Tokens the layer actually holds at `budget` (sliding layers stop at window - 1, `polykv.sliding`)."""
        cap = self.caps[layer]
        return budget if cap is None else min(budget, cap)

    def cost(self, layer: int, budget: int, bits: int = FULL_PRECISION) -> int:
        """Cost of `budget` tokens on `layer` at `bits` (below 16 only in unit "bytes": a schema_version 2 plan)."""
        if bits == FULL_PRECISION:
            return self.per_token[layer] * self.effective(layer, budget)
        if self.unit != "bytes":
            raise PlanError(f"layer {layer} at {bits} bits needs a cost in bytes (a plan of schema_version 2)")
        heads, dim = self.geometry[layer]
        return kv_bytes(self.effective(layer, budget), heads, dim, bits)

    def total(self, average_budget: float) -> int:
        """The bound for a plan at `average_budget`: the cost of the uniform plan at that budget (rounded down)."""
        return sum(
            math.floor(p * (average_budget if c is None else min(average_budget, c)))
            for p, c in zip(self.per_token, self.caps, strict=True)
        )


@dataclass(frozen=True)
class LayerPlan:
    """One layer's setting: keep `budget` tokens per KV head chosen by `policy` with `params`, stored at `bits`.

    `params` always holds the policy's full parameter set: parameters left out (an empty dict) get their defaults
    from the policy-parameter schema, so a plan never depends on the code's defaults of the day. `bits` is the
    cache's precision: 16 (the model's dtype) or 8, 4, 2 (quantised, `polykv.precision`).
    """

    layer: int
    policy: str
    budget: int
    params: dict
    predicted_loss: float | None = None
    bits: int = FULL_PRECISION

    def __post_init__(self) -> None:
        if not supported(self.bits):
            raise PlanError(f"layer {self.layer}: bits must be {describe_supported()}, got {self.bits!r}")
        object.__setattr__(self, "params", complete_params(self.policy, self.params))


def schema_version_for(layers: list[LayerPlan]) -> int:
    """The version a plan with these layers is written as: 1 when every layer is at 16 bits, else 2."""
    return PRECISION_SCHEMA_VERSION if any(lp.bits != FULL_PRECISION for lp in layers) else SCHEMA_VERSION


def _round(x: float | None) -> float | None:
    """Stable float formatting: 12 significant digits, so summation-order noise does not change the file."""
    return None if x is None else float(f"{x:.12g}")


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _canonical(value: Any) -> Any:
    """Recursively sort dict keys (free-form dicts are written sorted)."""
    if isinstance(value, dict):
        return {str(k): _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _dump(value: Any, indent: int) -> str:
    """JSON with 2-space indents where lists of scalars (per-layer values) stay on one line."""
    pad = " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + _dump(v, indent + 2) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(", ", ": "))


@cache
def plan_schema() -> dict:
    """The plan JSON Schema shipped in the package (polykv/schema/plan.schema.json)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def polykv_version() -> str:
    """Installed polykv version (recorded in plan provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polykv")
    except PackageNotFoundError:
        return "unknown"


def _known_policies() -> list[str]:
    from polykv.policies import policy_names

    return policy_names()


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class Plan:
    """A whole-model plan; see docs/plan-format.md for the file format field by field."""

    schema_version: int
    model: str
    fingerprint: dict
    average_budget: float
    total_budget: int
    budget_unit: str
    layers: list[LayerPlan]
    predicted_loss: float | None
    provenance: dict = field(default_factory=dict)
    #: the serving engine the plan was solved for (`polykv solve --target`): {"engine", "reference_context",
    #: "max_windows"}; None for plans any runtime of PolyKV's own applies (and for every plan written before)
    target: dict | None = None

    @property
    def cost_model(self) -> CostModel:
        return CostModel.for_fingerprint(self.fingerprint, self.schema_version >= PRECISION_SCHEMA_VERSION)

    @property
    def used_budget(self) -> int:
        """Summed cost of the layers in budget_unit."""
        cm = self.cost_model
        return sum(cm.cost(lp.layer, lp.budget, lp.bits) for lp in self.layers)

    @property
    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint)

    @property
    def plan_hash(self) -> str:
        """See `plan_hash`: the same for every plan that compresses this model the same way."""
        layers = [
            {"layer": lp.layer, "policy": lp.policy, "budget": lp.budget, "bits": lp.bits, "params": lp.params}
            for lp in self.layers
        ]
        return plan_hash(layers, self.fingerprint, self.schema_version)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict in the file's key order (derived fields included); `bits` only in version 2."""
        check_fingerprint(self.fingerprint)
        precision = self.schema_version >= PRECISION_SCHEMA_VERSION
        if not precision and schema_version_for(self.layers) != self.schema_version:
            raise PlanError(
                f"layers below 16 bits need plan schema_version {PRECISION_SCHEMA_VERSION}, "
                f"not {self.schema_version}; build the plan with schema_version_for(layers)"
            )
        avg = float(self.average_budget)
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "fingerprint_hash": self.fingerprint_hash,
            "budget_unit": self.budget_unit,
            "average_budget": int(avg) if avg.is_integer() else _round(avg),
            "total_budget": int(self.total_budget),
            "used_budget": self.used_budget,
            "predicted_loss": _round(self.predicted_loss),
            "layers": [
                {
                    "layer": int(lp.layer),
                    "policy": lp.policy,
                    "budget": int(lp.budget),
                    **({"bits": int(lp.bits)} if precision else {}),
                    "params": _canonical(lp.params),
                    "predicted_loss": _round(lp.predicted_loss),
                }
                for lp in self.layers
            ],
            "fingerprint": _canonical(self.fingerprint),
            "provenance": _canonical(self.provenance),
            **({"target": _canonical(self.target)} if self.target is not None else {}),
        }

    def to_json(self) -> str:
        """Deterministic text: fixed top-level order, one line per layer, sorted nested dicts, trailing newline."""
        d = self.to_dict()
        parts = []
        for key, value in d.items():
            if key == "layers":
                rows = ",\n".join("    " + json.dumps(row, ensure_ascii=True, allow_nan=False) for row in value)
                parts.append(f'  "layers": [\n{rows}\n  ]')
            else:
                parts.append(f"  {json.dumps(key)}: {_dump(value, 2)}")
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def validate(self, check_policies: bool = True) -> None:
        """Raise PlanError unless the plan matches the schema and is consistent with its fingerprint and budget.

        `check_policies` also rejects policy names the registry (polykv.policies) does not know; it imports the
        registry (and so torch), which the solver avoids.
        """
        _validate_dict(self.to_dict(), check_policies)

    @classmethod
    def from_dict(cls, d: Any, check_policies: bool = True) -> Plan:
        """Build and validate a plan from its JSON dict (as loaded from a file)."""
        _validate_dict(d, check_policies)
        return cls(
            schema_version=d["schema_version"],
            model=d["model"],
            fingerprint=d["fingerprint"],
            average_budget=float(d["average_budget"]),
            total_budget=d["total_budget"],
            budget_unit=d["budget_unit"],
            layers=[
                LayerPlan(
                    layer["layer"],
                    layer["policy"],
                    layer["budget"],
                    dict(layer["params"]),
                    _float(layer.get("predicted_loss")),
                    layer.get("bits", FULL_PRECISION),
                )
                for layer in d["layers"]
            ],
            predicted_loss=_float(d["predicted_loss"]),
            provenance=d["provenance"],
            target=d.get("target"),
        )

    @classmethod
    def load(cls, path: str | Path, check_policies: bool = True) -> Plan:
        """Read and validate a plan file; PlanError (naming the file) on any problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; check the path or run `polykv solve`") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot read plan file {path} ({exc}); check the path") from exc
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {path} is not valid JSON ({exc.msg} at line {exc.lineno}); regenerate it") from None
        except ValueError as exc:
            raise PlanError(f"plan {path} is not valid JSON ({exc}); regenerate it") from None
        try:
            return cls.from_dict(data, check_policies)
        except PlanError as exc:
            raise type(exc)(f"plan {path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Validate (schema and budget, not the policy registry) and write atomically (temp file + os.replace)."""
        self.validate(check_policies=False)
        atomic_write_text(path, self.to_json())

    def check_model(self, fingerprint: dict, model: str | None = None) -> None:
        """Raise PlanMismatchError (naming both models and fingerprints) unless the plan was made for `fingerprint`."""
        mine, theirs = self.fingerprint_hash, fingerprint_hash(fingerprint)
        if mine != theirs:
            other = model or fingerprint.get("model_type", "?")
            raise PlanMismatchError(
                f"plan was solved for {self.model} (fingerprint {mine}: {describe_fingerprint(self.fingerprint)}) "
                f"but the model is {other} (fingerprint {theirs}: {describe_fingerprint(fingerprint)}); "
                "calibrate and solve a plan for this model"
            )


def _non_finite(value: Any, where: str = "") -> tuple[str, Any] | None:
    """(path, value) of the first NaN, infinity or number beyond a double (json reads 1e400 as inf), else None."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if math.isfinite(value):
                    return None
            except OverflowError:
                pass
            return where, value
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _validate_dict(d: Any, check_policies: bool) -> None:
    import jsonschema

    if not isinstance(d, dict):
        raise PlanError(f"a plan is a JSON object, got {type(d).__name__}; regenerate it with `polykv solve`")
    version = d.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version not in SCHEMA_VERSIONS:
        raise PlanError(
            f"plan schema_version {version} is not supported (this polykv reads "
            f"{' and '.join(map(str, SCHEMA_VERSIONS))}); use a matching polykv or re-solve the plan"
        )
    bad = _non_finite(d)
    if bad is not None:
        where, value = bad
        shown = value if isinstance(value, float) else "an integer beyond a double"
        raise PlanError(f"{where or 'top level'} holds {shown}, not a finite JSON number; fix or regenerate the plan")
    precision = version == PRECISION_SCHEMA_VERSION
    _check_bits(d.get("layers"), precision)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(plan_schema()).iter_errors(d))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise PlanError(f"does not match the plan schema at {where}: {error.message}; fix or regenerate the plan")
    fp = d["fingerprint"]
    check_fingerprint(fp)
    n = fp["num_layers"]
    if "fingerprint_hash" in d and not fingerprint_hash_matches(fp, d["fingerprint_hash"]):
        try:
            expected = fingerprint_hash(fp)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"fingerprint cannot be hashed ({exc}); regenerate the fingerprint") from None
        raise PlanError(
            f"fingerprint_hash {d['fingerprint_hash']} does not match the fingerprint "
            f"({expected}); the fingerprint was edited, regenerate the plan"
        )
    layers = d["layers"]
    if len(layers) != n:
        raise PlanError(f"plan has {len(layers)} layers but its fingerprint has {n}; regenerate the plan")
    for i, lp in enumerate(layers):
        if lp["layer"] != i:
            raise PlanError(f"layers[{i}] has layer {lp['layer']}; layers must be listed in order 0..{n - 1}")
        problem = params_problem(lp["policy"], lp["params"])
        if problem is not None:
            raise PlanError(f"layers/{i}: {problem}; fix the parameters or re-solve the plan")
    cm = CostModel.for_fingerprint(fp, precision)
    if d["budget_unit"] != cm.unit:
        needs = "a schema_version 2 plan (per-layer bits) needs" if precision else "this model's geometry needs"
        raise PlanError(f"budget_unit is {d['budget_unit']!r} but {needs} {cm.unit!r}; regenerate the plan")
    used = sum(cm.cost(i, lp["budget"], lp.get("bits", FULL_PRECISION)) for i, lp in enumerate(layers))
    if used > d["total_budget"]:
        raise PlanError(
            f"layers cost {used} {cm.unit}, over total_budget {d['total_budget']}; lower some budgets or re-solve"
        )
    if "used_budget" in d and d["used_budget"] != used:
        raise PlanError(
            f"used_budget {d['used_budget']} does not match the layers ({used} {cm.unit}); regenerate the plan"
        )
    target = d.get("target")
    if target is not None and any(lp.get("bits", FULL_PRECISION) != FULL_PRECISION for lp in layers):
        raise PlanError(
            f"the plan names target {target['engine']}, whose layers run at 16 bits, but some layers are below 16 "
            "bits; drop its target or re-solve it with `polykv solve --target`"
        )
    if target is not None:
        from polykv.engines import shape_problems

        rows = [LayerPlan(lp["layer"], lp["policy"], lp["budget"], dict(lp["params"])) for lp in layers]
        problems = shape_problems(
            target["engine"], SimpleNamespace(fingerprint=fp, layers=rows), target.get("max_windows")
        )
        if problems:
            raise PlanError(
                f"the plan names target {target['engine']} but {'; '.join(problems)}; re-solve it with "
                f"`polykv solve --target {target['engine']}` or drop its target"
            )
    if check_policies:
        known = _known_policies()
        unknown = sorted({lp["policy"] for lp in layers} - set(known))
        if unknown:
            raise PlanError(
                f"unknown polic{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; known: {', '.join(known)}"
            )


def _check_bits(layers: Any, precision: bool) -> None:
    """PlanError for a `bits` key in a version-1 plan or an unsupported width (before the schema, whose message for
    these would be less direct)."""
    if not isinstance(layers, list):
        return
    for i, lp in enumerate(layers):
        if not isinstance(lp, dict) or "bits" not in lp:
            continue
        if not precision:
            raise PlanError(
                f"layers/{i} has bits, which needs schema_version {PRECISION_SCHEMA_VERSION}; set the plan's "
                f"schema_version to {PRECISION_SCHEMA_VERSION} (and budget_unit to bytes) or drop the bits"
            )
        if not supported(lp["bits"]):
            raise PlanError(f"layers/{i}: bits {lp['bits']!r} is not supported; use {describe_supported()}")


def uniform_plan(model: str, fingerprint: dict, policy: str, budget: int, params: dict | None = None) -> Plan:
    """The same policy and budget on every layer (sliding layers capped at window - 1): the usual baseline."""
    cm = CostModel.for_fingerprint(fingerprint)
    if budget < 1:
        raise PlanError(f"budget must be >= 1 token, got {budget}")
    layers = [LayerPlan(i, policy, cm.effective(i, budget), dict(params or {})) for i in range(cm.num_layers)]
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=model,
        fingerprint=fingerprint,
        average_budget=float(budget),
        total_budget=cm.total(budget),
        budget_unit=cm.unit,
        layers=layers,
        predicted_loss=None,
        provenance={"polykv_version": polykv_version(), "solver": "uniform"},
    )
