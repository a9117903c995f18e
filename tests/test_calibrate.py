"""Calibration on a tiny random model: schema, metadata, zero-loss invariants, monotone curves, resume, errors."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import tiny_loaded, write_samples

from polykv.calibrate import CalibrationConfig, calibrate, finish
from polykv.calibrate.schema import SCHEMA, SCHEMA_VERSION
from polykv.data import data_hash, load_samples
from polykv.errors import CalibrationError, DataError, InputError

BUDGETS = (8, 32, 128, 4096)


def run(tmp_path, measure="proxy", n=3, out_name="cal", budgets=BUDGETS, bits=(16,), **kw):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_samples(data, n=n)
    samples = load_samples(data)
    loaded = tiny_loaded()
    config = CalibrationConfig(budgets=budgets, measure=measure, max_context=512, e2e_batch=4, bits=bits)
    out = tmp_path / out_name
    meta = calibrate(loaded, samples, config, out, data_hash(samples), **kw)
    return out, finish(out, meta)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cal")
    out, meta = run(tmp, measure="both")
    return out, meta, pd.read_parquet(out / "curves"), pd.read_parquet(out / "statistics")


def test_schema_and_metadata(both):
    out, meta, curves, stats = both
    for sub in ("curves", "statistics"):
        for part in (out / sub).glob("*.parquet"):
            schema = pq.read_schema(part)
            assert schema.equals(SCHEMA, check_metadata=False)
            assert schema.metadata[b"polykv_schema_version"] == str(SCHEMA_VERSION).encode()
    saved = json.loads((out / "metadata.json").read_text())
    assert saved["model"] == "tiny-llama"
    assert saved["fingerprint"]["num_layers"] == 3 and saved["fingerprint"]["num_kv_heads"] == [2, 2, 2]
    assert saved["fingerprint_hash"] == curves.fingerprint.iloc[0]
    assert saved["data_hash"] and saved["polykv_version"] and saved["settings"]["budgets"] == list(BUDGETS)
    assert "bits" not in saved["settings"] and "bits" not in curves.columns  # 16 bits only: the format before bits
    assert set(saved["settings"]["policy_params"]["snapkv"]) == {"window", "kernel", "pooling"}
    assert set(saved["timings"]["per_sample"]) == {"s0", "s1", "s2"}
    assert set(curves.metric) == {"proxy_err", "proxy_mass", "e2e_dnll", "e2e_kl"}
    n_policies = len(saved["settings"]["policies"])
    assert len(curves) == 3 * 3 * n_policies * len(BUDGETS) * 4
    assert curves["head"].isna().all() and stats["policy"].isna().all()
    assert {"stat_entropy", "stat_sink_mass", "stat_topk_mass@16", "stat_answer_overlap@64"} <= set(stats.metric)
    assert stats["head"].notna().all()


def test_full_and_whole_context_have_zero_loss(both):
    _, _, curves, _ = both
    zero = curves[(curves.policy == "full") | (curves.budget == 4096)]
    loss = zero[zero.metric.isin(["proxy_err", "e2e_dnll", "e2e_kl"])]
    assert (loss.value.abs() < 1e-6).all()
    mass = zero[zero.metric == "proxy_mass"]
    assert (mass.value - 1).abs().max() < 1e-6
    # and compression does hurt somewhere (the measurement is not vacuous)
    assert curves[(curves.metric == "proxy_err") & (curves.budget == 8)].value.max() > 0.05


def test_streaming_loss_never_rises_with_budget(both):
    """streaming's kept sets are nested as the budget grows, so the kept attention mass can only grow."""
    _, _, curves, _ = both
    s = curves[(curves.policy == "streaming") & (curves.metric == "proxy_mass")]
    for _, group in s.groupby(["sample_id", "layer"]):
        values = group.sort_values("budget").value.to_numpy()
        assert (values[1:] >= values[:-1] - 1e-9).all()


def test_resume_after_crash_equals_uninterrupted(tmp_path, both):
    class Crash(Exception):
        pass

    seen = []

    def crash_on_second(index, configs):
        seen.append(index)
        if len(seen) == 2:
            raise Crash

    with pytest.raises(Crash):
        run(tmp_path, out_name="resumed", on_sample=crash_on_second)
    assert len(list((tmp_path / "resumed" / "curves").glob("*.parquet"))) == 1
    assert not (tmp_path / "resumed" / "metadata.json").exists()
    out, _ = run(tmp_path, out_name="resumed")
    clean, _ = run(tmp_path, out_name="clean")
    a = pd.read_parquet(out / "curves").sort_values(["sample_id", "layer", "policy", "budget", "metric"])
    b = pd.read_parquet(clean / "curves").sort_values(["sample_id", "layer", "policy", "budget", "metric"])
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_other_settings_in_out_dir_is_refused(tmp_path):
    run(tmp_path, out_name="x")
    data = tmp_path / "data.jsonl"
    samples = load_samples(data)
    with pytest.raises(CalibrationError, match="other settings .*budgets"):
        calibrate(
            tiny_loaded(),
            samples,
            CalibrationConfig(budgets=(8, 16), max_context=512),
            tmp_path / "x",
            data_hash(samples),
        )


def test_bad_data_and_options_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        load_samples(empty)
    with pytest.raises(InputError, match="no calibration samples"):
        calibrate(tiny_loaded(), [], CalibrationConfig(), tmp_path / "o", "h")
    with pytest.raises(InputError, match="unknown --measure"):
        CalibrationConfig(measure="fast").check()
    with pytest.raises(InputError, match="unknown policies nope"):
        CalibrationConfig(policies=("nope",)).check()


def test_select_samples_round_robin_across_categories():
    from types import SimpleNamespace

    from polykv.calibrate import round_robin, select_samples

    items = [SimpleNamespace(id=f"{c}{i}", category=c) for c in "abc" for i in range(3)]
    assert [s.id for s in select_samples(items, 4)] == ["a0", "b0", "c0", "a1"]
    assert select_samples(items, None) == items and select_samples(items, 99) == items
    order = round_robin(items)  # refine's search + held-out split: the search set is what calibrate took
    assert sorted(s.id for s in order) == sorted(s.id for s in items)
    assert order[:4] == select_samples(items, 4) and order != items  # all 9: still round-robin


def test_proxy_equals_its_dense_definition():
    """Proxy = |softmax over kept columns @ V - full output| / |full output|, mass = kept share of prompt attention,
    computed here densely from the answer queries and keys (no gather, no batching) for every option; at 4 bits the
    kept keys and values are read quantized then dequantized (the logits of the kept columns change too) and the
    mass is their probability under the full cache's normaliser."""
    import torch

    from polykv.calibrate.runner import calibration_options
    from polykv.calibrate.sample import prepare
    from polykv.calibrate.sensitivity import proxy_losses
    from polykv.quantize import KEY_AXIS, VALUE_AXIS, round_trip

    lm = tiny_loaded()
    prepared = prepare(
        lm.model,
        lm.tokenizer,
        "alpha beta gamma " * 20 + "The key is 417. " + "delta " * 30,
        "What is the key?",
        "417",
        None,
        16,
    )
    options = calibration_options(CalibrationConfig(max_context=None, bits=(16, 4)), prepared.prompt_tokens)
    assert {o.bits for o in options} == {16, 4}
    for layer in range(len(prepared.capture.cache.layers)):
        obs = prepared.capture.observation(layer)
        q = prepared.answer_queries[layer][0].double()
        keys, values = prepared.answer_keys[layer]
        g = q.shape[0] // keys.shape[1]
        k, v = (t[0].double().repeat_interleave(g, 0) for t in (keys, values))
        t, m = obs.num_tokens, q.shape[1]
        causal = torch.ones(m, t + m, dtype=torch.bool).tril(diagonal=t)
        logits = (q @ k.transpose(-1, -2) * obs.scaling).masked_fill(~causal, float("-inf"))
        full = torch.softmax(logits, -1) @ v
        by_bits = {}
        for opt, (err, mass) in zip(options, proxy_losses(prepared, layer, options), strict=True):
            idx = opt.setting.kept_indices(obs)
            keep = torch.zeros(k.shape[0] // g, t + m, dtype=torch.bool)
            keep[:, t:] = True
            keep.scatter_(1, idx[0], True)
            read_k, read_v = keys.clone(), values.clone()
            for read, axis in ((read_k, KEY_AXIS), (read_v, VALUE_AXIS)):
                kept = read.gather(2, idx[..., None].expand(-1, -1, -1, read.shape[-1]))
                read.scatter_(2, idx[..., None].expand_as(kept), round_trip(kept, opt.bits, axis))
            rk, rv = (t_[0].double().repeat_interleave(g, 0) for t_ in (read_k, read_v))
            read_logits = (q @ rk.transpose(-1, -2) * obs.scaling).masked_fill(~causal, float("-inf"))
            kept_logits = read_logits.masked_fill(~keep.repeat_interleave(g, 0)[:, None, :], float("-inf"))
            out = torch.softmax(kept_logits, -1) @ rv
            probs = torch.softmax(logits, -1)[..., :t]
            read_probs = (read_logits - torch.logsumexp(logits, -1, keepdim=True)).exp()[..., :t]
            want_mass = (read_probs * keep.repeat_interleave(g, 0)[:, None, :t]).sum() / probs.sum()
            assert err == pytest.approx(float((out - full).norm() / full.norm()), rel=1e-4, abs=1e-5)
            assert mass == pytest.approx(float(want_mass), rel=1e-4)
            by_bits.setdefault((opt.policy, opt.budget), {})[opt.bits] = err
        at_4 = [e for e in by_bits.values() if 4 in e]  # every policy but full, at 4 bits
        assert at_4 and all(e[4] > 0 and e[4] != e[16] for e in at_4)  # 4 bits always err, even keeping all


def test_scaled_measure_adds_reference_rows_equal_to_e2e_and_solves_proxy_scaled(tmp_path):
    """`--measure scaled`: proxy curves plus e2e KL / proxy error at the reference options; the KL rows equal what
    `both` measures there, and solve's default metric becomes each layer's proxy curve times its KL/proxy scale."""
    import numpy as np

    from polykv.calibrate.runner import REFERENCE_OPTIONS
    from polykv.solve import aggregate, load_calibration

    grid = (8, 32, 64, 128, 4096)  # holds the references' budget, to compare with `both`
    out, _ = run(tmp_path, measure="scaled", budgets=grid)
    ref_out, _ = run(tmp_path, measure="both", out_name="both64", budgets=grid)
    curves, full = pd.read_parquet(out / "curves"), pd.read_parquet(ref_out / "curves")
    assert set(curves.metric) == {"proxy_err", "proxy_mass", "ref_e2e_kl", "ref_proxy_err", "uniform_e2e_kl"}
    refs = curves[curves.metric == "ref_e2e_kl"]
    assert set(zip(refs.policy, refs.budget, strict=True)) == set(REFERENCE_OPTIONS) and len(refs) == 3 * 3 * 2
    key = ["sample_id", "layer", "policy", "budget"]
    got = refs.merge(full[full.metric == "e2e_kl"], on=key, suffixes=("", "_e2e"))
    assert len(got) == len(refs) and np.allclose(got.value, got.value_e2e, atol=1e-6)
    cal = load_calibration(out)
    assert aggregate(cal.curves, cal.fingerprint, cal.model).metric == "proxy_anchored"  # the default
    table = aggregate(cal.curves, cal.fingerprint, cal.model, metric="proxy_scaled")
    proxy = aggregate(cal.curves, cal.fingerprint, cal.model, metric="proxy_err")
    for layer in range(3):
        kl = refs[refs.layer == layer].value.sum()
        err = curves[(curves.metric == "ref_proxy_err") & (curves.layer == layer)].value.sum()
        a, b = table.frame[table.frame.layer == layer].loss, proxy.frame[proxy.frame.layer == layer].loss
        assert np.allclose(a.to_numpy(), b.to_numpy() * kl / err)


def test_uniform_anchors_equal_a_direct_measurement_and_anchor_the_solve(tmp_path):
    """`uniform_e2e_kl` (layer -1) is the answer KL with every layer compressed by one option, measured in padded
    batches: it equals a one-row measurement; `proxy_anchored` curves then sum over layers to exactly that value at
    every anchored (policy, budget), and keep each layer's proxy_scaled shape."""
    import numpy as np
    import torch

    from polykv.attention import polykv_attention
    from polykv.calibrate.sample import prepare
    from polykv.compat import with_cache
    from polykv.policies import make_policy
    from polykv.settings import LayerSetting
    from polykv.solve import aggregate, load_calibration

    out, _ = run(tmp_path, measure="scaled", budgets=(8, 32, 64, 128, 4096))
    curves = pd.read_parquet(out / "curves")
    anchors = curves[curves.metric == "uniform_e2e_kl"]
    assert set(anchors.layer) == {-1} and set(anchors.budget) <= {8, 32, 64, 128} and len(anchors)
    assert (anchors.value >= -1e-6).all()
    sample = load_samples(tmp_path / "data.jsonl")[0]
    loaded = tiny_loaded()
    prepared = prepare(loaded.model, loaded.tokenizer, sample.context, sample.question, sample.answers[0], 512, 64)
    for r in anchors[anchors.sample_id == sample.id].head(6).itertuples():
        cache = prepared.capture.compress([LayerSetting(make_policy(r.policy), int(r.budget))] * 3)
        with torch.no_grad(), polykv_attention(loaded.model):
            logits = loaded.model(
                input_ids=prepared.answer_in, **with_cache(loaded.model, cache), use_cache=True
            ).logits
        lp = torch.log_softmax(logits[0].float(), -1)
        full = prepared.full_logprobs
        assert r.value == pytest.approx(float((full.exp() * (full - lp)).sum(-1).mean()), rel=1e-4, abs=1e-6)

    cal = load_calibration(out)
    scaled = aggregate(cal.curves, cal.fingerprint, cal.model, metric="proxy_scaled")
    anchored = aggregate(cal.curves, cal.fingerprint, cal.model, metric="proxy_anchored")
    assert anchored.metric == "proxy_anchored"
    measured = anchors.groupby(["policy", "budget"])["value"].mean()
    shaped = 0
    for (policy, budget), want in measured.items():
        got = sum(anchored.predicted_loss(layer, policy, int(budget)) for layer in range(3))
        assert got == pytest.approx(max(want, 0.0), rel=1e-6, abs=1e-12)
        ratio = [
            anchored.predicted_loss(layer, policy, int(budget)) / s
            for layer in range(3)
            if (s := scaled.predicted_loss(layer, policy, int(budget))) > 0
        ]
        assert np.allclose(ratio, ratio[:1])  # one factor per (policy, budget): the layers' shape is kept
        shaped += len(ratio) > 1
    assert shaped


def test_bits_measure_every_option_at_every_width_from_one_prefill_and_solve(tmp_path):
    """`--bits 16,4`: the curves gain a `bits` column with rows at both widths (references at 16 only); a 4-bit row
    reads the layer's kept keys and values as the quantized storage does, so its e2e KL and its whole-model anchor
    equal a measurement over a real quantized cache; `solve` on it gives a valid plan that may mix widths."""
    import torch

    from polykv.attention import polykv_attention
    from polykv.calibrate.sample import prepare
    from polykv.calibrate.schema import CURVES_WITH_BITS
    from polykv.compat import with_cache
    from polykv.plan import Plan
    from polykv.policies import make_policy
    from polykv.settings import LayerSetting
    from polykv.solve import aggregate, load_calibration, solve_plan

    out, meta = run(tmp_path, measure="scaled", budgets=(8, 32, 4096), bits=(16, 4))
    both, _ = run(tmp_path, measure="e2e", budgets=(8, 32), bits=(16, 4), out_name="e2e", n=1)
    assert meta["settings"]["bits"] == [16, 4]
    for part in (out / "curves").glob("*.parquet"):
        assert pq.read_schema(part).equals(CURVES_WITH_BITS, check_metadata=False)
    curves = pd.read_parquet(out / "curves")
    assert set(curves[curves.metric == "proxy_err"].bits) == {16, 4}
    assert set(curves[curves.metric.str.startswith("ref_")].bits) == {16}
    assert set(curves[curves.metric == "uniform_e2e_kl"].bits) == {16, 4}
    key = ["sample_id", "layer", "policy", "budget", "metric"]
    proxy = curves[curves.metric == "proxy_err"]
    pairs = proxy[proxy.bits == 4].merge(proxy[proxy.bits == 16], on=key, suffixes=("_4", "_16"))
    assert len(pairs) == (proxy.bits == 4).sum() and (pairs.value_4 >= 0).all()
    assert (pairs.value_4 != pairs.value_16).all()

    sample = load_samples(tmp_path / "data.jsonl")[0]
    loaded = tiny_loaded()
    prepared = prepare(loaded.model, loaded.tokenizer, sample.context, sample.question, sample.answers[0], 512, 64)
    assert prepared.answer_in.shape[1] < 32  # answers shorter than a group stay unquantized in the storage too

    def kl(settings) -> float:
        cache = prepared.capture.compress(settings)
        assert any(layer.quantized is not None for layer in cache.layers)
        with torch.no_grad(), polykv_attention(loaded.model):
            logits = loaded.model(input_ids=prepared.answer_in, **with_cache(loaded.model, cache), use_cache=True)
        lp, full = torch.log_softmax(logits.logits[0].float(), -1), prepared.full_logprobs
        return float((full.exp() * (full - lp)).sum(-1).mean())

    anchors = curves[(curves.metric == "uniform_e2e_kl") & (curves.bits == 4) & (curves.sample_id == sample.id)]
    e2e = pd.read_parquet(both / "curves")
    e2e = e2e[(e2e.metric == "e2e_kl") & (e2e.bits == 4)]
    assert len(anchors) and len(e2e)
    for r in anchors.itertuples():
        setting = LayerSetting(make_policy(r.policy), int(r.budget), 4)
        assert r.value == pytest.approx(kl([setting] * 3), rel=1e-4, abs=1e-6)
    for r in e2e[e2e.layer == 1].head(4).itertuples():
        settings = [None, LayerSetting(make_policy(r.policy), int(r.budget), 4), None]
        assert r.value == pytest.approx(kl(settings), rel=1e-4, abs=1e-6)

    cal = load_calibration(out)
    table = aggregate(cal.curves, cal.fingerprint, cal.model)
    assert table.precision and table.bits == (16, 4)
    plan = solve_plan(table, 8)
    Plan.from_dict(json.loads(plan.to_json()))  # valid
    assert plan.schema_version == 2 and 4 in {lp.bits for lp in plan.layers}  # 4 bits buy tokens 16 bits cannot
    assert plan.used_budget <= plan.total_budget == table.cost_model.total(8)


@pytest.mark.parametrize(
    "bits, match",
    [("3", "KV precision must be 16, 8, 4 or 2"), ("16,x", "--bits must be a comma list"), ("4,4", "twice")],
)
def test_calibrate_cli_rejects_bad_bits_in_one_line(tmp_path, bits, match):
    import typer
    from typer.testing import CliRunner

    from polykv_cli import calibrate_cmd

    app = typer.Typer(pretty_exceptions_enable=False)
    calibrate_cmd.register(app)
    app.command("noop")(lambda: None)  # two commands: `calibrate` is addressed by name
    r = CliRunner().invoke(app, ["calibrate", "--bits", bits, "--out", str(tmp_path / "o"), "--model", "nope"])
    assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output
