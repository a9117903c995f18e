"""A shared-prefix batch (masks over one captured prefix) against stacked copies of the same compressed caches."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from polykv.attention import polykv_attention
from polykv.cache import stack
from polykv.capture import capture
from polykv.compat import with_cache
from polykv.policies import make_policy
from polykv.settings import LayerSetting
from polykv.shared_prefix import SharedPrefixLayer, has_sinks, shareable, shared_batch, shared_prefix_attention


def _settings(layers: int, policy: str, budget: int) -> list[LayerSetting | None]:
    """A ragged mix: one layer kept whole, the others at different budgets."""
    return [None if i == 1 else LayerSetting(make_policy(policy), budget + 3 * i) for i in range(layers)]


@pytest.mark.parametrize("arch", list(TINY))
def test_shared_prefix_batch_equals_stacked_copies(arch):
    """Same logits for a multi-token chunk, then single-token steps, then after rows leave the batch."""
    model = TINY[arch]()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (1, 50), generator=gen)
    cap = capture(model, ids)
    layers = cap.num_layers
    rows = [cap.compress([None] * layers)] + [
        cap.compress(_settings(layers, p, b)) for p in ("snapkv", "streaming", "h2o", "knorm") for b in (6, 20)
    ]
    assert shareable(cap.cache)
    a, b = stack(rows, slack=12), shared_batch(cap.cache, rows, slack=4)  # b must grow its buffer
    n = len(rows)
    steps = [torch.randint(5, model.config.vocab_size, (n, 5), generator=gen)] + [
        torch.randint(5, model.config.vocab_size, (n, 1), generator=gen) for _ in range(4)
    ]
    keep = torch.tensor([0, 2, 3, 5, 8])
    with torch.no_grad(), polykv_attention(model):
        for i, x in enumerate(steps):
            if i == 3:
                a.reorder_cache(keep)
                b.reorder_cache(keep)
            if i >= 3:
                x = x[keep]
            la = model(input_ids=x, **with_cache(model, a), use_cache=True).logits
            lb = model(input_ids=x, **with_cache(model, b), use_cache=True).logits
            torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    assert b.get_seq_length() == 50 + 5 + 4


def test_padded_or_compressed_caches_are_not_shared():
    model = TINY["llama"]()
    ids = torch.randint(5, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    cap = capture(model, ids)
    assert not shareable(cap.cache)  # two rows
    single = capture(model, ids[:1])
    compressed = single.compress([LayerSetting(make_policy("streaming"), 8)] * single.num_layers)
    assert not shareable(compressed)
    with pytest.raises(ValueError, match="use polykv.cache.stack"):
        shared_batch(compressed, [compressed], slack=1)


def test_models_with_attention_sinks_are_detected():
    """gpt-oss-style sinks (`s_aux`) are not implemented by the shared-prefix path: the engine must fall back."""
    model = TINY["llama"]()
    assert not has_sinks(model)
    attn = model.model.layers[0].self_attn
    attn.sinks = torch.nn.Parameter(torch.zeros(model.config.num_attention_heads))
    assert has_sinks(model)


def _offset_layer(dtype: torch.dtype, gen: torch.Generator) -> tuple[SharedPrefixLayer, torch.Tensor]:
    """A 2-row layer (2 KV heads, GQA 3) and its query, whose logits share an offset of 900 (dimension 0 of every
    query and key is 30) and differ by a few units; built in `dtype` from values exact in fp16 and bf16."""
    batch, heads, groups, length, new, dim = 2, 2, 3, 40, 3, 32

    def rand(*shape: int, offset: bool = True) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen).to(torch.bfloat16).float()  # exact in fp16 and bf16 too
        if offset:
            x[..., 0] = 30.0
        return x.to(dtype)

    keys, values = rand(heads, length, dim), rand(heads, length, dim, offset=False)
    bias = torch.zeros(batch, heads, length).masked_fill_(torch.rand(batch, heads, length, generator=gen) < 0.3, -1e30)
    bias = bias.masked_fill_(bias < 0, float("-inf"))
    layer = SharedPrefixLayer(keys, values, bias, None, slack=8)
    layer.update(rand(batch, heads, new, dim), rand(batch, heads, new, dim, offset=False))
    return layer, rand(batch, heads * groups, 1, dim)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"])
def test_shared_prefix_attention_computes_in_fp32(dtype, tol):
    """16-bit inputs give the fp32 result up to the output's rounding: logits rounded to 16 bits (900 +- 2 with a
    spacing of 0.5 in fp16, 4 in bf16) would move the softmax far more than `tol`."""
    layer, query = _offset_layer(dtype, torch.Generator().manual_seed(0))
    ref_layer, ref_query = _offset_layer(torch.float32, torch.Generator().manual_seed(0))
    got = shared_prefix_attention(layer, query, scaling=0.25)
    want = shared_prefix_attention(ref_layer, ref_query, scaling=0.25)
    assert got.dtype == dtype
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * scale)
