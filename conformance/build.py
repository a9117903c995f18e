"""Build the conformance vectors: `python conformance/build.py` writes conformance/vectors/<policy>.json.

Each case is a tiny prefill (context 8-40, 1-2 KV heads, head dim 4) whose inputs are multiples of 0.5 in [-2, 2]
(exact in every float format), drawn from Python's `random` seeded by the case name, so the inputs never change.
The expected kept indices come from PolyKV itself (`polykv.conformance.kept_indices`, the compression path).

A vector is only useful to another runtime if float rounding cannot flip it, so every case is checked here (`robust`):
a case designed around a tie (`ties=True`: protected tokens, padding, or inputs that make scores identical by
construction) must really be decided by the tie-breaking rule; any other case must keep the same tokens when all
its inputs are perturbed by up to `NOISE`, else its inputs are redrawn. `--check` rebuilds in memory and exits 1 if
the stored files differ (run it after changing a policy; see conformance/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polykv.conformance import boundary_ties, kept_indices, ranked
from polykv.policies import make_policy, policy_names

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
FORMAT = 1
DIM = 4
SCALING = 0.5  # 1 / sqrt(DIM), the usual softmax scaling
NOISE = 1e-3  # perturbation of every input when checking that no near-tie decides a case
PERTURBATIONS = 4
ATTEMPTS = 50


@dataclass(frozen=True)
class Spec:
    """One case to build: the prefill's shape and options; `inputs` may pin keys/values/queries by construction."""

    name: str
    budget: int
    tokens: int = 16
    kv_heads: int = 2
    groups: int = 2
    params: dict[str, Any] = field(default_factory=dict)
    padding: int = 0
    layer: int = 0
    softcap: float | None = None
    sliding_window: int | None = None
    ties: bool = False
    inputs: str = "random"  # "random", "zero_keys" (every key 0), "norm_classes" (keys in three norm classes)


def grid(rng: random.Random, *shape: int) -> list:
    """Nested lists of multiples of 0.5 in [-2, 2]."""
    if len(shape) == 1:
        return [rng.randint(-4, 4) / 2 for _ in range(shape[0])]
    return [grid(rng, *shape[1:]) for _ in range(shape[0])]


def signed_permutation(rng: random.Random, base: list[float]) -> list[float]:
    """`base` with its components shuffled and their signs flipped at random: the same L2 norm, computed exactly."""
    out = [x * rng.choice((-1, 1)) for x in base]
    rng.shuffle(out)
    return out


def inputs(spec: Spec, rng: random.Random) -> dict[str, list]:
    t, hkv, hq = spec.tokens, spec.kv_heads, spec.kv_heads * spec.groups
    keys, values, queries = grid(rng, hkv, t, DIM), grid(rng, hkv, t, DIM), grid(rng, hq, t, DIM)
    if spec.inputs == "zero_keys":  # every logit 0: each query attends uniformly; values share one norm
        keys = [[[0.0] * DIM for _ in range(t)] for _ in range(hkv)]
        values = [[signed_permutation(rng, [1.0, 0.5, -1.5, 2.0]) for _ in range(t)] for _ in range(hkv)]
    elif spec.inputs == "norm_classes":  # norms^2 of 1.25, 5.25 and 9 only: ties within a class are exact
        classes = ([1.0, 0.5, 0.0, 0.0], [2.0, 1.0, 0.0, 0.5], [2.0, 2.0, 0.0, 1.0])
        keys = [[signed_permutation(rng, classes[rng.choice((0, 1, 1, 1, 2))]) for _ in range(t)] for _ in range(hkv)]
    return {"keys": keys, "values": values, "queries": queries}


def make_case(policy: str, spec: Spec, attempt: int) -> dict[str, Any]:
    rng = random.Random(f"{policy}/{spec.name}/{attempt}")
    return {
        "name": f"{policy}/{spec.name}",
        "tags": [],
        "policy": policy,
        "params": make_policy(policy, spec.params).params(),
        "budget": spec.budget,
        "layer": spec.layer,
        "padding": spec.padding,
        "scaling": SCALING,
        "softcap": spec.softcap,
        "sliding_window": spec.sliding_window,
        **inputs(spec, rng),
    }


def perturbed(case: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The case with every key, value and query moved by up to `NOISE` (far above any float32 rounding)."""

    def move(x):
        return [move(v) for v in x] if isinstance(x, list) else x + rng.uniform(-NOISE, NOISE)

    return {**case, **{k: move(case[k]) for k in ("keys", "values", "queries")}}


def robust(case: dict[str, Any], ties: bool) -> bool:
    """Whether float rounding cannot change the case's kept set.

    A designed tie (`ties`) must really decide the kept set: it rests on exact equality (protected or padding
    tokens, identical inputs), which any runtime reproduces. Any other case must keep the same tokens when its
    inputs are perturbed, so no near-tie decides it (ties between copies of one value, as max pooling makes, stay
    exact under perturbation and are fine).
    """
    if ranked(case) is None:  # everything is kept
        return True
    if ties:
        return any(boundary_ties(case))
    expected = kept_indices(case)
    rng = random.Random(case["name"])
    return all(kept_indices(perturbed(case, rng)) == expected for _ in range(PERTURBATIONS))


def tags(case: dict[str, Any]) -> list[str]:
    """What a case exercises (checked by tests/test_conformance.py)."""
    tokens = len(case["keys"][0])
    out = []
    if len(case["queries"]) > len(case["keys"]):
        out.append("gqa")
    if case["budget"] >= tokens:
        out.append("budget_ge_context")
    if any(boundary_ties(case)) or (case["policy"] == "full" and case["budget"] < tokens):
        out.append("ties")
    for key, tag in (("padding", "padding"), ("softcap", "softcap"), ("sliding_window", "sliding")):
        if case[key]:
            out.append(tag)
    return out


def build_case(policy: str, spec: Spec) -> dict[str, Any]:
    for attempt in range(ATTEMPTS):
        case = make_case(policy, spec, attempt)
        if robust(case, spec.ties):
            case["tags"] = tags(case)
            found = ranked(case)
            case["expected"] = {
                "kept": kept_indices(case),
                "scores": None if found is None else [[_score(x) for x in row] for row in found[1].tolist()],
            }
            return case
    raise SystemExit(f"{policy}/{spec.name}: no robust inputs in {ATTEMPTS} draws; change the spec")


def _score(x: float) -> float | str:
    """Scores as stored: 7 significant digits (fp32), infinities as the strings "+inf" / "-inf"."""
    if x in (float("inf"), float("-inf")):
        return "+inf" if x > 0 else "-inf"
    return float(f"{x:.7g}")


def common(params: dict[str, Any], attention: bool) -> list[Spec]:
    """The cases every policy gets: GQA and not, budget at and above the context, left padding (and padding
    ties: fewer real tokens than the budget), a sliding layer, and soft-capping for attention-based policies."""
    specs = [
        Spec("gqa2", 6, tokens=16, kv_heads=2, groups=2, params=params),
        Spec("mha", 5, tokens=12, kv_heads=1, groups=1, params=params),
        Spec("gqa3", 7, tokens=20, kv_heads=1, groups=3, params=params, layer=3),
        Spec("budget_eq_context", 10, tokens=10, params=params, padding=2),
        Spec("budget_gt_context", 32, tokens=9, kv_heads=1, groups=2, params=params),
        Spec("padding", 8, tokens=14, params=params, padding=4),
        Spec("padding_ties", 9, tokens=12, params=params, padding=6, ties=True),
        Spec("sliding", 4, tokens=16, params=params, sliding_window=7, padding=1),
        Spec("sliding_budget_ge_reach", 6, tokens=16, kv_heads=1, params=params, sliding_window=7),
    ]
    if attention:
        specs.append(Spec("softcap", 6, tokens=16, params=params, softcap=2.0))
    return specs


def specs(policy: str) -> list[Spec]:
    """Every case of `policy`: the common ones plus the policy's own edge cases."""
    if policy == "full":
        return common({}, False) + [Spec("ties_all_protected", 3, tokens=8, ties=True)]
    if policy == "streaming":
        small = {"sinks": 2}
        return common(small, False) + [
            Spec("default_sinks", 9, tokens=24),
            Spec("budget_below_sinks", 3, tokens=12, params={"sinks": 4}, padding=2),
            Spec("budget_equals_sinks", 4, tokens=12, kv_heads=1, params={"sinks": 4}),
            Spec("no_sinks", 5, tokens=10, kv_heads=1, params={"sinks": 0}, padding=3),
            Spec("sinks_beyond_real_tokens", 7, tokens=10, kv_heads=1, params={"sinks": 6}, padding=6, ties=True),
        ]
    if policy == "snapkv":
        small = {"window": 4, "kernel": 3}
        return common(small, True) + [
            Spec("defaults_long", 36, tokens=40, kv_heads=1, groups=2),
            Spec("defaults_window_beyond_context", 8, tokens=20, kv_heads=1, ties=True),
            Spec("window_ties", 3, tokens=16, params={"window": 6, "kernel": 3}, ties=True),
            Spec("max_pooling", 7, tokens=18, params={"window": 4, "kernel": 3, "pooling": "max"}),
            Spec("even_kernel", 7, tokens=18, params={"window": 4, "kernel": 4}),
            Spec("even_kernel_max", 7, tokens=18, params={"window": 4, "kernel": 2, "pooling": "max"}),
            Spec("no_pooling", 6, tokens=14, params={"window": 3, "kernel": 1}),
            Spec("kernel_beyond_prefix", 6, tokens=10, kv_heads=1, params={"window": 5, "kernel": 7}, padding=1),
            Spec("padding_in_pool", 7, tokens=16, params={"window": 4, "kernel": 5}, padding=3),
            Spec(
                "zero_keys_ties",
                7,
                tokens=16,
                params={"window": 4, "kernel": 3, "pooling": "max"},
                ties=True,
                inputs="zero_keys",
            ),
        ]
    if policy == "h2o":
        return common({}, True) + [
            Spec("quarter_recent", 8, tokens=24, params={"recent_fraction": 0.25}),
            Spec("no_recent", 5, tokens=16, params={"recent_fraction": 0.0}, padding=2),
            Spec("all_recent", 5, tokens=16, kv_heads=1, params={"recent_fraction": 1.0}),
            Spec("odd_budget_floor", 7, tokens=20, params={"recent_fraction": 0.5}),
            Spec("long", 12, tokens=40, kv_heads=1, groups=2),
        ]
    if policy == "tova":
        return common({}, True) + [
            Spec("zero_keys_ties", 5, tokens=12, ties=True, inputs="zero_keys"),
            Spec("zero_keys_ties_padding", 5, tokens=12, kv_heads=1, padding=3, ties=True, inputs="zero_keys"),
        ]
    if policy == "knorm":
        return common({}, False) + [
            Spec("norm_class_ties", 5, tokens=14, ties=True, inputs="norm_classes"),
            Spec("norm_class_ties_gqa", 6, tokens=16, kv_heads=1, groups=4, ties=True, inputs="norm_classes"),
        ]
    if policy == "random":
        return common({}, False) + [
            Spec("seed_1_layer_0", 6, tokens=16, params={"seed": 1}),
            Spec("seed_12345_layer_7", 9, tokens=24, kv_heads=1, params={"seed": 12345}, layer=7),
            Spec("seed_0_layer_2_padding", 6, tokens=16, params={"seed": 0}, layer=2, padding=5),
        ]
    if policy == "expected_attention":
        small = {"window": 4}
        return common(small, True) + [
            Spec("defaults_long", 36, tokens=40, kv_heads=1, groups=2),
            Spec("no_keep_window", 5, tokens=16, params={"window": 6, "keep_window": False}),
            Spec("window_ties", 3, tokens=16, params={"window": 6}, ties=True),
            Spec("padding_in_window", 3, tokens=14, params={"window": 8, "keep_window": False}, padding=8),
            Spec("window_beyond_context", 6, tokens=10, kv_heads=1, params={"window": 32}, ties=True),
            Spec(
                "zero_keys_ties",
                5,
                tokens=14,
                params={"window": 4, "keep_window": False},
                ties=True,
                inputs="zero_keys",
            ),
        ]
    if policy == "snapkv_forward":
        small = {"window": 4, "span": 3}
        return common(small, True) + [
            Spec("defaults_long", 36, tokens=40, kv_heads=1, groups=2),
            Spec("window_ties", 3, tokens=16, params={"window": 6, "span": 3}, ties=True),
            Spec("span_1", 6, tokens=14, params={"window": 3, "span": 1}),
            Spec("span_beyond_prefix", 6, tokens=12, kv_heads=1, params={"window": 4, "span": 12}, padding=2),
            Spec("zero_keys_ties", 7, tokens=16, params={"window": 4, "span": 3}, ties=True, inputs="zero_keys"),
        ]
    if policy == "window":  # budget = window + sinks; window 0 means budget - sinks
        return common({}, False) + [
            Spec("sinks_2", 8, tokens=16, params={"sinks": 2}),
            Spec("explicit_window", 8, tokens=16, kv_heads=1, params={"window": 5, "sinks": 3}),
            Spec("sinks_with_padding", 6, tokens=14, params={"sinks": 2}, padding=4),
            Spec("window_1", 3, tokens=10, kv_heads=1, params={"window": 1, "sinks": 2}),
            Spec("sliding_layer_clips_window", 12, tokens=20, params={"sinks": 2}, sliding_window=7),
            Spec("window_equals_context", 10, tokens=10, kv_heads=1, groups=3),
        ]
    raise SystemExit(f"no conformance cases for policy {policy!r}: add them to specs() in {__file__}")


def render(policy: str, cases: list[dict[str, Any]]) -> str:
    """One vectors file: a case per block, one key per line, lists on one line (deterministic bytes)."""
    blocks = []
    for case in cases:
        lines = [f"   {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in case.items()]
        blocks.append("  {\n" + ",\n".join(lines) + "\n  }")
    head = f'{{\n "format": {FORMAT},\n "policy": {json.dumps(policy)},\n "cases": [\n'
    return head + ",\n".join(blocks) + "\n ]\n}\n"


def build() -> dict[Path, str]:
    return {VECTORS / f"{p}.json": render(p, [build_case(p, s) for s in specs(p)]) for p in policy_names()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored vectors instead of writing them")
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        stale = [p.name for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        stale += sorted(p.name for p in VECTORS.glob("*.json") if p not in files)
        print(f"stale vectors: {', '.join(stale)}" if stale else "vectors are up to date")
        return 1 if stale else 0
    VECTORS.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    print(f"wrote {sum(t.count(chr(10) + '  {') for t in files.values())} cases to {VECTORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
