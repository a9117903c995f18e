"""Each policy's kept set against a brute-force reference built from the model's own attention probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from polykv.apply import apply
from polykv.compat import output_cache, with_cache
from polykv.policies import make_policy, policy_names

T, BUDGET = 48, 12
#: budgets of the brute-force comparison: below and above the default windows (32), above the tested ones (4, 8)
BUDGETS = (BUDGET, 40)


@dataclass(frozen=True)
class RefLayer:
    """One layer of a plain eager full-cache prefill, in float64: what a brute-force reference scores from."""

    index: int
    probs: torch.Tensor  # (Hq, T, T) attention probabilities
    queries: torch.Tensor  # (Hq, T, D) after RoPE
    keys: torch.Tensor  # (Hkv, T, D) after RoPE
    values: torch.Tensor  # (Hkv, T, D)
    scaling: float

    def heads(self, h: int) -> range:
        """The query heads of KV head h (GQA group)."""
        g = self.probs.shape[0] // self.keys.shape[0]
        return range(h * g, (h + 1) * g)


@pytest.fixture(scope="module")
def reference_run():
    """The tiny model, its prompt and one `RefLayer` per layer, recorded from transformers' own eager attention."""
    from transformers.models.llama import modeling_llama

    model = tiny_llama("eager", seed=3)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(7))
    recorded = {}
    eager = modeling_llama.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        recorded[module.layer_idx] = (query[0], key[0], value[0], weights[0], kwargs["scaling"])
        return out, weights

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama, "eager_attention_forward", recording)
        model(ids, **with_cache(model, DynamicCache()))
    layers = [
        RefLayer(i, w.detach().double(), q.detach().double(), k.detach().double(), v.detach().double(), s)
        for i, (q, k, v, w, s) in sorted(recorded.items())
    ]
    return model, ids, layers


def _window_attention(ref: RefLayer, h: int, window: int) -> list[float]:
    return [sum(float(ref.probs[q, i, j]) for q in ref.heads(h) for i in range(T - window, T)) for j in range(T)]


def ref_full(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    return [math.inf] * T


def ref_streaming(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    """The sinks above every position, the first one highest; then the most recent tokens."""
    return [float(2 * T - j) if j < params.get("sinks", 4) else float(j) for j in range(T)]


def ref_window(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    """After its windowed prefill a window layer holds its sinks (the first ones highest) and its window: the last
    budget - sinks tokens; what it holds does not depend on attention."""
    return ref_streaming(ref, h, {"sinks": params.get("sinks", 0)}, budget)


def ref_snapkv(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    """Window attention pooled over the prefix only (the window's own columns never leak into it)."""
    w, k, pooling = params.get("window", 32), params.get("kernel", 5), params.get("pooling", "avg")
    raw = _window_attention(ref, h, w)
    prefix = T - w
    pooled = []
    for j in range(prefix):
        win = [raw[x] for x in range(j - k // 2, j + k // 2 + 1) if 0 <= x < prefix]
        pooled.append(max(win) if pooling == "max" else sum(win) / len(win))
    return pooled + [math.inf] * w


def ref_snapkv_forward(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    w, span = params.get("window", 32), params.get("span", make_policy("snapkv_forward").span)
    raw = _window_attention(ref, h, w)
    return [math.inf if j >= T - w else max(raw[max(0, j - span + 1) : j + 1]) for j in range(T)]


def ref_h2o(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    recent = int(budget * params.get("recent_fraction", 0.5))
    s = _window_attention(ref, h, T)  # every prompt query
    return [math.inf if j >= T - recent else v for j, v in enumerate(s)]


def ref_tova(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    return _window_attention(ref, h, 1)


def ref_knorm(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    return [-math.sqrt(sum(float(x) ** 2 for x in ref.keys[h, j])) for j in range(T)]


def ref_random(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    """The documented draw: uniform, seeded by (seed, layer), one number per (KV head, token)."""
    gen = torch.Generator().manual_seed(params.get("seed", 0) * 100_003 + ref.index)
    return torch.rand((1, ref.keys.shape[0], T), generator=gen)[0, h].tolist()


def ref_expected_attention(ref: RefLayer, h: int, params: dict, budget: int) -> list[float]:
    """Per query head: a Gaussian (mean, population variance) over the window's queries; key j's expected logit
    s mu.k + s^2/2 sum(var k^2), softmax over keys; summed over the group, times |v_j|; the window protected."""
    w, s = params.get("window", 32), ref.scaling
    keys, dim = ref.keys[h], ref.keys.shape[-1]
    total = [0.0] * T
    for q in ref.heads(h):
        window = [[float(x) for x in ref.queries[q, i]] for i in range(T - w, T)]
        mu = [sum(row[d] for row in window) / w for d in range(dim)]
        var = [sum((row[d] - mu[d]) ** 2 for row in window) / w for d in range(dim)]
        logits = [
            sum(s * mu[d] * float(keys[j, d]) + 0.5 * s * s * var[d] * float(keys[j, d]) ** 2 for d in range(dim))
            for j in range(T)
        ]
        top = max(logits)
        exp = [math.exp(x - top) for x in logits]
        total = [t + e / sum(exp) for t, e in zip(total, exp, strict=True)]
    scores = [t * math.sqrt(sum(float(x) ** 2 for x in ref.values[h, j])) for j, t in enumerate(total)]
    if params.get("keep_window", True):
        scores = [math.inf if j >= T - w else v for j, v in enumerate(scores)]
    return scores


@dataclass(frozen=True)
class Reference:
    """A policy's brute-force scores for one KV head at a budget (math.inf: protected) and the parameter sets tested."""

    scores: Callable[[RefLayer, int, dict, int], list[float]]
    params: tuple[dict, ...] = ({},)
    keeps_all: bool = False  # keeps every token whatever the budget


#: One entry per registered policy (test_every_registered_policy_has_a_reference): how to add a policy is in
#: the docstring of polykv.policies.
REFERENCES: dict[str, Reference] = {
    "full": Reference(ref_full, keeps_all=True),
    "streaming": Reference(ref_streaming, ({}, {"sinks": 2})),
    "snapkv": Reference(ref_snapkv, ({}, {"window": 8}, {"window": 4, "kernel": 3}, {"window": 8, "pooling": "max"})),
    "h2o": Reference(ref_h2o, ({}, {"recent_fraction": 0.25})),
    "tova": Reference(ref_tova),
    "knorm": Reference(ref_knorm),
    "random": Reference(ref_random, ({}, {"seed": 1})),
    "expected_attention": Reference(ref_expected_attention, ({}, {"window": 8}, {"window": 4, "keep_window": False})),
    "snapkv_forward": Reference(ref_snapkv_forward, ({"window": 8}, {"window": 4, "span": 3})),
    "window": Reference(ref_window, ({}, {"sinks": 2})),
}

CASES = [
    (name, params) for name in policy_names() for params in (REFERENCES[name].params if name in REFERENCES else [None])
]


def assert_top_k(kept: list[int], scores: list[float], budget: int, tol: float = 1e-6) -> None:
    """kept must be the top-`budget` by score, ties and near-ties (within tol) broken towards later tokens."""
    ref = sorted(range(len(scores)), key=lambda j: (-scores[j], -j))[:budget]
    if sorted(ref) == sorted(kept):
        return
    threshold = scores[ref[-1]]
    for j in set(ref) ^ set(kept):
        assert abs(scores[j] - threshold) <= tol * max(1.0, abs(threshold)), (j, scores[j], threshold)


def test_every_registered_policy_has_a_reference():
    missing = [n for n in policy_names() if n not in REFERENCES]
    assert not missing, f"add a brute-force reference to REFERENCES in {__file__} for: {', '.join(missing)}"
    assert set(REFERENCES) <= set(policy_names()), "REFERENCES names a policy that is not registered"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_kept_set_matches_brute_force(reference_run, name, params, budget):
    if name not in REFERENCES:
        pytest.fail(f"policy {name!r} has no brute-force reference in REFERENCES")
    model, ids, layers = reference_run
    reference = REFERENCES[name]
    from polykv.settings import LayerSetting

    setting = LayerSetting(make_policy(name, params), budget)
    with apply(model, [setting] * len(layers)):
        cache = output_cache(model(ids))
    kept = T if reference.keeps_all else budget
    for ref, layer in zip(layers, cache.layers, strict=True):
        for h in range(layer.columns.shape[1]):
            assert_top_k(layer.columns[0, h].tolist(), reference.scores(ref, h, params, budget), kept)


def test_random_is_seeded_and_differs_by_seed():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    runs = []
    for seed in (0, 0, 1):
        from polykv.settings import LayerSetting

        with apply(model, [LayerSetting(make_policy("random", {"seed": seed}), BUDGET)] * 3):
            runs.append(output_cache(model(ids)).layers[0].columns.clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_expected_attention_is_deterministic_and_keeps_window():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    cols = []
    for _ in range(2):
        with apply(model, ("expected_attention", BUDGET)):
            cols.append(output_cache(model(ids)).layers[1].columns.clone())
    assert torch.equal(cols[0], cols[1])
    # window 32 > budget 12: the budget goes to the most recent window tokens
    assert cols[0][0, 0].tolist() == list(range(T - BUDGET, T))


def test_protected_window_larger_than_budget_keeps_most_recent():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    with apply(model, ("snapkv", 5)):
        cache = output_cache(model(ids))
    assert cache.layers[0].columns[0, 0].tolist() == list(range(T - 5, T))


def test_unknown_policy_and_parameter_are_clear_errors():
    from polykv.errors import InputError
    from polykv.settings import uniform

    with pytest.raises(InputError, match="unknown policy 'nope'; known policies: full, streaming"):
        uniform("nope", 8, 3)
    with pytest.raises(InputError, match="policy 'snapkv' has no parameter\\(s\\) windw"):
        uniform("snapkv", 8, 3, {"windw": 3})


def test_registry_names():
    assert policy_names() == [
        "full",
        "streaming",
        "snapkv",
        "h2o",
        "tova",
        "knorm",
        "random",
        "expected_attention",
        "snapkv_forward",
        "window",
    ]


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_cumulative_attention_matches_dense_softmax_across_chunks_and_padding(softcap):
    """H2O's chunked in-place sum equals a dense masked softmax summed over queries, with left padding and GQA."""
    from polykv.policies.scoring import cumulative_attention

    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 2, 6, 2, 37, 8
    q, k = torch.randn(b, hq, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded
    logits = q @ k.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2) * 0.3
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    probs = probs * valid[:, None, :, None]
    dense = probs.sum(2).view(b, hkv, hq // hkv, t).sum(2)
    got = cumulative_attention(q, k, 0.3, valid, softcap, chunk=8)  # 5 chunks, the last one ragged
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert got[1, :, :5].abs().max() == 0  # padding receives no attention


def test_snapkv_forward_keeps_what_follows_an_attended_token():
    """One attended token brings the next span - 1 with it; SnapKV's centred pooling would keep 2 before it."""
    from polykv.policies.snapkv_forward import forward_max

    scores = torch.zeros(1, 1, 12)
    scores[0, 0, 3] = 1.0
    out = forward_max(scores, 4)
    assert out[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert torch.equal(forward_max(scores, 1), scores)


def test_snapkv_forward_rejects_bad_span():
    from polykv.errors import InputError
    from polykv.settings import uniform

    with pytest.raises(InputError, match="span >= 1"):
        uniform("snapkv_forward", 8, 3, {"span": 0})


def _observation(keys: torch.Tensor, window_queries: torch.Tensor, valid: torch.Tensor | None = None):
    """A hand-made one-layer observation (B, H, T, D keys; values equal to keys; scaling 1)."""
    from polykv.policies import LayerObservation

    if valid is None:
        valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
    return LayerObservation(0, keys, keys.clone(), window_queries, 1.0, valid)


@pytest.mark.parametrize("pooling,chosen", [("avg", 2), ("max", 3)])
def test_snapkv_pools_the_prefix_only(pooling, chosen):
    """A window column at the boundary that the window attends to most must not lift the last prefix token.

    Pooled over the prefix, token 2 (attended most) wins with avg pooling; max pooling ties 1, 2 and 3 at token 2's
    score and the tie goes to the later token. Pooling across the boundary would keep token 7 instead.
    """
    from polykv.settings import LayerSetting

    tokens, window, dim = 12, 4, 4
    direction = torch.zeros(dim)
    direction[0] = 1.0
    keys = torch.zeros(1, 1, tokens, dim)
    keys[0, 0, 2] = 3.0 * direction  # the prefix token the window attends to
    keys[0, 0, 1] = keys[0, 0, 3] = 1.5 * direction  # its neighbours, so that average pooling centres on it
    keys[0, 0, tokens - window] = 10.0 * direction  # the first window column, next to the boundary
    queries = direction.expand(1, 1, window, dim).clone()
    setting = LayerSetting(make_policy("snapkv", {"window": window, "kernel": 3, "pooling": pooling}), window + 1)
    kept = setting.kept_indices(_observation(keys, queries))[0, 0].tolist()
    assert kept == [chosen, *range(tokens - window, tokens)]


def test_streaming_keeps_the_first_sinks_when_the_budget_is_below_them():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    sinks = 4
    for budget in (1, 2, sinks - 1, sinks, sinks + 2, T, T + 5):
        with apply(model, ("streaming", budget)):
            cache = output_cache(model(ids))
        expected = list(range(min(budget, sinks))) + list(range(T - max(0, min(budget, T) - sinks), T))
        for layer in cache.layers:
            for row in layer.columns[0].tolist():
                assert row == expected, (budget, row)


def test_streaming_sinks_are_the_first_real_tokens_of_a_left_padded_row():
    from polykv.settings import LayerSetting

    tokens, pad = 10, 3
    valid = torch.ones(2, tokens, dtype=torch.bool)
    valid[1, :pad] = False
    obs = _observation(torch.randn(2, 1, tokens, 4), torch.zeros(2, 1, 0, 4), valid)
    # budget: (unpadded row, row whose real tokens start at column 3)
    expected = {1: ([0], [3]), 2: ([0, 1], [3, 4]), 6: ([0, 1, 2, 3, 8, 9], [3, 4, 5, 6, 8, 9])}
    for budget, rows in expected.items():
        kept = LayerSetting(make_policy("streaming", {"sinks": 4}), budget).kept_indices(obs)
        assert (kept[0, 0].tolist(), kept[1, 0].tolist()) == rows


def test_expected_attention_leaves_left_padding_out_of_the_query_gaussian():
    """A left-padded row shorter than the window scores its real tokens as it does alone."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv, dim, real, pad, window = 4, 2, 8, 6, 5, 8
    keys = torch.randn(1, hkv, real, dim, generator=gen)
    queries = torch.randn(1, hq, real, dim, generator=gen)
    alone = _observation(keys, queries)
    padded_keys = torch.cat([100.0 * torch.randn(1, hkv, pad, dim, generator=gen), keys], dim=2)
    padded_queries = torch.cat([100.0 * torch.randn(1, hq, pad, dim, generator=gen), queries], dim=2)
    valid = torch.tensor([[False] * pad + [True] * real])
    padded = _observation(padded_keys, padded_queries, valid)
    policy = make_policy("expected_attention", {"window": window, "keep_window": False})
    torch.testing.assert_close(policy.score(padded, 3)[..., pad:], policy.score(alone, 3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("params", [{"window": 8}, {"window": 8, "keep_window": False}, {}])
def test_expected_attention_matches_brute_force_on_peaked_attention(params):
    """Kept sets at budgets above the window, on keys and queries large enough that the heads of a group differ in
    their softmax normalisers and the variance term moves the ranking (the tiny model's attention is near uniform)."""
    from polykv.settings import LayerSetting

    gen = torch.Generator().manual_seed(1)
    hq, hkv, dim = 6, 2, 16
    queries = torch.randn(hq, T, dim, generator=gen) * torch.tensor([0.5, 1.0, 2.0] * hkv)[:, None, None]
    queries = queries + torch.randn(hq, 1, dim, generator=gen)  # a mean direction per head
    keys = torch.randn(hkv, T, dim, generator=gen) * 1.5
    values = torch.randn(hkv, T, dim, generator=gen).abs() + 0.5
    ref = RefLayer(0, torch.zeros(hq, T, T), queries.double(), keys.double(), values.double(), 0.5)
    obs = _observation(keys[None], queries[None])
    obs = replace(obs, values=values[None], scaling=0.5)
    for budget in (34, 40, 46):
        kept = LayerSetting(make_policy("expected_attention", params), budget).kept_indices(obs)
        for h in range(hkv):
            assert_top_k(kept[0, h].tolist(), ref_expected_attention(ref, h, params, budget), budget)
