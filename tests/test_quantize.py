"""KV quantization: round-trip bounds, exact packing and bytes, and the cache storing kept tokens quantized (KIVI)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, tiny_llama

from polykv.apply import apply
from polykv.attention import polykv_attention
from polykv.cache import PolyKVCache, PolyKVLayer, stack
from polykv.capture import capture
from polykv.compat import output_cache, with_cache
from polykv.errors import InputError
from polykv.policies import make_policy
from polykv.precision import SUPPORTED_BITS
from polykv.quantize import KEY_AXIS, VALUE_AXIS, dequantize, quantize, select_rows
from polykv.settings import LayerSetting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOW_BITS = (8, 4, 2)
T = 40


def per_element(q, t: torch.Tensor) -> torch.Tensor:
    """A per-group tensor (scales or zeros) expanded to every element of the quantized tensor, as float32."""
    length = q.shape[q.axis]
    return t.float().repeat_interleave(q.group, -1)[..., :length].movedim(-1, q.axis)


def assert_within_half_step(x: torch.Tensor, q) -> None:
    """|x - dequantize(q)| <= scale / 2 per element, up to the rounding of the result to x's dtype, and the scale
    is the group's range over the code levels (not a looser one)."""
    dq = dequantize(q)
    assert dq.shape == x.shape and dq.dtype == x.dtype
    scale, zero = per_element(q, q.scales), per_element(q, q.zeros)
    levels = 2**q.bits - 1
    eps = torch.finfo(x.dtype).eps
    subnormal = eps * torch.finfo(x.dtype).smallest_normal  # the spacing of x's dtype near zero
    err = (x.float() - dq.float()).abs()
    tol = eps * (x.float().abs() + zero.abs() + levels * scale) + subnormal
    assert bool((err <= scale / 2 + tol).all()), float((err - scale / 2 - tol).max())
    moved = x.float().movedim(q.axis, -1)
    pad = -moved.shape[-1] % q.group
    moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], -1).unflatten(-1, (-1, q.group))
    spread = (moved.amax(-1) - moved.amin(-1)) / levels
    assert bool((q.scales.float() <= spread * (1 + 2 * eps) + subnormal).all())
    assert bool((q.scales.float() >= spread).all())


def inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, 20, generator=gen)
    outliers = x.clone()
    big = 1e4 if dtype == torch.float16 else 1e30
    outliers[0, 1, 5, 3], outliers[1, 2, 30, 7], outliers[0, 0, 0, 0] = big, -big, big / 3
    constant = torch.full((2, 3, 37, 20), 0.3)
    constant[1] = -7.25
    tiny = x * 1e-6
    return {
        name: t.to(dtype) for name, t in (("random", x), ("outliers", outliers), ("constant", constant), ("tiny", tiny))
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", LOW_BITS)
def test_round_trip_is_within_half_a_step(dtype, bits):
    for name, x in inputs(dtype).items():
        for axis, group in ((KEY_AXIS, 32), (VALUE_AXIS, 32), (KEY_AXIS, 8), (VALUE_AXIS, 6), (KEY_AXIS, 1)):
            q = quantize(x, bits, axis, group)
            assert q.group == min(group, x.shape[axis]), name
            assert_within_half_step(x, q)
            if name == "constant":
                assert torch.equal(dequantize(q), x) and not bool(q.scales.any())


def test_an_outlier_only_widens_its_own_group():
    x = torch.randn(1, 1, 64, 8)
    x[0, 0, 3, 2] = 1e4
    q = quantize(x, 4, KEY_AXIS, 32)  # channel 2, tokens 0..31 is the only group holding it
    err = (dequantize(q) - x).abs()
    assert float(err[0, 0, :32, 2].max()) > 1.0
    others = torch.ones_like(err, dtype=torch.bool)
    others[0, 0, :32, 2] = False
    assert float(err[others].max()) < 1.0


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("axis", [KEY_AXIS, VALUE_AXIS])
def test_every_code_survives_packing(bits, axis):
    """Integers 0 .. 2^bits - 1 in groups whose range is exactly that: scale 1, zero 0, so the codes are the
    values and dequantizing must give them back exactly (odd element counts pad the last byte)."""
    levels = 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randperm(2 * 4 * 33 * 17, generator=gen) % (levels + 1)).float().view(2, 4, 33, 17)
    x.movedim(axis, -1)[..., 0] = 0
    x.movedim(axis, -1)[..., 1] = levels
    q = quantize(x, bits, axis, 64)
    assert bool((q.scales == 1).all()) and not bool(q.zeros.any())
    assert torch.equal(dequantize(q), x)
    assert set(x.unique().tolist()) == set(range(levels + 1))


def owned(t: torch.Tensor) -> int:
    held = t.untyped_storage().nbytes()
    assert held == t.numel() * t.element_size(), f"{held} bytes held for {tuple(t.shape)}"
    return held


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bytes_come_from_storage_and_match_the_layout(dtype):
    x = torch.randn(2, 3, 40, 16).to(dtype)
    size = torch.finfo(dtype).bits // 8
    data = {}
    for bits in LOW_BITS:
        keys, values = quantize(x, bits, KEY_AXIS), quantize(x, bits, VALUE_AXIS)
        for q in (keys, values):
            assert q.nbytes == sum(owned(t) for t in (q.data, q.scales, q.zeros))
        per_row = 3 * 40 * 16 * bits // 8
        # keys: ceil(40 / 32) = 2 groups per channel; values: the group clamps to 16 channels, 1 per token
        assert keys.nbytes == 2 * per_row + 2 * (2 * 3 * 16 * 2) * size
        assert values.nbytes == 2 * per_row + 2 * (2 * 3 * 40 * 1) * size
        data[bits] = keys.data.untyped_storage().nbytes()
    assert data[4] * 2 == data[8] and data[2] * 4 == data[8]
    odd = quantize(torch.randn(1, 1, 5, 3), 2, KEY_AXIS)  # 15 codes -> 4 bytes, 3 groups of 5 tokens
    assert odd.data.numel() == 4 and odd.nbytes == 4 + 2 * 3 * 4


def test_shapes_that_are_no_multiple_of_the_group_round_trip():
    for shape in [(1, 2, 1, 5), (3, 1, 33, 9), (2, 2, 65, 130)]:
        x = torch.randn(shape)
        for axis in (KEY_AXIS, VALUE_AXIS, -1, -2):
            q = quantize(x, 4, axis, 32)
            assert q.shape == shape
            assert_within_half_step(x, q)


@pytest.mark.parametrize("bits", [3, 1, 32, 0, True, "4"])
def test_unsupported_bits_name_the_allowed_widths(bits):
    with pytest.raises(InputError, match="16, 8, 4 or 2") as info:
        quantize(torch.randn(1, 1, 4, 4), bits, KEY_AXIS)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="16, 8, 4 or 2"):
        LayerSetting(make_policy("snapkv"), 8, bits=bits)


def test_sixteen_bits_pass_the_tensor_through():
    assert SUPPORTED_BITS == (16, 8, 4, 2)
    x = torch.randn(1, 2, 9, 4, dtype=torch.bfloat16)
    assert quantize(x, 16, KEY_AXIS) is x and dequantize(x) is x and quantize(x, 16, VALUE_AXIS, 3) is x


def test_rows_can_be_selected_without_dequantizing():
    x = torch.randn(3, 2, 21, 6)
    q = quantize(x, 2, KEY_AXIS, 8)
    idx = torch.tensor([2, 0])
    assert torch.equal(dequantize(select_rows(q, idx)), dequantize(q).index_select(0, idx))


# ---- the cache ----


def settings(n: int, bits: int) -> list[LayerSetting]:
    cycle = [("snapkv", 10, {"window": 4}), ("streaming", 17, {}), ("knorm", 7, {})]
    return [LayerSetting(make_policy(p, k), b, bits=bits) for p, b, k in (cycle[i % 3] for i in range(n))]


@torch.no_grad()
def decode(model, cache, steps: int, seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(
        0, 128, (cache.layers[0].keys.shape[0], steps), generator=torch.Generator().manual_seed(seed)
    )
    with polykv_attention(model):
        return torch.cat([model(tokens[:, i : i + 1], **with_cache(model, cache)).logits for i in range(steps)], 1)


def test_sixteen_bits_is_the_unquantized_cache():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, T))
    plain = [LayerSetting(s.policy, s.budget) for s in settings(3, 16)]
    logits, stats = [], []
    for setting in (plain, settings(3, 16)):
        with apply(model, setting):
            out = model(ids, use_cache=True)
        cache = output_cache(out)
        assert all(layer.quantized is None and layer.bits == 16 for layer in cache.layers)
        logits.append(torch.cat([out.logits, decode(model, cache, 3)], 1))
        stats.append(cache.stats())
    assert torch.equal(logits[0], logits[1])
    assert stats[0] == stats[1] and stats[0].kv_bytes == 2 * 2 * 2 * 16 * 4 * (13 + 20 + 10)  # kept + 3 decoded


@pytest.mark.parametrize("arch", list(TINY))
def test_quantized_layers_stay_close_to_full_precision(arch):
    """Logits over a decode: 8 bits nearly exact, 4 bits close, 2 bits worse; every width differs from 16."""
    model = TINY[arch]()
    cap = capture(model, torch.randint(0, 128, (1, T)), window=8)
    n = model.config.num_hidden_layers
    full = decode(model, cap.compress(settings(n, 16)), 6)
    err = {}
    for bits in LOW_BITS:
        cache = cap.compress(settings(n, bits))
        assert all(layer.quantized is not None for layer in cache.layers)
        err[bits] = float((decode(model, cache, 6) - full).abs().max()) / float(full.abs().max())
    assert 0 < err[8] < 0.01 and err[4] < 0.1 and err[8] < err[4] < err[2], err


def test_prefill_and_capture_quantize_alike():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, T))
    with apply(model, settings(3, 4)):
        during = output_cache(model(ids, use_cache=True))
    after = capture(model, ids, window=8).compress(settings(3, 4))
    for a, b in zip(during.layers, after.layers, strict=True):
        assert torch.equal(a.columns, b.columns)
        torch.testing.assert_close(a.stored()[0], b.stored()[0], rtol=0, atol=1e-5)


def test_decoded_tokens_wait_in_the_residual_until_a_group_fills():
    layer = PolyKVLayer()
    layer.bits, layer.group = 4, 4
    keys, values = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    layer.update(keys, values)
    layer.keep(torch.arange(3, 10).expand(2, 2, 7))
    assert layer.quantized.tokens == 7 and layer.keys.shape[2] == 0 and layer.kept_tokens == 7
    q_keys, q_values = layer.stored()
    assert torch.allclose(q_keys, keys[:, :, 3:10], atol=0.5) and not torch.equal(q_keys, keys[:, :, 3:10])
    new = [(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)) for _ in range(5)]
    for step, (k, v) in enumerate(new[:3], start=1):
        got_k, got_v = layer.update(k, v)
        assert layer.keys.shape[2] == step and layer.quantized.tokens == 7
        assert torch.equal(got_k[:, :, 7:], torch.cat([n[0] for n in new[:step]], 2))  # exact while residual
        assert torch.equal(got_v[:, :, :7], q_values)
    got_k, _ = layer.update(*new[3])
    assert layer.keys.shape[2] == 0 and layer.quantized.tokens == 11 and len(layer.quantized.keys) == 2
    assert torch.equal(got_k[:, :, :7], q_keys) and not torch.equal(
        got_k[:, :, 7:], torch.cat([n[0] for n in new[:4]], 2)
    )
    layer.update(*new[4])
    assert layer.kept_tokens == layer.columns.shape[2] == 12 and layer.columns[0, 0].tolist()[-5:] == [
        20,
        21,
        22,
        23,
        24,
    ]


def expected_bytes(batch: int, heads: int, tokens: int, dim: int, bits: int, size: int) -> int:
    """K and V of `tokens` quantized as one chunk (group 32): codes plus a scale and a zero per group."""
    codes = 2 * batch * math.ceil(heads * tokens * dim * bits / 8)
    key_groups = batch * heads * dim * math.ceil(tokens / 32)
    value_groups = batch * heads * tokens * math.ceil(dim / min(32, dim))
    return codes + 2 * size * (key_groups + value_groups)


def test_kv_bytes_count_quantized_storage_and_the_residual():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, T))
    bytes_at, kept = {}, []
    for bits in (16, *LOW_BITS):
        with apply(model, settings(3, bits)):
            cache = output_cache(model(ids, use_cache=True))
        kept = cache.stats().kept_tokens
        bytes_at[bits] = cache.stats().kv_bytes
        if bits < 16:
            assert bytes_at[bits] == sum(expected_bytes(2, 2, k, 16, bits, 4) for k in kept)
            stored = sum(
                owned(t)
                for layer in cache.layers
                for q in (*layer.quantized.keys, *layer.quantized.values)
                for t in (q.data, q.scales, q.zeros)
            )
            assert bytes_at[bits] == stored
            decode(model, cache, 3)
            per_token = 2 * 2 * 2 * 16 * 4
            assert cache.stats().kv_bytes == bytes_at[bits] + 3 * 3 * per_token  # 3 residual tokens per layer
    assert bytes_at[2] < bytes_at[4] < bytes_at[8] < bytes_at[16] == 2 * 2 * 2 * 16 * 4 * sum(kept)


@pytest.mark.parametrize("name", ["snapkv", "streaming", "window"])
@torch.no_grad()
def test_sliding_and_windowed_layers_drop_quantized_tokens_like_full_precision_ones(name):
    """Gemma 3's sliding layers (window 8) drop what leaves the window; a window setting drops behind its span.
    Quantized layers must keep exactly the same columns, with logits close to full precision."""
    model = TINY["gemma3"]()
    ids = torch.randint(0, 128, (1, T))
    policy = make_policy(name, {"sinks": 2} if name == "window" else None)
    steps = torch.randint(0, 128, (1, 70))  # past a window setting's slack, so its layers drop behind the span
    runs = {}
    for bits in (16, 4):
        with apply(model, [LayerSetting(policy, 5, bits=bits)] * 3):
            out = model(ids, use_cache=True)
            cache = output_cache(out)
            logits, columns = [], []
            for i in range(steps.shape[1]):
                out = model(steps[:, i : i + 1], **with_cache(model, cache), use_cache=True)
                logits.append(out.logits)
                columns.append([layer.columns.tolist() for layer in cache.layers])
        runs[bits] = torch.cat(logits, 1), columns, cache
    assert runs[4][1] == runs[16][1]
    quantized = runs[4][2]
    assert all(layer.kept_tokens == layer.columns.shape[2] == layer.stored()[0].shape[2] for layer in quantized.layers)
    assert quantized.stats().kv_bytes < runs[16][2].stats().kv_bytes
    torch.testing.assert_close(runs[4][0], runs[16][0], rtol=0, atol=0.1 * float(runs[16][0].abs().max()))


def test_reordering_rows_moves_the_quantized_tokens():
    layer = PolyKVLayer()
    layer.bits = 2
    layer.update(torch.randn(3, 2, 20, 8), torch.randn(3, 2, 20, 8))
    layer.keep(torch.arange(2, 12).expand(3, 2, 10))
    layer.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
    before = layer.stored()
    idx = torch.tensor([2, 0])
    layer.reorder_cache(idx)
    for a, b in zip(layer.stored(), before, strict=True):
        assert torch.equal(a, b.index_select(0, idx))


def test_quantized_rows_are_refused_where_they_cannot_be_represented():
    from polykv.shared_prefix import shared_batch

    model = tiny_llama()
    cap = capture(model, torch.randint(0, 128, (1, T)), window=8)
    rows = [cap.compress(settings(3, 4)), cap.compress(settings(3, 4))]
    with pytest.raises(ValueError, match="quantized"):
        stack(rows)
    with pytest.raises(ValueError, match="quantized"):
        shared_batch(cap.cache, rows, slack=4)
    assert isinstance(stack([cap.compress(settings(3, 16))] * 2), PolyKVCache)
