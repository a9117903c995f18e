"""Each policy's kept set against a brute-force reference built from the model's own attention probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from polykv.apply import apply
from polykv.compat import output_cache, with_cache
from polykv.policies import make_policy, policy_names

T, BUDGET = 48, 12


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


def ref_full(ref: RefLayer, h: int, params: dict) -> list[float]:
    return [math.inf] * T


def ref_streaming(ref: RefLayer, h: int, params: dict) -> list[float]:
    return [math.inf if j < params.get("sinks", 4) else float(j) for j in range(T)]


def ref_snapkv(ref: RefLayer, h: int, params: dict) -> list[float]:
    w, k = params.get("window", 32), params.get("kernel", 5)
    raw = _window_attention(ref, h, w)
    pooled = []
    for j in range(T):
        win = [raw[x] for x in range(j - k // 2, j + k // 2 + 1) if 0 <= x < T]
        pooled.append(sum(win) / len(win))
    return [math.inf if j >= T - w else pooled[j] for j in range(T)]


def ref_snapkv_forward(ref: RefLayer, h: int, params: dict) -> list[float]:
    w, span = params.get("window", 32), params.get("span", make_policy("snapkv_forward").span)
    raw = _window_attention(ref, h, w)
    return [math.inf if j >= T - w else max(raw[max(0, j - span + 1) : j + 1]) for j in range(T)]


def ref_h2o(ref: RefLayer, h: int, params: dict) -> list[float]:
    recent = int(BUDGET * params.get("recent_fraction", 0.5))
    s = _window_attention(ref, h, T)  # every prompt query
    return [math.inf if j >= T - recent else v for j, v in enumerate(s)]


def ref_tova(ref: RefLayer, h: int, params: dict) -> list[float]:
    return _window_attention(ref, h, 1)


def ref_knorm(ref: RefLayer, h: int, params: dict) -> list[float]:
    return [-math.sqrt(sum(float(x) ** 2 for x in ref.keys[h, j])) for j in range(T)]


def ref_random(ref: RefLayer, h: int, params: dict) -> list[float]:
    """The documented draw: uniform, seeded by (seed, layer), one number per (KV head, token)."""
    gen = torch.Generator().manual_seed(params.get("seed", 0) * 100_003 + ref.index)
    return torch.rand((1, ref.keys.shape[0], T), generator=gen)[0, h].tolist()


def ref_expected_attention(ref: RefLayer, h: int, params: dict) -> list[float]:
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
    """A policy's brute-force scores for one KV head (math.inf: protected) and the parameter sets tested."""

    scores: Callable[[RefLayer, int, dict], list[float]]
    params: tuple[dict, ...] = ({},)
    keeps_all: bool = False  # keeps every token whatever the budget


#: One entry per registered policy (test_every_registered_policy_has_a_reference): how to add a policy is in
#: the docstring of polykv.policies.
REFERENCES: dict[str, Reference] = {
    "full": Reference(ref_full, keeps_all=True),
    "streaming": Reference(ref_streaming, ({}, {"sinks": 2})),
    "snapkv": Reference(ref_snapkv, ({"window": 8}, {"window": 4, "kernel": 3})),
    "h2o": Reference(ref_h2o, ({}, {"recent_fraction": 0.25})),
    "tova": Reference(ref_tova),
    "knorm": Reference(ref_knorm),
    "random": Reference(ref_random, ({}, {"seed": 1})),
    "expected_attention": Reference(ref_expected_attention, ({"window": 8}, {"window": 4, "keep_window": False})),
    "snapkv_forward": Reference(ref_snapkv_forward, ({"window": 8}, {"window": 4, "span": 3})),
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


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_kept_set_matches_brute_force(reference_run, name, params):
    if name not in REFERENCES:
        pytest.fail(f"policy {name!r} has no brute-force reference in REFERENCES")
    model, ids, layers = reference_run
    reference = REFERENCES[name]
    from polykv.settings import LayerSetting

    setting = LayerSetting(make_policy(name, params), BUDGET)
    with apply(model, [setting] * len(layers)):
        cache = output_cache(model(ids))
    budget = T if reference.keeps_all else BUDGET
    for ref, layer in zip(layers, cache.layers, strict=True):
        for h in range(layer.columns.shape[1]):
            assert_top_k(layer.columns[0, h].tolist(), reference.scores(ref, h, params), budget)


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
