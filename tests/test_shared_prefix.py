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
from polykv.shared_prefix import has_sinks, shareable, shared_batch


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
