"""Each policy's kept set against a brute-force reference built from the model's own attention probabilities."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_llama
from polykv.apply import apply
from polykv.compat import output_cache, with_cache
from polykv.policies import make_policy, policy_names

T, BUDGET = 48, 12


@pytest.fixture(scope="module")
def reference_run():
    """Eager attention probabilities (per layer: Hq x T x T) and keys/values of a plain full-cache prefill."""
    model = tiny_llama("eager", seed=3)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(7))
    cache = DynamicCache()
    out = model(ids, **with_cache(model, cache), output_attentions=True)
    probs = [a[0].detach().double() for a in out.attentions]
    keys = [layer.keys[0].detach() for layer in cache.layers]
    return model, ids, probs, keys


def ref_scores(name: str, probs: torch.Tensor, keys: torch.Tensor, params: dict) -> list[list[float]]:
    """Plain-loop scores per KV head; math.inf marks protected tokens."""
    hq, hkv = probs.shape[0], keys.shape[0]
    g = hq // hkv
    out = []
    for h in range(hkv):
        heads = range(h * g, (h + 1) * g)
        if name == "snapkv":
            w, k = params.get("window", 32), params.get("kernel", 5)
            raw = [sum(float(probs[q, i, j]) for q in heads for i in range(T - w, T)) for j in range(T)]
            pooled = []
            for j in range(T):
                win = [raw[x] for x in range(j - k // 2, j + k // 2 + 1) if 0 <= x < T]
                pooled.append(sum(win) / len(win))
            s = [math.inf if j >= T - w else pooled[j] for j in range(T)]
        elif name == "snapkv_forward":
            w, span = params.get("window", 32), params.get("span", make_policy("snapkv_forward").span)
            raw = [sum(float(probs[q, i, j]) for q in heads for i in range(T - w, T)) for j in range(T)]
            s = [math.inf if j >= T - w else max(raw[max(0, j - span + 1) : j + 1]) for j in range(T)]
        elif name == "h2o":
            recent = int(BUDGET * params.get("recent_fraction", 0.5))
            s = [sum(float(probs[q, i, j]) for q in heads for i in range(T)) for j in range(T)]
            s = [math.inf if j >= T - recent else v for j, v in enumerate(s)]
        elif name == "tova":
            s = [sum(float(probs[q, T - 1, j]) for q in heads) for j in range(T)]
        elif name == "knorm":
            s = [-float(keys[h, j].double().norm()) for j in range(T)]
        elif name == "streaming":
            s = [math.inf if j < params.get("sinks", 4) else float(j) for j in range(T)]
        else:
            raise AssertionError(name)
        out.append(s)
    return out


def assert_top_k(kept: list[int], scores: list[float], budget: int, tol: float = 1e-6) -> None:
    """kept must be the top-`budget` by score, ties and near-ties (within tol) broken towards later tokens."""
    ref = sorted(range(len(scores)), key=lambda j: (-scores[j], -j))[:budget]
    if sorted(ref) == sorted(kept):
        return
    threshold = scores[ref[-1]]
    for j in set(ref) ^ set(kept):
        assert abs(scores[j] - threshold) <= tol * max(1.0, abs(threshold)), (j, scores[j], threshold)


@pytest.mark.parametrize(
    "name,params",
    [("snapkv", {"window": 8}), ("snapkv", {"window": 4, "kernel": 3}), ("snapkv_forward", {"window": 8}),
     ("snapkv_forward", {"window": 4, "span": 3}), ("h2o", {}), ("tova", {}), ("knorm", {}),
     ("streaming", {}), ("streaming", {"sinks": 2})],
)
def test_kept_set_matches_brute_force(reference_run, name, params):
    model, ids, probs, keys = reference_run
    from polykv.settings import LayerSetting

    setting = LayerSetting(make_policy(name, params), BUDGET)
    with apply(model, [setting] * 3):
        cache = output_cache(model(ids))
    for layer_idx, layer in enumerate(cache.layers):
        ref = ref_scores(name, probs[layer_idx], keys[layer_idx], params)
        for h in range(layer.columns.shape[1]):
            assert_top_k(layer.columns[0, h].tolist(), ref[h], BUDGET)


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
    assert policy_names() == ["full", "streaming", "snapkv", "h2o", "tova", "knorm", "random", "expected_attention",
                              "snapkv_forward"]


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
