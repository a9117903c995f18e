"""docs/plan-spec.md as plain Python: every policy's scores and the selection rule, without torch or numpy.

This is a second implementation, written from the specification rather than from PolyKV's tensor code, so that
tests/test_conformance.py can check the specification itself against the vectors: another runtime can read it as
executable pseudo-code. It works on one sequence (one row of a batch) in float64; the vectors are built so that
float rounding never changes a kept set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

INF = math.inf

Vector = list[float]


@dataclass(frozen=True)
class Layer:
    """One layer's prefill for one sequence: keys/values [Hkv][T][D], queries [Hq][T][D] (every prompt position),
    valid[t] (False on left padding), the softmax scaling, the logit soft-cap and sliding window (or None)."""

    index: int
    keys: list[list[Vector]]
    values: list[list[Vector]]
    queries: list[list[Vector]]
    valid: list[bool]
    scaling: float
    softcap: float | None
    sliding_window: int | None
    #: cumulative attention [Hkv][T] of the whole prompt, carried into a sliding layer's view (section 4.3)
    cumulative: list[Vector] | None = None

    @property
    def tokens(self) -> int:
        return len(self.valid)

    @property
    def group(self) -> int:
        return len(self.queries) // len(self.keys)

    def heads_of(self, k: int) -> range:
        """Query heads served by KV head k (spec 3.1): k*G .. k*G + G - 1."""
        return range(k * self.group, (k + 1) * self.group)


def dot(a: Vector, b: Vector) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def norm(a: Vector) -> float:
    return math.sqrt(sum(x * x for x in a))


def logit(layer: Layer, q: Vector, k: Vector) -> float:
    """Spec 3.2: s q.k, soft-capped to c tanh(s q.k / c) when a soft-cap c is set."""
    z = layer.scaling * dot(q, k)
    return layer.softcap * math.tanh(z / layer.softcap) if layer.softcap else z


def softmax_row(layer: Layer, h: int, i: int, visible: list[int]) -> dict[int, float]:
    k = h // layer.group
    z = {j: logit(layer, layer.queries[h][i], layer.keys[k][j]) for j in visible}
    top = max(z.values())
    e = {j: math.exp(v - top) for j, v in z.items()}
    total = sum(e.values())
    return {j: v / total for j, v in e.items()}


def window_attention(layer: Layer, window: int) -> list[Vector]:
    """Spec 3.3: A_w[k][j], the causal attention of the last w = min(window, T) rows, summed over rows and group."""
    t_len = layer.tokens
    w = min(window, t_len)
    out = [[0.0] * t_len for _ in layer.keys]
    for k in range(len(layer.keys)):
        for h in layer.heads_of(k):
            for i in range(t_len - w, t_len):
                visible = [j for j in range(i + 1) if layer.valid[j]]
                if visible:
                    for j, p in softmax_row(layer, h, i, visible).items():
                        out[k][j] += p
    return out


def cumulative_attention(layer: Layer) -> list[Vector]:
    """Spec 3.4: C[k][j], attention from every real prompt row (sliding-window mask on sliding layers)."""
    if layer.cumulative is not None:
        return layer.cumulative
    t_len, ws = layer.tokens, layer.sliding_window
    out = [[0.0] * t_len for _ in layer.keys]
    for k in range(len(layer.keys)):
        for h in layer.heads_of(k):
            for i in range(t_len):
                if not layer.valid[i]:
                    continue
                visible = [j for j in range(i + 1) if layer.valid[j] and (ws is None or j > i - ws)]
                for j, p in softmax_row(layer, h, i, visible).items():
                    out[k][j] += p
    return out


def protect_last(scores: list[Vector], count: int) -> list[Vector]:
    return [[INF if t >= len(row) - count else v for t, v in enumerate(row)] for row in scores]


# --- policies (spec section 5): each returns scores [Hkv][T] -------------------------------------------------------


def full(layer: Layer, params: dict, budget: int) -> list[Vector]:
    return [[INF] * layer.tokens for _ in layer.keys]


def streaming(layer: Layer, params: dict, budget: int) -> list[Vector]:
    t_len = layer.tokens
    rel = [sum(layer.valid[:t]) if layer.valid[t] else -1 for t in range(t_len)]
    row = [float(2 * t_len - rel[t]) if layer.valid[t] and rel[t] < params["sinks"] else float(t) for t in range(t_len)]
    return [list(row) for _ in layer.keys]


def pooled(row: Vector, kernel: int, mode: str) -> Vector:
    """Spec 5.3: the window [t - floor(kernel/2), t - floor(kernel/2) + kernel - 1], clipped to the row."""
    if kernel <= 1:
        return list(row)
    out = []
    for t in range(len(row)):
        lo = t - kernel // 2
        part = [row[j] for j in range(max(lo, 0), min(lo + kernel, len(row)))]
        out.append(max(part) if mode == "max" else sum(part) / len(part))
    return out


def snapkv(layer: Layer, params: dict, budget: int) -> list[Vector]:
    w = min(params["window"], layer.tokens)
    prefix = layer.tokens - w
    rows = window_attention(layer, w)
    rows = [pooled(r[:prefix], params["kernel"], params["pooling"]) + r[prefix:] for r in rows]
    return protect_last(rows, w)


def h2o(layer: Layer, params: dict, budget: int) -> list[Vector]:
    recent = min(math.floor(budget * params["recent_fraction"]), layer.tokens)
    return protect_last(cumulative_attention(layer), recent)


def tova(layer: Layer, params: dict, budget: int) -> list[Vector]:
    return window_attention(layer, 1)


def knorm(layer: Layer, params: dict, budget: int) -> list[Vector]:
    return [[-norm(key) for key in head] for head in layer.keys]


def mt19937(seed: int):
    """The 32-bit Mersenne Twister (init_genrand seeding), as torch's CPU generator."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & 0xFFFFFFFF)
    index = 624
    while True:
        if index == 624:
            for i in range(624):
                y = (state[i] & 0x80000000) | (state[(i + 1) % 624] & 0x7FFFFFFF)
                state[i] = state[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            index = 0
        y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        yield y


def random(layer: Layer, params: dict, budget: int) -> list[Vector]:
    draws = mt19937(params["seed"] * 100_003 + layer.index)
    return [[(next(draws) & 0xFFFFFF) / 2**24 for _ in range(layer.tokens)] for _ in layer.keys]


def expected_attention(layer: Layer, params: dict, budget: int) -> list[Vector]:
    t_len, s = layer.tokens, layer.scaling
    w = min(params["window"], t_len)
    real = [i for i in range(t_len - w, t_len) if layer.valid[i]]
    out = []
    for k, keys in enumerate(layer.keys):
        total = [0.0] * t_len
        for h in layer.heads_of(k):
            rows = [layer.queries[h][i] for i in real]
            count = max(len(rows), 1)
            dim = len(keys[0])
            mu = [sum(r[d] for r in rows) / count for d in range(dim)]
            var = [sum((r[d] - mu[d]) ** 2 for r in rows) / count for d in range(dim)]
            e = [
                s * dot(mu, key) + 0.5 * s * s * sum(v * x * x for v, x in zip(var, key, strict=True))
                if layer.valid[t]
                else -INF
                for t, key in enumerate(keys)
            ]
            top = max(e)
            ex = [math.exp(x - top) for x in e]
            z = sum(ex)
            total = [a + b / z for a, b in zip(total, ex, strict=True)]
        out.append([p * norm(v) for p, v in zip(total, layer.values[k], strict=True)])
    return protect_last(out, w) if params["keep_window"] else out


def snapkv_forward(layer: Layer, params: dict, budget: int) -> list[Vector]:
    w, span = min(params["window"], layer.tokens), params["span"]
    rows = [[max([0.0] + r[max(t - span + 1, 0) : t + 1]) for t in range(len(r))] for r in window_attention(layer, w)]
    return protect_last(rows, w)


def window(layer: Layer, params: dict, budget: int) -> list[Vector]:
    """Spec 5.10: ranked like `streaming` with the policy's sinks (the kept count is `window_span`'s)."""
    return streaming(layer, {"sinks": params["sinks"]}, budget)


def window_span(layer: Layer, params: dict, budget: int) -> int:
    """Spec 5.10: how many tokens a `window` layer keeps after the prefill (ValueError for a budget it cannot fit)."""
    sinks = params["sinks"]
    span = params["window"] or budget - sinks
    if span < 1 or (params["window"] and params["window"] + sinks != budget):
        raise ValueError(f"a window layer's budget is window + sinks; got {params} at budget {budget}")
    if layer.sliding_window is not None:
        span = min(span, max(layer.sliding_window - 1, 1))
    return min(layer.tokens, sinks + span)


POLICIES: dict[str, Callable[[Layer, dict, int], list[Vector]]] = {
    "full": full,
    "streaming": streaming,
    "snapkv": snapkv,
    "h2o": h2o,
    "tova": tova,
    "knorm": knorm,
    "random": random,
    "expected_attention": expected_attention,
    "snapkv_forward": snapkv_forward,
    "window": window,
}


# --- selection (spec section 4) -------------------------------------------------------------------------------------


def select(row: Vector, valid: list[bool], budget: int) -> list[int]:
    """Spec 4.1: padding scores -inf; highest score first, the later token first among equal scores; ascending."""
    masked = [v if ok else -INF for v, ok in zip(row, valid, strict=True)]
    order = sorted(range(len(row)), key=lambda t: (-masked[t], -t))
    return sorted(order[:budget])


def view(layer: Layer) -> tuple[Layer, int]:
    """Spec 4.3: on a sliding layer longer than R = max(window - 1, 1), its last R tokens (and their offset)."""
    if layer.sliding_window is None:
        return layer, 0
    reach = max(layer.sliding_window - 1, 1)
    offset = max(layer.tokens - reach, 0)
    if offset == 0:
        return layer, 0
    cumulative = [row[offset:] for row in cumulative_attention(layer)]
    return (
        Layer(
            layer.index,
            [[x for x in head[offset:]] for head in layer.keys],
            [[x for x in head[offset:]] for head in layer.values],
            [[x for x in head[offset:]] for head in layer.queries],
            layer.valid[offset:],
            layer.scaling,
            layer.softcap,
            None,
            cumulative,
        ),
        offset,
    )


def kept(layer: Layer, policy: str, params: dict, budget: int) -> list[list[int]]:
    """Spec 4.2: the kept token indices per KV head."""
    if budget < 1:
        raise ValueError("budget must be >= 1")
    if policy == "window":  # ranks every position (no sliding view) and keeps its span
        count = window_span(layer, params, budget)
        return [select(row, layer.valid, count) for row in window(layer, params, count)]
    seen, offset = view(layer)
    t_len = seen.tokens
    if policy == "full" or budget >= t_len:
        return [list(range(offset, offset + t_len)) for _ in layer.keys]
    scores = POLICIES[policy](seen, params, budget)
    return [[offset + t for t in select(row, seen.valid, budget)] for row in scores]


def kept_for_case(case: dict) -> list[list[int]]:
    """A conformance case (conformance/README.md) through this reference."""
    tokens = len(case["keys"][0])
    layer = Layer(
        case["layer"],
        case["keys"],
        case["values"],
        case["queries"],
        [t >= case["padding"] for t in range(tokens)],
        case["scaling"],
        case["softcap"],
        case["sliding_window"],
    )
    return kept(layer, case["policy"], case["params"], case["budget"])
