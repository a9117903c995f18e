"""KV precision cost: exact bytes of a layer at 16, 8, 4 and 2 bits, and the plan cost model built on them."""

from __future__ import annotations

import pytest

from polykv.errors import PlanError
from polykv.plan import CostModel
from polykv.precision import GROUP, SUPPORTED_BITS, kv_bytes, supported


def fingerprint(heads: list[int], dims: list[int], sliding: tuple[int, ...] = (), window: int | None = None) -> dict:
    n = len(heads)
    return {
        "model_type": "llama",
        "num_layers": n,
        "num_kv_heads": heads,
        "head_dim": dims,
        "layer_types": ["sliding_attention" if i in sliding else "full_attention" for i in range(n)],
        "sliding_window": window if sliding else None,
    }


@pytest.mark.parametrize(
    "tokens, heads, dim, bits, value_dim, expected",
    [
        # 16 bits: 2 bytes x heads x tokens x (D_k + D_v) = 2 x 2 x 100 x 128
        (100, 2, 64, 16, None, 51200),
        # codes 2 x (2 x 100 x 64 x 4 / 8) = 12800; key groups 2 x 64 x ceil(100/32) = 512; value groups
        # 2 x 100 x ceil(64/32) = 400; a 2-byte scale and zero per group: 4 x 912 = 3648
        (100, 2, 64, 4, None, 16448),
        # codes 2 x 32 x 128 = 8192; key groups 128 x 1, value groups 32 x 4: 4 x 256 = 1024
        (32, 1, 128, 8, None, 9216),
        # one token past a key group: codes 2 x ceil(33 x 128 x 2 / 8) = 2112; groups 128 x 2 + 33 x 4 = 388: 1552
        (33, 1, 128, 2, None, 3664),
        # head dim not a multiple of the group: codes 2 x 400 = 800; groups 80 x 1 + 10 x ceil(80/32) = 110: 440
        (10, 1, 80, 4, None, 1240),
        # values narrower than keys: codes 320 + 160; groups 64 x 1 + 10 x 1 = 74: 296
        (10, 1, 64, 4, 32, 776),
        # a partial byte is stored whole: ceil(1 x 1 x 4 x 2 / 8) = 1 per K and V; groups 4 + 1: 20
        (1, 1, 4, 2, None, 22),
    ],
)
def test_kv_bytes_exact(tokens, heads, dim, bits, value_dim, expected):
    assert kv_bytes(tokens, heads, dim, bits, value_dim) == expected


def test_fewer_bits_hold_more_tokens_for_the_same_bytes():
    """Per token at head dim 128 (full key groups): 16 bits 4 x D, 4 bits D + 8 x D / 32 = 1.25 D, 2 bits 0.75 D."""
    assert GROUP == 32 and SUPPORTED_BITS == (16, 8, 4, 2)
    per_token = {q: kv_bytes(1024, 8, 128, q) / 1024 for q in SUPPORTED_BITS}
    assert per_token == {16: 4096.0, 8: 2304.0, 4: 1280.0, 2: 768.0}
    assert 3 < per_token[16] / per_token[4] < 4


@pytest.mark.parametrize("bits", [3, 32, 0, "4", 4.0, True, None])
def test_unsupported_bits(bits):
    assert not supported(bits)
    with pytest.raises(ValueError, match="16, 8, 4 or 2"):
        kv_bytes(8, 1, 16, bits)


def test_cost_model_with_precision_is_in_bytes_and_totals_the_16_bit_plan():
    fp = fingerprint([2, 2, 2], [16, 16, 16])
    plain, precise = CostModel.for_fingerprint(fp), CostModel.for_fingerprint(fp, precision=True)
    assert plain.unit == "tokens" and precise.unit == "bytes"
    assert precise.per_token == (128,) * 3
    assert precise.total(32) == 3 * 128 * 32 == 128 * plain.total(32)
    assert precise.cost(0, 32) == 4096 and precise.cost(0, 32, 4) == kv_bytes(32, 2, 16, 4) == 1408
    with pytest.raises(PlanError, match="needs a cost in bytes"):
        plain.cost(0, 32, 4)


def test_cost_model_with_precision_caps_sliding_layers_and_prices_each_geometry():
    fp = fingerprint([1, 4], [256, 64], sliding=(0,), window=8)
    cm = CostModel.for_fingerprint(fp, precision=True)
    assert cm.caps == (7, None) and cm.geometry == ((1, 256), (4, 64))
    assert cm.cost(0, 100, 2) == kv_bytes(7, 1, 256, 2)  # a sliding layer holds at most window - 1 tokens
    assert cm.cost(1, 100, 8) == kv_bytes(100, 4, 64, 8)
    assert cm.cost(1, 100) == CostModel.for_fingerprint(fp).cost(1, 100) == 2 * 4 * 64 * 2 * 100


def test_plan_chart_labels_bars_with_bits_only_below_16(tmp_path, monkeypatch):
    import matplotlib.axes

    from polykv.evaluate.report import plot_plan
    from polykv.plan import LayerPlan, Plan, schema_version_for, uniform_plan

    labels: list[dict] = []
    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", lambda self, bars, **kw: labels.append(kw))
    fp = fingerprint([2, 2], [16, 16])
    cm = CostModel.for_fingerprint(fp, precision=True)
    layers = [LayerPlan(0, "snapkv", 64, {}, None, 4), LayerPlan(1, "h2o", 16, {})]
    plan = Plan(schema_version_for(layers), "m", fp, 32.0, cm.total(32), cm.unit, layers, None, {"solver": "t"})
    for name, p in (("v1", uniform_plan("m", fp, "snapkv", 32)), ("v2", plan)):
        (tmp_path / f"{name}.json").write_text(p.to_json())
        assert plot_plan(tmp_path / f"{name}.json", tmp_path / f"{name}.png").stat().st_size > 0
    assert labels == [{"labels": ["4", "16"], "fontsize": 6}]


def test_a_version_2_plan_runs_at_its_bits_and_holds_the_bytes_it_was_priced_at(tmp_path):
    """`polykv run --plan` (and `apply`) store each layer at the plan's bits; right after the prefill the cache holds
    exactly `used_budget` bytes (batch 1, a 16-bit model dtype, every budget below the prompt's length)."""
    import torch
    from conftest import tiny_loaded

    from polykv.apply import resolve_settings
    from polykv.models import fingerprint as model_fingerprint
    from polykv.plan import LayerPlan, Plan, schema_version_for
    from polykv.run import run

    loaded = tiny_loaded()
    loaded.model.to(torch.bfloat16)
    fp = model_fingerprint(loaded.model.config)
    cm = CostModel.for_fingerprint(fp, precision=True)
    layers = [LayerPlan(0, "snapkv", 40, {}, None, 4), LayerPlan(1, "streaming", 24, {}, None, 16)]
    layers.append(LayerPlan(2, "knorm", 33, {}, None, 2))
    provenance = {"polykv_version": "test", "solver": "t"}
    plan = Plan(schema_version_for(layers), "tiny", fp, 32.0, cm.total(48), cm.unit, layers, None, provenance)
    plan.save(tmp_path / "plan.json")
    settings = resolve_settings(loaded.model, tmp_path / "plan.json")
    assert [s.bits for s in settings] == [4, 16, 2]
    result = run(loaded, settings, "alpha beta gamma delta " * 20, "What?", max_new_tokens=4)
    assert result.kept_tokens == [40, 24, 33]
    assert result.kv_bytes == plan.used_budget == sum(kv_bytes(n, 2, 16, b) for n, b in ((40, 4), (24, 16), (33, 2)))
    assert [layer.get("bits", 16) for layer in result.layers] == [4, 16, 2]
    plain = resolve_settings(loaded.model, [{"policy": "snapkv", "budget": 40, "bits": 8}] * 3)
    assert [s.bits for s in plain] == [8, 8, 8]


@pytest.mark.parametrize("bits", [3, "4", True])
def test_a_layer_list_with_unsupported_bits_is_one_clear_line(bits):
    from polykv.errors import InputError
    from polykv.settings import from_layer_dicts

    with pytest.raises(InputError, match="layer 1 of the plan: KV precision must be 16, 8, 4 or 2") as exc:
        from_layer_dicts([{"policy": "snapkv", "budget": 8}, {"policy": "snapkv", "budget": 8, "bits": bits}], 2)
    assert "\n" not in str(exc.value)
