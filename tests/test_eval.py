"""The evaluation engine (prefill once, compress many), gap-recovery arithmetic and the CLI on the bundled model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import tiny_loaded
from typer.testing import CliRunner

from polykv.evaluate.engine import evaluate_instance, reprefill_instance
from polykv.evaluate.methods import parse_methods
from polykv.evaluate.report import summary
from polykv.evaluate.tasks import TaskInstance


def _instances(n=2):
    return [
        TaskInstance(
            f"i{k}",
            "retrieval",
            "alpha beta gamma " * 30 + f"the code is {700 + k}. " + "delta " * 20,
            "What is the code?",
            [str(700 + k)],
            "substring",
            6,
        )
        for k in range(n)
    ]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "stacked"])
@pytest.mark.parametrize("mode", ["query-aware", "context-only"])
def test_engine_equals_compressing_during_prefill(mode, shared):
    loaded = tiny_loaded()
    methods = parse_methods("full,uniform:snapkv,uniform:streaming,uniform:h2o,pyramid", None)
    for inst in _instances():
        fast = evaluate_instance(loaded, inst, methods, [16, 48], mode=mode, max_rows=3, shared_prefix=shared)
        slow, _ = reprefill_instance(loaded, inst, methods, [16, 48], mode=mode)
        assert len(fast.rows) == len(slow) == 1 + 4 * 2
        got = {(r["method"], r["budget"]): r["prediction"] for r in fast.rows}
        for r in slow:
            assert got[(r["method"], r["budget"])] == r["prediction"], (r["method"], r["budget"])


def _padded(group: list[int], widths: list[list[int]]) -> int:
    """Tokens a batch of `group` holds: every row padded to the widest row, per layer."""
    return len(group) * sum(max(widths[j][layer] for j in group) for layer in range(len(widths[0])))


def _allowed(group: list[int], widths: list[list[int]], max_rows: int, max_tokens: int) -> bool:
    return len(group) <= max_rows and (_padded(group, widths) <= max_tokens or len(group) == 1)


def test_partition_is_the_cheapest_contiguous_split_within_limits():
    """The batch partition against brute force over every split of the width-sorted jobs."""
    import itertools
    import random

    from polykv.evaluate.batching import partition

    rng = random.Random(0)
    for _ in range(30):
        n, layers = rng.randint(1, 7), rng.randint(1, 3)
        widths = [[rng.choice([4, 8, 16, 64, 300]) for _ in range(layers)] for _ in range(n)]
        fixed, max_rows, max_tokens = rng.choice([0, 50, 1000]), rng.randint(1, 4), rng.choice([10**6, 700])
        order = sorted(range(n), key=lambda j: sum(widths[j]))

        best = min(
            sum(fixed + _padded(g, widths) for g in groups)
            for cuts in itertools.product([False, True], repeat=n - 1)
            for groups in [
                [
                    order[a:b]
                    for a, b in zip(
                        [0] + [i + 1 for i, c in enumerate(cuts) if c],
                        [i + 1 for i, c in enumerate(cuts) if c] + [n],
                        strict=True,
                    )
                ]
            ]
            if all(_allowed(g, widths, max_rows, max_tokens) for g in groups)
        )
        got = partition(widths, fixed, max_rows, max_tokens)
        assert sorted(j for g in got for j in g) == list(range(n)) and all(
            _allowed(g, widths, max_rows, max_tokens) for g in got
        )
        assert sum(fixed + _padded(g, widths) for g in got) == best


def test_finished_rows_leaving_the_batch_changes_no_token():
    """greedy() drops rows once they hit EOS; every row's tokens equal a run where nobody leaves."""
    import torch

    from polykv.cache import stack
    from polykv.capture import capture
    from polykv.generation import greedy
    from polykv.policies import make_policy
    from polykv.settings import LayerSetting

    loaded = tiny_loaded()
    model = loaded.model
    ids = torch.randint(5, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(3))
    cap = capture(model, ids)
    caches = [
        cap.compress([LayerSetting(make_policy(p), b)] * cap.num_layers)
        for p in ("streaming", "snapkv", "h2o")
        for b in (8, 24)
    ]
    first = cap.last_logits.expand(len(caches), -1)
    free = greedy(model, stack(caches), first, 10)
    eos = {int(free[0, 2]), int(free[3, 4])}  # rows stop at different steps
    kept = greedy(model, stack(caches), first, 10, eos, shrink=2.0)  # never shrinks
    dropped = greedy(model, stack(caches, slack=10), first, 10, eos, shrink=0.0)  # leaves at once
    assert torch.equal(kept, dropped)
    for row in range(len(caches)):
        stop = next((i for i, t in enumerate(free[row].tolist()) if t in eos), None)
        if stop is not None:
            assert torch.equal(kept[row, : stop + 1], free[row, : stop + 1]) and set(
                kept[row, stop + 1 :].tolist()
            ) <= {min(eos)}
    assert (kept == min(eos)).any()


def test_gap_recovery_arithmetic():
    rows = []
    for task, base in (("a", 0), ("b", 10)):
        for method, budget, s in [
            ("full", None, 90),
            ("uniform:x", 64, 50),
            ("uniform:y", 64, 60),
            ("plan", 64, 75),
            ("uniform:x", 128, 80),
            ("plan", 128, 70),
        ]:
            rows.append({"task": task, "method": method, "budget": budget, "score": s + base, "instance_id": task})
    summ = summary(pd.DataFrame(rows), "m")
    b64 = summ["budgets"]["64"]
    assert b64["full"] == 95 and b64["best_uniform"] == {"method": "uniform:y", "score": 65.0} and b64["plan"] == 80
    assert b64["gap_recovery"] == pytest.approx((80 - 65) / (95 - 65))
    assert summ["budgets"]["128"]["gap_recovery"] == pytest.approx((75 - 85) / (95 - 85))
    rows = [r for r in rows if not (r["method"] == "full")] + [
        {"task": t, "method": "full", "budget": None, "score": 80.0 + (10 if t == "b" else 0), "instance_id": t}
        for t in "ab"
    ]
    assert summary(pd.DataFrame(rows), "m")["budgets"]["128"]["gap_recovery"] is None
    # a uniform policy above the full cache (sampling noise) leaves no gap either: null, not a flipped ratio
    rows = [dict(r, score=r["score"] + 3) if (r["method"], r["budget"]) == ("uniform:x", 128) else r for r in rows]
    assert summary(pd.DataFrame(rows), "m")["budgets"]["128"]["gap_recovery"] is None


def test_unknown_method_is_a_clear_error():
    from polykv.errors import InputError

    with pytest.raises(InputError, match="unknown method 'snap'"):
        parse_methods("full,snap", None)


@pytest.mark.bundled
def test_eval_cli_on_bundled_model(tmp_path, monkeypatch):
    """A short end-to-end eval in CI: full >= heavy compression on retrieval, with JSON on stdout; killed after one
    instance, it resumes from its checkpoint (and refuses to mix in other settings)."""
    from polykv_cli.main import app

    tasks = tmp_path / "tasks.jsonl"
    context = (__import__("pathlib").Path(__file__).parents[1] / "examples" / "passkey.txt").read_text()
    lines = [
        json.dumps(
            {
                "id": f"p{k}",
                "task": "passkey",
                "context": context.replace("pineapple", word),
                "question": "What is the passkey for the archive? Answer with the passkey only.",
                "answers": [word],
                "metric": "substring",
                "max_new_tokens": 12,
            }
        )
        for k, word in enumerate(["pineapple", "lighthouse"])
    ]
    tasks.write_text("\n".join(lines) + "\n{not json\n")
    args = [
        "eval",
        "--tasks",
        str(tasks),
        "--budgets",
        "16,128",
        "--methods",
        "full,uniform:snapkv,uniform:streaming",
        "--out",
        str(tmp_path / "ev"),
        "--json",
    ]
    import polykv.evaluate.engine as engine

    real, calls = engine.evaluate_instance, []

    def dies_on_second(*a, **kw):  # the run is killed while evaluating the second instance
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(engine, "evaluate_instance", dies_on_second)
    assert CliRunner().invoke(app, args).exit_code != 0
    partial = pd.read_parquet(tmp_path / "ev" / "results.partial.parquet")
    assert set(partial.instance_id) == {"p0"} and not (tmp_path / "ev" / "results.parquet").exists()
    other = CliRunner().invoke(app, [a if a != "16,128" else "16" for a in args])
    assert other.exit_code == 2 and "unfinished evaluation with other settings (budgets differ)" in other.output
    monkeypatch.setattr(engine, "evaluate_instance", real)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stderr and "1 of 2 instances already evaluated" in result.stderr
    final = pd.read_parquet(tmp_path / "ev" / "results.parquet")
    assert len(final) == 2 * len(partial) and set(final.instance_id) == {"p0", "p1"}
    pd.testing.assert_frame_equal(final[final.instance_id == "p0"].reset_index(drop=True), partial)
    assert not (tmp_path / "ev" / "progress.json").exists()
    summ = json.loads(result.stdout.strip().splitlines()[-1])
    assert summ["budgets"]["16"]["full"] == 100.0
    assert summ["budgets"]["16"]["full"] >= summ["budgets"]["16"]["scores"]["uniform:streaming"]
    assert summ["budgets"]["16"]["scores"]["uniform:streaming"] == 0.0
    assert (tmp_path / "ev" / "report.md").exists() and (tmp_path / "ev" / "scores_vs_budget.png").exists()
    assert "tasks.jsonl:3: skipped, not valid JSON" in result.stderr


def test_named_plan_methods_each_get_a_gap_recovery_and_a_task_subset_reports_only_its_tasks():
    from polykv.errors import InputError

    rows = []
    for task, full, best, plan, other in (("a", 100, 40, 70, 40), ("b", 50, 30, 30, 50)):
        for method, budget, s in [
            ("full", None, full),
            ("uniform:x", 64, best),
            ("plan", 64, plan),
            ("plan-e2e", 64, other),
        ]:
            rows.append({"task": task, "method": method, "budget": budget, "score": s, "instance_id": task})
    df = pd.DataFrame(rows)
    b = summary(df, "m")["budgets"]["64"]
    assert b["plan"] == 50 and b["gap_recovery"] == pytest.approx((50 - 35) / (75 - 35))
    e2e = b["plans"]["plan-e2e"]
    assert (e2e["score"], e2e["gap_recovery"]) == (45.0, pytest.approx((45 - 35) / (75 - 35)))
    a = summary(df, "m", tasks=["a"])
    assert a["tasks"] == ["a"] and a["budgets"]["64"]["gap_recovery"] == pytest.approx(0.5)
    assert a["budgets"]["64"]["plans"]["plan-e2e"]["gap_recovery"] == 0.0
    with pytest.raises(InputError, match="task.s. c are not in these results"):
        summary(df, "m", tasks=["a", "c"])


def test_plan_method_names_and_specs(tmp_path):
    from polykv.errors import InputError

    plan = {"average_budget": 64, "layers": []}
    (tmp_path / "avg64.json").write_text(json.dumps(plan))
    methods = parse_methods(f"full,plan:{tmp_path},plan-e2e.v2:{tmp_path / 'avg64.json'}", None)
    assert [m.name for m in methods] == ["full", "plan", "plan-e2e.v2"]
    assert [m.spec for m in methods] == ["full", f"plan:{tmp_path}", f"plan-e2e.v2:{tmp_path / 'avg64.json'}"]
    assert parse_methods(",".join(m.spec for m in methods), None) == methods
    with pytest.raises(InputError, match="unknown method 'plan-a b:"):
        parse_methods(f"plan-a b:{tmp_path}", None)
    with pytest.raises(InputError, match="listed twice"):
        parse_methods(f"plan:{tmp_path},plan:{tmp_path}", None)


def test_predicted_loss_check_matches_the_solver_and_ranks_scores(tmp_path):
    """The report's predicted loss of a plan equals the solver's; a score that falls with predicted loss gives -1."""
    from test_solve import make_fingerprint, write_calibration

    from polykv.evaluate.prediction import predicted_losses, prediction_check
    from polykv.solve import aggregate, load_calibration, solve_frontier

    fp = make_fingerprint(num_layers=4)
    cal_dir = write_calibration(tmp_path / "cal", fp, policies=("snapkv", "h2o", "streaming"))
    cal = load_calibration(cal_dir)
    table = aggregate(cal.curves, cal.fingerprint, cal.model, policy_params=cal.policy_params())
    plans = solve_frontier(table, [32, 64])
    (tmp_path / "plans").mkdir()
    for p in plans:
        p.save(tmp_path / "plans" / f"avg{int(p.average_budget)}.json")
    info = {"methods": f"uniform:snapkv,uniform:h2o,uniform:streaming,plan:{tmp_path / 'plans'}", "budgets": [32, 64]}
    pred = predicted_losses(info, cal_dir)
    assert len(pred) == 8 and set(pred.metric) == {table.metric}
    for p in plans:
        got = pred[(pred.method == "plan") & (pred.budget == int(p.average_budget))].predicted_loss.item()
        assert got == pytest.approx(p.predicted_loss)
    results = pd.DataFrame(
        [
            {"task": "t", "instance_id": "i", "method": r.method, "budget": r.budget, "score": 100 - r.predicted_loss}
            for r in pred.itertuples()
        ]
    )
    check = prediction_check(results, info, cal_dir)
    assert check["points"] == 8 and check["spearman_all"] == pytest.approx(-1.0)
    assert check["per_budget"]["32"] == {"methods": 4, "spearman": pytest.approx(-1.0)}


def _precision_plan(path, model, average: int = 16):
    """A schema-version-2 plan for `model` (the tiny llama: 3 layers) with layers at 4, 16 and 2 bits."""
    from polykv.models import fingerprint
    from polykv.plan import CostModel, LayerPlan, Plan, schema_version_for

    fp = fingerprint(model.config)
    cm = CostModel.for_fingerprint(fp, precision=True)
    layers = [LayerPlan(0, "snapkv", 24, {}, None, 4), LayerPlan(1, "streaming", 8, {}, None, 16)]
    layers.append(LayerPlan(2, "knorm", 16, {}, None, 2))
    plan = Plan(
        schema_version_for(layers), "tiny", fp, float(average), cm.total(average), cm.unit, layers, None,
        {"polykv_version": "test", "solver": "test"},
    )  # fmt: skip
    plan.save(path)
    return plan


def test_quant_methods_parse_with_a_clear_error_for_other_widths():
    from polykv.errors import InputError

    methods = parse_methods("full,quant:8,quant:4,quant:2", None)
    assert [(m.kind, m.bits, m.spec) for m in methods[1:]] == [("quant", 8, "quant:8"), ("quant", 4, "quant:4")] + [
        ("quant", 2, "quant:2")
    ]
    assert methods[2].budgets([16, 64]) == [None]
    fp = {"num_layers": 3}
    assert {(s.policy.name, s.bits) for s in methods[2].settings(None, fp)} == {("full", 4)}
    for bad in ("quant:16", "quant:3", "quant:x", "quant:"):
        with pytest.raises(InputError, match="quant:8, quant:4, quant:2") as exc:
            parse_methods(f"full,{bad}", None)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("mode", ["query-aware", "context-only"])
def test_quantized_configurations_decode_alone_on_their_real_storage(tmp_path, mode):
    """`quant:<bits>` and a version-2 plan evaluate from their real quantized caches: their answers equal
    compression during prefill (`polykv run` at the same bits), and `kv_bytes` is exactly the quantized storage's
    (the plan's `used_budget`, the whole prompt at 4 bits for quant:4; a 16-bit model dtype, batch 1)."""
    import torch

    from polykv.precision import kv_bytes

    loaded = tiny_loaded()
    loaded.model.to(torch.bfloat16)
    plan = _precision_plan(tmp_path / "v2.json", loaded.model)
    methods = parse_methods(f"full,quant:4,quant:2,uniform:snapkv,plan-v2:{tmp_path / 'v2.json'}", None)
    inst = _instances(1)[0]
    fast = evaluate_instance(loaded, inst, methods, [16], mode=mode, max_rows=4)
    slow, _ = reprefill_instance(loaded, inst, methods, [16], mode=mode)
    got = {(r["method"], r["budget"]): r for r in fast.rows}
    assert len(got) == len(slow) == 5
    for r in slow:
        assert got[(r["method"], r["budget"])]["prediction"] == r["prediction"], r["method"]
    full, q4, q2, v2 = got[("full", None)], got[("quant:4", None)], got[("quant:2", None)], got[("plan-v2", 16)]
    context = fast.prompt_tokens if mode == "query-aware" else None
    if context is not None:
        assert q4["kv_bytes"] == 3 * kv_bytes(context, 2, 16, 4)
    assert q2["kv_bytes"] < q4["kv_bytes"] < full["kv_bytes"] == full["kv_bytes_full"] == q4["kv_bytes_full"]
    assert v2["kv_bytes"] == plan.used_budget


def test_eval_cli_runs_quant_baselines_and_a_version_2_plan_on_a_tiny_model(tmp_path, tiny_hf_dir):
    """`polykv eval` end to end on the tiny model: quant:4 holds fewer bytes than full, a version-2 plan holds its
    `used_budget`, every quantized configuration equals compression during prefill, and the report renders."""
    from conftest import tiny_llama

    from polykv_cli.main import app

    plan = _precision_plan(tmp_path / "v2.json", tiny_llama())
    context = " ".join(["alpha beta gamma delta"] * 12 + ["The key is 4 2 .", "delta gamma"] * 3)
    line = {"id": "k", "task": "key", "context": context, "question": "What is the key ?", "answers": ["4 2"]}
    (tmp_path / "tasks.jsonl").write_text(json.dumps({**line, "metric": "substring", "max_new_tokens": 4}) + "\n")
    args = ["eval", "--model", str(tiny_hf_dir), "--tasks", str(tmp_path / "tasks.jsonl"), "--budgets", "16"]
    args += ["--methods", f"full,quant:4,uniform:snapkv,plan-v2:{tmp_path / 'v2.json'}", "--limit", "1"]
    args += ["--verify-prefill", "1", "--dtype", "bfloat16", "--out", str(tmp_path / "ev"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4/4 identical predictions" in result.stderr
    rows = pd.read_parquet(tmp_path / "ev" / "results.parquet").set_index("method")
    assert rows.loc["quant:4", "kv_bytes"] < rows.loc["full", "kv_bytes"] == rows.loc["quant:4", "kv_bytes_full"]
    assert rows.loc["plan-v2", "kv_bytes"] == plan.used_budget
    summ = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summ["budgets"]["16"]["scores"]) == {"uniform:snapkv", "plan-v2"}
    assert (tmp_path / "ev" / "scores_vs_budget.png").exists()
    assert "quant:4" in (tmp_path / "ev" / "report.md").read_text()


def test_predicted_loss_of_a_version_2_plan_reads_each_layer_at_its_bits(tmp_path):
    from test_solve import bits_curves, make_fingerprint, write_calibration

    from polykv.evaluate.prediction import predicted_losses
    from polykv.solve import aggregate, load_calibration, solve_frontier

    fp = make_fingerprint(num_layers=6)
    cal_dir = write_calibration(tmp_path / "cal", fp, curves=bits_curves(fp, samples=3))
    cal = load_calibration(cal_dir)
    table = aggregate(cal.curves, cal.fingerprint, cal.model, policy_params=cal.policy_params())
    (tmp_path / "plans").mkdir()
    plans = solve_frontier(table, [16, 32])
    assert {lp.bits for p in plans for lp in p.layers} > {16}
    for p in plans:
        p.save(tmp_path / "plans" / f"avg{int(p.average_budget)}.json")
    pred = predicted_losses({"methods": f"quant:4,plan:{tmp_path / 'plans'}", "budgets": [16, 32]}, cal_dir)
    assert len(pred) == 2  # quant:4 is budget-independent: no prediction
    for p in plans:
        got = pred[(pred.method == "plan") & (pred.budget == int(p.average_budget))].predicted_loss.item()
        assert got == pytest.approx(p.predicted_loss)
