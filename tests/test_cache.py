"""The ragged compressed cache on tiny random models: exactness, budgets, chunks, padding, sliding windows."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_llama
from transformers import DynamicCache

from polykv.apply import apply
from polykv.attention import polykv_attention
from polykv.capture import capture
from polykv.compat import output_cache, with_cache
from polykv.policies import make_policy, policy_names
from polykv.settings import LayerSetting, uniform

T = 40


def ragged(n_layers: int) -> list[LayerSetting]:
    cycle = [("snapkv", 10, {"window": 4}), ("streaming", 17, {}), ("knorm", 7, {}), ("h2o", 12, {}), ("tova", 9, {})]
    return [LayerSetting(make_policy(p, k), b) for p, b, k in (cycle[i % len(cycle)] for i in range(n_layers))]


@pytest.mark.parametrize("arch", list(TINY))
def test_full_policy_matches_dynamic_cache(arch, attn):
    model = TINY[arch](attn)
    ids = torch.randint(0, 128, (2, T))
    ref = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    with apply(model, ("full", 1)):
        got = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.logits, got.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_keeps_exactly_its_budget(name):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, T))
    budget = 1 if name == "streaming" else 7
    with apply(model, (name, budget)):
        cache = output_cache(model(ids))
    for layer in cache.layers:
        expected = T if name == "full" else budget
        assert layer.keys.shape == (2, 2, expected, 16)
        assert layer.columns.shape == (2, 2, expected)
        for row in layer.columns.reshape(-1, expected):
            assert len(set(row.tolist())) == expected
    assert cache.stats().kept_tokens == [T if name == "full" else budget] * 3


def test_budget_at_or_above_context_keeps_everything():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    with apply(model, ("snapkv", T + 5)):
        cache = output_cache(model(ids))
    assert cache.stats().kept_tokens == [T] * 3
    assert cache.stats().kv_bytes == cache.stats().kv_bytes_full


@pytest.mark.parametrize("arch", list(TINY))
def test_chunk_after_compression_equals_token_by_token(arch, attn):
    model = TINY[arch](attn)
    ids = torch.randint(0, 128, (2, T))
    cap = capture(model, ids, window=8)
    settings = ragged(len(cap.cache.layers))
    chunked, stepped = cap.compress(settings), cap.compress(settings)
    chunk = torch.randint(0, 128, (2, 6))
    with polykv_attention(model):
        a = model(chunk, **with_cache(model, chunked)).logits
        b = torch.cat([model(chunk[:, i : i + 1], **with_cache(model, stepped)).logits for i in range(6)], dim=1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(TINY))
def test_ragged_cache_equals_masked_full_attention(arch, attn):
    """Decoding over the ragged cache = full-cache attention with every evicted key masked out, layer by layer."""
    model = TINY[arch](attn)
    ids = torch.randint(0, 128, (1, T))
    nxt = torch.randint(0, 128, (1, 3))
    cap = capture(model, ids, window=8)
    settings = ragged(len(cap.cache.layers))
    cache = cap.compress(settings)
    kept_columns = [layer.columns for layer in cache.layers]  # before the chunk: sliding layers drop after it
    with polykv_attention(model):
        got = model(nxt, **with_cache(model, cache)).logits

    # reference: a plain DynamicCache forward of prompt + chunk, each layer's mask hiding what that layer evicted
    full_cols = torch.arange(T + 3)
    window = getattr(model.config, "sliding_window", None)
    masks = {}
    for i, layer in enumerate(cache.layers):
        kept = torch.zeros(layer.columns.shape[1], T + 3, dtype=torch.bool)
        kept[:, T:] = True
        for h in range(layer.columns.shape[1]):
            kept[h, kept_columns[i][0, h].long()] = True
        q = full_cols[T:, None]
        vis = kept[:, None, :] & (full_cols[None, None, :] <= q)
        if layer.sliding_window:
            vis &= (q - full_cols[None, None, :]) < window
        groups = model.config.num_attention_heads // model.config.num_key_value_heads
        vis = vis.repeat_interleave(groups, dim=0)[None]
        masks[i] = vis if attn == "sdpa" else torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)

    def hook(module, args, kwargs):
        if kwargs["hidden_states"].shape[1] == 3:
            kwargs["attention_mask"] = masks[module.layer_idx]
        return args, kwargs

    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    try:
        dyn = DynamicCache()
        model(ids, **with_cache(model, dyn))
        # the plain cache would drop sliding-layer history; keep it all so the masks index full columns
        ref = model(nxt, **with_cache(model, _full_history(model, ids))).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _full_history(model, ids):
    """A DynamicCache whose sliding layers keep every column (so a hand-made mask can index them)."""
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = [DynamicLayer() for _ in range(model.config.num_hidden_layers)]
    model(ids, **with_cache(model, cache))
    return cache


@pytest.mark.parametrize("name", policy_names())
def test_prefill_compression_equals_capture_compression(name):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, T))
    settings = uniform(name, 9, 3)
    with apply(model, settings):
        live = output_cache(model(ids))
    offline = capture(model, ids, window=64).compress(settings)
    for i, (a, b) in enumerate(zip(live.layers, offline.layers, strict=True)):
        assert torch.equal(a.columns, b.columns)
        # `window` windows the prefill itself, which a full capture cannot: later layers see other hidden states
        if name != "window" or i == 0:
            assert torch.equal(a.keys, b.keys)


def test_sdpa_and_eager_agree_on_ragged_cache():
    ids = torch.randint(0, 128, (1, T))
    nxt = torch.randint(0, 128, (1, 4))
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_llama(attn)
        cache = capture(model, ids, window=8).compress(ragged(3))
        with polykv_attention(model):
            outs.append(model(nxt, **with_cache(model, cache)).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_matches_rows_alone(attn):
    """Batch of 2 with left padding: each row generates what it generates alone (pads are never kept first)."""
    model = tiny_llama(attn)
    a = torch.randint(1, 128, (1, T))
    b = torch.randint(1, 128, (1, T - 9))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 9, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    settings = ragged(3)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with apply(model, settings):
        both = model.generate(batch, attention_mask=mask, **kwargs)[:, T:]
        alone_a = model.generate(a, attention_mask=torch.ones_like(a), **kwargs)[:, T:]
        alone_b = model.generate(b, attention_mask=torch.ones_like(b), **kwargs)[:, T - 9 :]
    assert torch.equal(both[0], alone_a[0])
    assert torch.equal(both[1], alone_b[0])


def test_padding_kept_when_budget_exceeds_a_short_row_is_masked():
    """Budget above a row's real length: filler pad entries stay masked, output equals the row alone, full cache."""
    model = tiny_llama()
    a = torch.randint(1, 128, (1, T))
    b = torch.randint(1, 128, (1, 12))
    batch = torch.cat([a, torch.cat([torch.zeros(1, T - 12, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, : T - 12] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with apply(model, ("snapkv", 20)):
        both = model.generate(batch, attention_mask=mask, **kwargs)[:, T:]
    alone_b = model.generate(b, attention_mask=torch.ones_like(b), **kwargs)[:, 12:]
    assert torch.equal(both[1], alone_b[0])


def test_stats_count_bytes_exactly():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, T))
    with apply(model, ragged(3)):
        cache = output_cache(model(ids))
    stats = cache.stats()
    per_token = 2 * 2 * 2 * 16 * 4  # K+V x batch x kv heads x head dim x fp32
    assert stats.kept_tokens == [10, 17, 7]
    assert stats.full_tokens == [T] * 3
    assert stats.kv_bytes == per_token * (10 + 17 + 7)
    assert stats.kv_bytes_full == per_token * 3 * T


def test_apply_restores_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    before = model(ids).logits
    with apply(model, ("streaming", 8)):
        model(ids)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert type(output_cache(model(ids))).__name__ == "DynamicCache"


def test_triton_decode_path_matches_torch_path(monkeypatch):
    """POLYKV_KERNELS=triton (interpreted on CPU): scoring, compaction and decode kernels give the torch result."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, T))
    nxt = torch.randint(0, 128, (2, 1))
    outs = []
    for choice in ("torch", "triton"):
        monkeypatch.setenv("POLYKV_KERNELS", choice)
        with apply(model, ragged(3)):
            cache = output_cache(model(ids))
        with polykv_attention(model):
            outs.append(
                (model(nxt, **with_cache(model, cache)).logits, [layer.columns.clone() for layer in cache.layers])
            )
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b)


def test_apply_accepts_a_plan_and_refuses_another_models_plan():
    from polykv.errors import PlanMismatchError
    from polykv.models import fingerprint
    from polykv.plan import uniform_plan

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    plan = uniform_plan("tiny", fingerprint(model.config), "snapkv", 8)
    with apply(model, plan):
        assert output_cache(model(ids)).stats().kept_tokens == [8, 8, 8]
    other = uniform_plan(
        "other",
        {
            **fingerprint(model.config),
            "num_layers": 4,
            "num_kv_heads": [2] * 4,
            "head_dim": [16] * 4,
            "layer_types": ["full_attention"] * 4,
        },
        "snapkv",
        8,
    )
    with pytest.raises(PlanMismatchError, match="other"):
        with apply(model, other):
            pass


@pytest.mark.parametrize("arch", list(TINY))
def test_cache_is_passed_under_the_installed_transformers_name(arch, attn):
    """transformers 5.24 renamed `past_key_values` to `cache`: the helpers use the model's own name (no deprecation
    warning), and a compressed cache handed over that way is the one the layers fill."""
    import inspect
    import warnings

    from polykv.cache import PolyKVCache
    from polykv.compat import cache_argument

    model = TINY[arch](attn)
    assert cache_argument(model) in inspect.signature(type(model).forward).parameters
    cache = PolyKVCache.for_config(model.config, settings=uniform("streaming", 8, model.config.num_hidden_layers))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with polykv_attention(model):
            out = model(torch.randint(0, 128, (1, 20)), **with_cache(model, cache), use_cache=True)
    assert output_cache(out) is cache  # 8 kept per layer, or window - 1 on a sliding one
    assert cache.stats().kept_tokens == [min(8, layer.full_tokens) for layer in cache.layers]


def _storage_bytes(cache) -> int:
    """Bytes of the storages behind every layer's K and V, each asserted to hold exactly its entries: a kept tensor
    that is a view into the prefill's full one would keep the evicted tokens in memory."""
    total = 0
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            held = t.untyped_storage().nbytes()
            assert held == t.numel() * t.element_size(), f"layer {i} {name}: {held} bytes held for {t.shape}"
            total += held
    return total


@pytest.mark.parametrize("arch", list(TINY))
def test_compression_frees_evicted_tokens_and_kv_bytes_is_the_storage(arch):
    model = TINY[arch]()
    with apply(model, ragged(model.config.num_hidden_layers)):
        cache = output_cache(model(torch.randint(0, 128, (2, T))))
    assert all(layer.kept_tokens < T for layer in cache.layers)
    assert cache.stats().kv_bytes == _storage_bytes(cache)


def test_kv_bytes_counts_values_at_their_own_head_dim():
    """K head dim 16, V head dim 24 (as in MLA): bytes are B x Hkv x tokens x (16 + 24) x 4, not 2 x 16."""
    from polykv.cache import PolyKVCache, PolyKVLayer

    layer = PolyKVLayer()
    layer.update(torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 24))
    layer.keep(torch.arange(5, 12).expand(2, 3, 7))
    cache = PolyKVCache([layer])
    stats = cache.stats()
    assert (layer.keys.shape[-1], layer.values.shape[-1]) == (16, 24)
    assert stats.kv_bytes == 2 * 3 * 7 * (16 + 24) * 4 == _storage_bytes(cache)
    assert stats.kv_bytes_full == 2 * 3 * 20 * (16 + 24) * 4
