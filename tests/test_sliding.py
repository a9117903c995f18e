"""Sliding-window layers on the tiny Gemma 3 (layers 0 and 1 slide with window 8, layer 2 is full attention).

The query at column c sees columns c - 7 .. c (transformers' `sliding_window_overlay`), so after any forward a
sliding layer can still attend to its last 7 columns only: it keeps and scores nothing older, drops what leaves the
window while decoding, and every budget on it is min(budget, 7) in plans, baselines and byte accounting alike.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_loaded

from polykv.apply import apply, resolve_settings
from polykv.attention import polykv_attention
from polykv.cache import PolyKVLayer
from polykv.capture import capture
from polykv.compat import output_cache, with_cache
from polykv.evaluate.methods import Method
from polykv.models import fingerprint
from polykv.plan import CostModel, uniform_plan
from polykv.policies import make_policy, policy_names
from polykv.settings import LayerSetting, uniform

WINDOW, REACH, T = 8, 7, 40


def gemma(attn: str = "sdpa"):
    model = TINY["gemma3"](attn)
    assert model.config.sliding_window == WINDOW
    return model


def prompt(batch: int = 1, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def stored_bytes(cache) -> int:
    return sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_keeps_only_what_a_sliding_layer_can_still_attend_to(name):
    """Kept sets lie in the last 7 columns (at most min(budget, 7)), alike live and from a capture."""
    model = gemma()
    ids = prompt(batch=2)
    cap = capture(model, ids)
    for budget in (3, 5, 100):
        with apply(model, (name, budget)) as settings:
            live = output_cache(model(ids))
        offline = cap.compress(settings)
        for layer, other, setting in zip(live.layers, offline.layers, settings, strict=True):
            assert torch.equal(layer.columns, other.columns)
            reachable = REACH if layer.sliding_window else T
            want = reachable if name == "full" else min(budget, reachable)
            assert setting.budget == (min(budget, REACH) if layer.sliding_window else budget) or setting.span
            if setting.span is None:  # an eviction policy keeps exactly its (capped) budget
                assert layer.kept_tokens == want
            else:  # `window` holds its own window - 1 (and sinks), never more than the layer can reach
                assert layer.kept_tokens <= want
            assert bool((layer.columns >= T - reachable).all())


def test_scores_are_taken_over_the_reachable_tokens_only():
    """knorm on a sliding layer keeps the lowest-norm keys among the last 7, not among the whole prompt."""
    model = gemma()
    cap = capture(model, prompt())
    cache = cap.compress(uniform("knorm", 3, 3))
    for i, layer in enumerate(cache.layers[:2]):
        norms = cap.observation(i).keys[0, 0, -REACH:].float().norm(dim=-1)
        want = sorted((T - REACH + norms.argsort()[:3]).tolist())
        assert layer.columns[0, 0].tolist() == want


def test_heads_drop_only_their_common_run_of_unreachable_tokens():
    """Heads disagreeing on what is out of reach: only the shared leading run goes, the rest is masked."""
    layer = PolyKVLayer(sliding_window=4)  # the next query sees itself and 3 columns before it
    keys = torch.randn(1, 2, 4, 2)
    layer.update(keys, keys.clone())  # columns 0..3
    layer.keep(torch.tensor([[[0, 2, 3], [1, 2, 3]]]))
    layer.drop_unreachable()  # head 0's column 0 is out of reach, head 1's first (column 1) is not
    assert layer.columns.tolist() == [[[0, 2, 3], [1, 2, 3]]]
    assert layer.visible(torch.tensor([4]), None)[0, :, 0].tolist() == [[False, True, True], [True, True, True]]
    layer.update(torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2))  # column 4
    layer.drop_unreachable()
    assert layer.columns.tolist() == [[[2, 3, 4], [2, 3, 4]]]
    assert layer.kept_tokens == layer.full_tokens == 3


@pytest.mark.parametrize("name", ["full", "snapkv", "streaming"])
def test_decoding_drops_the_columns_that_leave_the_window(name):
    """Each step appends in place and drops what the next query cannot see; bytes stay within the full cache's."""
    model = gemma()
    with apply(model, (name, 5)):
        out = model(prompt(), use_cache=True)
        cache = output_cache(out)
        kept = [layer.columns[0, 0].tolist() for layer in cache.layers]
        storages = []
        for step in range(1, 13):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, **with_cache(model, cache), use_cache=True)
            seen = T + step
            for layer, prefill in zip(cache.layers, kept, strict=True):
                assert layer.seen == seen
                want = prefill + list(range(T, seen))
                if layer.sliding_window:
                    want = [c for c in want if c >= seen - REACH]
                assert layer.columns[0, 0].tolist() == want
            stats = cache.stats()
            assert stats.kv_bytes <= stats.kv_bytes_full and stats.kv_bytes == stored_bytes(cache)
            storages.append([layer.keys.untyped_storage().data_ptr() for layer in cache.layers])
    assert all(s == storages[0] for s in storages)  # dropping moves views, never copies the layer


def test_budgets_are_capped_alike_in_plans_baselines_and_the_cache():
    model = gemma()
    fp = fingerprint(model.config)
    cm = CostModel.for_fingerprint(fp)
    assert cm.caps == (REACH, REACH, None)
    baseline = Method("uniform:snapkv", "uniform", policy="snapkv")
    for budget in (3, 7, 8, 30, 100):
        want = [min(budget, REACH), min(budget, REACH), budget]
        plan = uniform_plan("tiny", fp, "snapkv", budget)
        assert [lp.budget for lp in plan.layers] == want
        assert [s.budget for s in baseline.settings(budget, fp)] == want
        assert [s.budget for s in resolve_settings(model, ("snapkv", budget))] == want
        assert [s.budget for s in resolve_settings(model, plan)] == want
        if budget <= T:  # the cache holds what the plan pays for (the plan counts 16-bit bytes, the cache is fp32)
            with apply(model, ("snapkv", budget)):
                stats = output_cache(model(prompt())).stats()
            assert stats.kept_tokens == want
            assert stats.kv_bytes == plan.used_budget * 2


def test_bytes_never_exceed_the_full_cache_and_count_the_stored_tensors():
    model = gemma()
    cap = capture(model, prompt(batch=2))
    full = cap.compress([None] * 3)
    assert full.stats().kept_tokens == [REACH, REACH, T]
    for settings in ([None] * 3, uniform("snapkv", 5, 3), uniform("h2o", 100, 3), uniform("full", 1, 3)):
        stats = cap.compress(settings).stats()
        assert stats.kv_bytes <= stats.kv_bytes_full == full.stats().kv_bytes
        assert stats.kv_bytes == stored_bytes(cap.compress(settings))
    assert cap.uncompressed().stats().kept_tokens == [T, T, T]  # calibration's copy keeps every column


#: `window` narrows the attention itself: its budget is window + sinks, so at the cap (window - 1) it attends to one
#: position fewer than the layer's own window (tests/test_window.py checks it against transformers' sliding layers)
LOSSLESS = [(p, "sdpa") for p in policy_names() if p not in ("full", "window")] + [("snapkv", "eager")]


@pytest.mark.parametrize("name,attn", LOSSLESS, ids=[f"{p}-{a}" for p, a in LOSSLESS])
def test_budget_at_the_window_is_lossless(name, attn):
    """Every sliding layer at budget >= window, full layers whole: greedy output equals the plain full cache's."""
    model = gemma(attn)
    ids = prompt(batch=2, seed=1)
    settings = [
        LayerSetting(make_policy(name), WINDOW) if t == "sliding_attention" else LayerSetting(make_policy("full"), 1)
        for t in model.config.layer_types
    ]
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    with apply(model, settings):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.logits, got.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_left_padded_batch_matches_rows_alone():
    model = gemma()
    a, b = prompt(seed=2), prompt(length=T - 9, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 9, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with apply(model, ("snapkv", 5)):
        both = model.generate(batch, attention_mask=mask, **kwargs)[:, T:]
        alone_a = model.generate(a, attention_mask=torch.ones_like(a), **kwargs)[:, T:]
        alone_b = model.generate(b, attention_mask=torch.ones_like(b), **kwargs)[:, T - 9 :]
    assert torch.equal(both[0], alone_a[0]) and torch.equal(both[1], alone_b[0])


def test_chunk_then_decode_equals_token_by_token():
    """A multi-token chunk sees columns that the layer drops right after it; feeding it token by token agrees."""
    model = gemma()
    cap = capture(model, prompt())
    settings = uniform("snapkv", 4, 3)
    chunked, stepped = cap.compress(settings), cap.compress(settings)
    chunk = prompt(length=10, seed=4)
    with torch.no_grad(), polykv_attention(model):
        a = model(chunk, **with_cache(model, chunked)).logits
        b = torch.cat([model(chunk[:, i : i + 1], **with_cache(model, stepped)).logits for i in range(10)], dim=1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [layer.columns.tolist() for layer in chunked.layers] == [layer.columns.tolist() for layer in stepped.layers]


def test_cumulative_attention_follows_the_window():
    """H2O's accumulated attention on a sliding layer equals a dense softmax under the sliding mask."""
    from polykv.policies.scoring import cumulative_attention

    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d, window = 2, 4, 2, 23, 8, 5
    q, k = torch.randn(b, hq, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :3] = False
    logits = q @ k.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2) * 0.3
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (j > i - window) & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) * valid[:, None, :, None]
    dense = probs.sum(2).view(b, hkv, hq // hkv, t).sum(2)
    got = cumulative_attention(q, k, 0.3, valid, None, sliding_window=window, chunk=4)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "stacked"])
def test_engine_rows_equal_compressing_during_prefill(shared):
    """The eval engine (capture, then compress) answers as a live prefill does, and reports consistent bytes."""
    from polykv.evaluate.engine import evaluate_instance, reprefill_instance
    from polykv.evaluate.methods import parse_methods
    from polykv.evaluate.tasks import TaskInstance

    loaded = tiny_loaded(arch="gemma3")
    inst = TaskInstance("g", "retrieval", "alpha beta " * 12 + "the code is 731. " + "delta " * 6, "Code?", ["731"],
                        "substring", 6)  # fmt: skip
    methods = parse_methods("full,uniform:snapkv,uniform:h2o", None)
    fast = evaluate_instance(loaded, inst, methods, [4, 16], max_rows=3, shared_prefix=shared)
    slow, _ = reprefill_instance(loaded, inst, methods, [4, 16])
    got = {(r["method"], r["budget"]): r["prediction"] for r in fast.rows}
    assert all(got[(r["method"], r["budget"])] == r["prediction"] for r in slow)
    for row in fast.rows:
        assert row["kv_bytes"] <= row["kv_bytes_full"]
        if row["method"] == "full":
            assert row["kv_bytes"] == row["kv_bytes_full"]


def test_calibration_finds_sliding_layers_lossless_at_their_reach():
    """prepare keeps every column for the answer's attention; a sliding layer loses nothing at budget >= 7."""
    from polykv.calibrate.sample import prepare
    from polykv.calibrate.sensitivity import Option, e2e_losses, proxy_losses

    lm = tiny_loaded(arch="gemma3")
    sample = prepare(lm.model, lm.tokenizer, "alpha beta " * 10 + "The key is 417. ", "Key?", "417", None, 16)
    tokens = sample.prompt_tokens
    assert all(keys.shape[2] == tokens + sample.answer_in.shape[1] for keys, _ in sample.answer_keys.values())
    options = [Option("snapkv", b, LayerSetting(make_policy("snapkv"), b)) for b in (2, REACH, 64)]
    for layer in (0, 1):
        proxy = proxy_losses(sample, layer, options)
        e2e = e2e_losses(lm.model, sample, layer, options)
        assert proxy[0][0] > 1e-4 and proxy[1][0] < 1e-5 and proxy[2][0] < 1e-5
        assert abs(e2e[1][1]) < 1e-6 and abs(e2e[2][1]) < 1e-6
