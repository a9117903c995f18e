"""Which path serves each attention call: sinks stay off the fast paths, masks follow each layer's device, and
`kernels.recording` names what actually ran."""

from __future__ import annotations

import pytest
import torch

from polykv import kernels
from polykv.apply import apply
from polykv.attention import CACHE_KWARG, polykv_attention, register
from polykv.cache import PolyKVCache
from polykv.compat import output_cache, with_cache


def tiny_gpt_oss():
    """A 2-layer gpt-oss (one full, one sliding layer) whose learned attention sinks are large enough to matter."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["full_attention", "sliding_attention"],
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg._attn_implementation = "eager"
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 3.0, 0.5]))
    return model


@torch.no_grad()
def test_attention_sinks_take_the_torch_path(monkeypatch):
    """With Triton forced (interpreted on CPU), a decode step of a layer with sinks (`s_aux`) must not take the
    flash-decoding kernel, which has no sink term: the compressed-cache model then equals plain transformers."""
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    model = tiny_gpt_oss()
    ids, nxt = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 1))
    plain = output_cache(model(ids, use_cache=True))
    want = model(nxt, **with_cache(model, plain), use_cache=True).logits
    with apply(model, ("full", 64)):  # every layer served from a PolyKVCache, nothing evicted
        cache = output_cache(model(ids))
    with kernels.recording() as ran, polykv_attention(model):
        got = model(nxt, **with_cache(model, cache), use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert kernels.describe_ran(ran) == {"decode": "torch eager"}


def test_attention_sinks_refuse_sdpa():
    """transformers' sdpa drops `s_aux` silently (gpt-oss refuses sdpa, a future sink model may not): with a
    compressed cache that is a clear error instead."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register()
    model = tiny_gpt_oss()
    attn = model.model.layers[0].self_attn
    q, kv = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
    cache = PolyKVCache.for_config(model.config)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        ALL_ATTENTION_FUNCTIONS["polykv_sdpa"](attn, q, kv, kv, None, s_aux=attn.sinks, **{CACHE_KWARG: cache})


# With `--device-map auto` the layers sit on several devices while the 2-D padding mask (`column_valid`) lives on the
# input's. There is one CPU here, so the "other device" is `meta`: a layer on it must get its masks and the
# observation its policies rank with on `meta`, never on the input's CPU.
META = torch.device("meta")


def _meta_layer(batch: int = 2, tokens: int = 6):
    from polykv.cache import PolyKVLayer

    layer = PolyKVLayer()
    layer.update(torch.empty(batch, 2, tokens, 4, device=META), torch.empty(batch, 2, tokens, 4, device=META))
    return layer


def _left_padding(batch: int = 2, tokens: int = 6) -> torch.Tensor:
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    valid[1, :2] = False
    return valid


def test_visibility_is_built_on_the_layers_device():
    layer = _meta_layer()
    layer.fresh = False
    vis = layer.visible(torch.arange(5, 6, device=META), _left_padding())
    assert vis.device == META


def test_prefill_observation_is_on_the_layers_device():
    """What policies score and rank with (the observation's padding mask) follows the layer, not the input."""
    from types import SimpleNamespace

    from polykv.attention import cache_after_prefill

    seen = []
    cache = PolyKVCache([_meta_layer()], observer=SimpleNamespace(record=lambda *args: seen.append(args[-1])))
    cache.column_valid = _left_padding()
    cache_after_prefill(cache, 0, torch.empty(2, 4, 6, 4, device=META), None, None)
    assert [v.device for v in seen] == [META]


@pytest.mark.parametrize(
    "backend,served",
    [
        ("torch", {"prefill": "torch sdpa", "score": "torch", "gather": "torch", "decode": "torch sdpa"}),
        ("triton", {"prefill": "torch sdpa", "score": "triton", "gather": "triton", "decode": "triton"}),
    ],
)
def test_run_json_names_what_served_each_path(tiny_hf_dir, backend, served):
    """`polykv run --json` reports per path what ran (Triton interpreted on CPU), not the backend asked for; in
    context-only mode the question is a chunk over the compressed cache, served by masked sdpa."""
    import json

    from typer.testing import CliRunner

    from polykv_cli.main import app

    args = ["run", "--model", str(tiny_hf_dir), "--policy", "snapkv", "--budget", "4", "--max-new-tokens", "3"]
    args += ["--prompt", "alpha beta gamma delta The key is 42 .", "--question", "What is the key ?", "--json"]
    for mode, expected in (("query-aware", served), ("context-only", {**served, "chunk": "torch sdpa"})):
        result = CliRunner().invoke(app, [*args, "--mode", mode], env={kernels.ENV_VAR: backend})
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["kernels"] == expected, mode
