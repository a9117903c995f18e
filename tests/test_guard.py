"""The guard of `polykv solve`: candidates, the choice, the measurement on a real (tiny) model, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CAL_ARGS, write_samples
from test_solve import bits_curves, make_fingerprint, synthetic_curves
from typer.testing import CliRunner

from polykv.answer_loss import Objective, prepare_samples
from polykv.data import load_samples
from polykv.errors import InputError
from polykv.guard import OBJECTIVES, choices, distinct, guard, guard_all, held_out, judge
from polykv.models import load_model
from polykv.plan import Plan
from polykv.precision import kv_bytes
from polykv.solve.aggregate import aggregate
from polykv.solve.candidates import SOLVED, guard_candidates, with_floor
from polykv.solve.constraints import Pin, SolveOptions
from polykv.solve.runner import solve_plan
from polykv_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def table():
    fp = make_fingerprint(num_layers=6)
    return aggregate(synthetic_curves(fp, samples=3), fp, "test/model", policy_params={"snapkv": {"window": 8}})


# --- candidates ------------------------------------------------------------------------------------------------------


def test_candidates_are_the_plan_its_floor_blends_and_every_uniform_policy(table):
    solved = solve_plan(table, 64)
    cands = guard_candidates(table, 64, solved, floors=(0.25, 0.5))
    assert list(cands) == [SOLVED, "floor:0.25", "floor:0.5", "uniform:h2o", "uniform:snapkv", "uniform:streaming"]
    assert cands[SOLVED] is solved
    for name, floor in (("floor:0.25", 16), ("floor:0.5", 32)):
        plan = cands[name]
        assert min(ly.budget for ly in plan.layers) >= floor
        assert plan.used_budget <= plan.total_budget == solved.total_budget
        assert plan.predicted_loss >= solved.predicted_loss - 1e-12  # a constrained optimum is never better
    for policy in ("h2o", "snapkv", "streaming"):
        assert choices(cands[f"uniform:{policy}"]) == [(policy, 64, 16)] * 6


def test_precision_calibrations_add_each_uniform_policy_at_each_width_for_the_same_bytes():
    fp = make_fingerprint(num_layers=6, sliding=(1,), window=24)
    table = aggregate(bits_curves(fp, bits=(16, 8, 4, 2), samples=3), fp, "m", policy_params={"snapkv": {"window": 8}})
    for budget in (16, 64):
        solved = solve_plan(table, budget)
        cands = guard_candidates(table, budget, solved, floors=(0.5,))
        capacity = table.cost_model.total(budget)
        names = [f"uniform:{p}" for p in ("h2o", "snapkv", "streaming")]
        names += [f"uniform:{p}@{b}b" for b in (8, 4, 2) for p in ("h2o", "snapkv", "streaming")]
        assert list(cands) == [SOLVED, "floor:0.5", *names]
        assert {tuple(choices(cands[n])) for n in names[3:]}.isdisjoint({tuple(choices(cands[n])) for n in names[:3]})
        for bits in (8, 4, 2):
            plan = cands[f"uniform:snapkv@{bits}b"]
            assert plan.schema_version == 2 and plan.budget_unit == "bytes" and plan.total_budget == capacity
            assert {(lp.policy, lp.bits) for lp in plan.layers} == {("snapkv", bits)}
            tokens = plan.layers[0].budget
            assert tokens > budget  # fewer bits per token buy more tokens for the same bytes
            assert plan.layers[1].budget == min(tokens, 23)  # the sliding layer holds at most window - 1

            def priced(n: int, bits: int = bits) -> int:
                return sum(kv_bytes(min(n, 23) if i == 1 else n, 2, 16, bits) for i in range(6))

            assert plan.used_budget == priced(tokens) <= capacity < priced(tokens + 1)  # the most tokens that fit
            assert plan.predicted_loss is None or plan.predicted_loss == pytest.approx(
                sum(table.predicted_loss(lp.layer, "snapkv", lp.budget, bits) for lp in plan.layers)
            )
            assert Plan.from_dict(json.loads(plan.to_json())).to_json() == plan.to_json()  # a valid plan file
    assert cands["uniform:snapkv@8b"].predicted_loss is not None  # on the calibrated grid: scored from the table


def test_a_width_where_no_token_fits_gets_no_uniform_candidate():
    fp = make_fingerprint(num_layers=2)
    table = aggregate(bits_curves(fp, bits=(16, 2), samples=2, budgets=(1, 2, 4)), fp, "m")
    cands = guard_candidates(table, 1, solve_plan(table, 1), floors=())  # a scale and zero point cost more than 1 token
    assert not [n for n in cands if n.endswith("@2b")] and "uniform:snapkv" in cands


def test_constrained_solves_get_no_uniform_candidates(table):
    options = SolveOptions(pins={0: Pin("snapkv", 128)})
    cands = guard_candidates(table, 64, solve_plan(table, 64, options), options)
    assert not [n for n in cands if n.startswith("uniform:")]
    assert all(cands[n].layers[0].budget == 128 for n in cands)  # floors never override a pin


def test_with_floor_keeps_higher_minimums_and_respects_maximums():
    options = SolveOptions(min_budget={1: 64}, max_budget={2: 8}, pins={3: Pin("snapkv")})
    floored = with_floor(options, 4, 16)
    assert floored.min_budget == {0: 16, 1: 64, 2: 8}


# --- the choice ------------------------------------------------------------------------------------------------------


def test_judge_keeps_the_least_loss_and_counts_wins():
    per = np.array([[0.5, 0.2, 0.4], [0.5, 0.9, 0.3], [0.2, 0.1, 0.35]])  # samples x candidates
    assert judge(per, [SOLVED, "uniform:a", "uniform:b"]).chosen == SOLVED  # b is lower, but within its noise
    v = judge(per, [SOLVED, "uniform:a", "uniform:b"], "h", margin=0.0)
    assert v.chosen == "uniform:b" and v.best_uniform == "uniform:b"
    assert v.losses[SOLVED] == pytest.approx(0.4)
    assert v.wins == {SOLVED: 1, "uniform:a": 2}
    prov = v.provenance()
    assert prov["chosen"] == "uniform:b" and prov["solved_loss"] == 0.4 and prov["samples"] == 3
    assert prov["best_uniform_loss"] == pytest.approx(0.35)
    assert judge(np.ones((2, 2)), [SOLVED, "uniform:a"]).chosen == SOLVED  # a tie keeps the solved plan
    clear = np.array([[0.5, 0.3, 0.0], [0.6, 0.4, 1.0], [0.7, 0.5, 0.0]])  # a: 0.2 lower on every sample
    assert judge(clear, [SOLVED, "floor:0.5", "uniform:b"]).chosen == "floor:0.5"  # b is lower but not clearly


def test_a_plan_worse_than_a_uniform_policy_is_replaced(table):
    solved = solve_plan(table, 32)
    cands = guard_candidates(table, 32, solved, floors=())
    names = list(distinct(cands))
    # the measurement says the solved plan loses to uniform streaming on every sample
    fake = {n: (0.1 if n == "uniform:streaming" else 1.0) for n in names}
    plan, verdict = guard(cands, lambda plans: np.array([[fake[n] for n in names]] * 4))
    assert verdict.chosen == "uniform:streaming"
    assert choices(plan) == [("streaming", 32, 16)] * 6
    assert plan.provenance["guard"]["chosen"] == "uniform:streaming"
    assert plan.provenance["guard"]["losses"][SOLVED] == 1.0
    Plan.from_dict(json.loads(plan.to_json()))  # still a valid plan file


def test_guard_all_measures_every_budget_in_one_call_and_splits_it(table):
    frontier = [guard_candidates(table, b, solve_plan(table, b)) for b in (32, 64)]
    calls = []

    def measure(plans):
        calls.append(len(plans))
        # loss = the plan's mean budget: the cheapest candidate wins at each budget
        return np.array([[np.mean([ly.budget for ly in p.layers]) for p in plans]])

    out = guard_all(frontier, measure)
    assert calls == [sum(len(distinct(c)) for c in frontier)]
    for (plan, verdict), cands in zip(out, frontier, strict=False):
        expected = min(distinct(cands), key=lambda n: np.mean([ly.budget for ly in cands[n].layers]))
        assert verdict.chosen == expected and plan.average_budget == cands[SOLVED].average_budget


def test_repeated_candidates_are_measured_once_and_share_the_loss(table):
    solved = solve_plan(table, 32)
    cands = {
        SOLVED: solved,
        "floor:0.1": solved,
        "uniform:snapkv": guard_candidates(table, 32, solved)["uniform:snapkv"],
    }
    seen = []
    plan, v = guard(cands, lambda plans: seen.append(len(plans)) or np.array([[0.3, 0.2]]))
    assert seen == [2] and v.losses["floor:0.1"] == v.losses[SOLVED] == pytest.approx(0.3)
    assert v.chosen == "uniform:snapkv"
    twin = {SOLVED: solved, "uniform:x": solved}  # a solved plan that is a uniform plan ties with it and stays solved
    plan, v = guard(twin, lambda plans: np.array([[0.3], [0.1]]))
    assert v.chosen == SOLVED and v.best_uniform == "uniform:x" and v.wins == {SOLVED: 0}


def test_held_out_skips_calibrated_samples_and_needs_one(tmp_path):
    path = tmp_path / "d.jsonl"
    write_samples(path, n=4)
    items = load_samples(path)
    assert [s.id for s in held_out(items, ["s0", "s1"], 8, str(path))] == ["s2", "s3"]
    assert [s.id for s in held_out(items, [], 1, str(path))] == ["s0"]
    with pytest.raises(InputError, match="none is left to judge plans on; pass --guard-data"):
        held_out(items, [s.id for s in items], 8, str(path))
    with pytest.raises(InputError, match="--guard-samples must be at least 1"):
        held_out(items, [], 0, str(path))


# --- on a real model, through the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    data = root / "data.jsonl"
    write_samples(data, n=5, seed=3)
    cal = root / "cal"
    result = runner.invoke(
        app,
        ["calibrate", "--model", str(tiny_hf_dir), "--data", str(data), "--samples", "2", "--out", str(cal), *CAL_ARGS],
    )
    assert result.exit_code == 0, result.output
    return root, data, cal


def test_solve_guards_by_default_and_records_what_it_measured(tiny_hf_dir, calibrated):
    root, data, cal = calibrated
    out = root / "plans"
    result = runner.invoke(
        app, ["solve", "-c", str(cal), "--budgets", "8,16", "--out", str(out), "--guard-data", str(data)]
    )
    assert result.exit_code == 0, result.output
    assert "guard" in result.stdout and "3 held-out samples" in result.stderr
    # the losses recorded are the whole-model answer KL of each plan on the 3 samples calibration did not use
    loaded = load_model(str(tiny_hf_dir))
    items = [s for s in load_samples(data) if s.id not in json.loads((cal / "metadata.json").read_text())["sample_ids"]]
    objective = Objective(loaded.model, prepare_samples(loaded, items, 256))
    for budget in (8, 16):
        plan = Plan.load(out / f"avg{budget}.json")
        g = plan.provenance["guard"]
        assert g["samples"] == 3 and g["best_uniform"].startswith("uniform:")
        assert {"solved", "uniform:snapkv", "uniform:streaming", "uniform:knorm"} <= set(g["losses"])
        assert g["chosen_loss"] == g["losses"][g["chosen"]] and g["margin_se"] == 1.0
        assert g["chosen"] == "solved" or g["chosen_loss"] < g["solved_loss"]
        assert objective([choices(plan)])[0] == pytest.approx(g["chosen_loss"], rel=1e-4, abs=1e-7)
    shown = runner.invoke(app, ["plan", "show", str(out / "avg8.json")])
    assert shown.exit_code == 0 and "guard" in shown.stdout and "best uniform" in shown.stdout


def test_objective_measures_quantized_layers_through_their_real_storage(calibrated, tiny_hf_dir):
    from polykv.attention import polykv_attention
    from polykv.calibrate.sensitivity import answer_losses
    from polykv.compat import with_cache
    from polykv.policies import make_policy
    from polykv.precision import GROUP
    from polykv.settings import LayerSetting

    _, data, _ = calibrated
    loaded = load_model(str(tiny_hf_dir))
    samples = prepare_samples(loaded, load_samples(data)[:2], 256)
    quantized = [("snapkv", 8, 4), ("full", 0, 4), ("streaming", 16, 2)]
    at_16 = [(policy, budget, 16) for policy, budget, _ in quantized]
    plans = [at_16, quantized, [c[:2] for c in at_16], [("knorm", 8, 8)] * 3]
    losses = Objective(loaded.model, samples, quantized_rows=1).per_sample_losses(plans)  # 2 stacked batches
    for s, sample in enumerate(samples):
        assert sample.answer_in.shape[1] < GROUP  # the answer tokens stay at the model's dtype, as decoded ones do
        for p in (1, 3):
            settings = [LayerSetting(make_policy(policy), max(budget, 1), bits) for policy, budget, bits in plans[p]]
            cache = sample.capture.compress(settings)
            assert all(layer.quantized is not None for layer in cache.layers)
            with torch.no_grad(), polykv_attention(loaded.model):
                logits = loaded.model(input_ids=sample.answer_in, **with_cache(loaded.model, cache), use_cache=True)
            nll, kl = answer_losses(sample, logits.logits.float())
            assert losses["kl"][s, p] == pytest.approx(float(kl[0]), rel=1e-4, abs=1e-7)
            assert losses["nll"][s, p] == pytest.approx(float(nll[0]) - sample.full_nll, rel=1e-4, abs=1e-6)
    assert not np.allclose(losses["kl"][:, 1], losses["kl"][:, 0], rtol=1e-3, atol=0)  # 16 bits is another plan
    assert (losses["kl"][:, 1] > 0).all()  # even the whole layer at 4 bits costs something
    for loss in losses.values():  # a choice without bits is that choice at 16 bits
        assert np.allclose(loss[:, 0], loss[:, 2], rtol=1e-4, atol=1e-6)


def test_solve_guards_a_precision_calibration_with_uniform_candidates_at_each_width(tiny_hf_dir, calibrated):
    root, data, _ = calibrated
    cal, out = root / "cal-bits", root / "plans-bits" / "avg8.json"
    args = ["--data", str(data), "--samples", "2", "--out", str(cal), "--bits", "16,4", *CAL_ARGS]
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_hf_dir), *args])
    assert result.exit_code == 0, result.output
    args = ["-c", str(cal), "--budget", "8", "--out", str(out), "--guard-data", str(data)]
    result = runner.invoke(app, ["solve", *args])
    assert result.exit_code == 0, result.output
    plan = Plan.load(out)
    g = plan.provenance["guard"]
    policies = ("knorm", "snapkv", "streaming")
    assert {f"uniform:{p}" for p in policies} | {f"uniform:{p}@4b" for p in policies} <= set(g["losses"])
    loaded = load_model(str(tiny_hf_dir))
    items = [s for s in load_samples(data) if s.id not in json.loads((cal / "metadata.json").read_text())["sample_ids"]]
    objective = Objective(loaded.model, prepare_samples(loaded, items, 256))
    uniform_4b = guard_candidates(*_table_and_solved(cal, 8))["uniform:snapkv@4b"]
    assert {lp.bits for lp in uniform_4b.layers} == {4}
    measured = objective([choices(plan), choices(uniform_4b)])
    assert measured[0] == pytest.approx(g["chosen_loss"], rel=1e-4, abs=1e-7)
    assert measured[1] == pytest.approx(g["losses"]["uniform:snapkv@4b"], rel=1e-4, abs=1e-7)


def _table_and_solved(cal, budget: int):
    from polykv.solve.runner import SolveRequest, load_table

    table, _ = load_table(SolveRequest(cal, (budget,)))
    return table, budget, solve_plan(table, budget)


def test_guard_with_no_held_out_sample_is_one_clear_line_and_writes_nothing(calibrated, tmp_path):
    _, data, cal = calibrated
    used = tmp_path / "used.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ids = set(json.loads((cal / "metadata.json").read_text())["sample_ids"])
    used.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in ids))
    result = runner.invoke(
        app, ["solve", "-c", str(cal), "--budget", "8", "--out", str(tmp_path / "p.json"), "--guard-data", str(used)]
    )
    assert result.exit_code == 2
    assert "none is left to judge plans on" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "p.json").exists()


def test_guard_needs_data_of_the_workload_it_was_calibrated_on(calibrated, tmp_path):
    _, _, cal = calibrated  # calibrated on its own samples, not the shipped set: the shipped held-out set won't do
    result = runner.invoke(app, ["solve", "-c", str(cal), "--budget", "8", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and "pass --guard-data with samples of that workload" in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_guard_refuses_another_model(calibrated, tmp_path):
    from conftest import save_tiny_hf

    other = save_tiny_hf(tmp_path / "other", layers=2)
    _, data, cal = calibrated
    result = runner.invoke(
        app,
        [
            "solve",
            "-c",
            str(cal),
            "--budget",
            "8",
            "--out",
            str(tmp_path / "p.json"),
            "--guard-data",
            str(data),
            "--guard-model",
            str(other),
        ],
    )
    assert result.exit_code == 2 and "is not the calibrated one" in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_guard_by_gold_answer_nll_records_that_objective(tiny_hf_dir, calibrated):
    root, data, cal = calibrated
    out = root / "plans-nll"
    result = runner.invoke(
        app,
        ["solve", "-c", str(cal), "--budget", "8", "--out", str(out / "avg8.json"), "--guard-data", str(data),
         "--guard-objective", "nll"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    g = Plan.load(out / "avg8.json").provenance["guard"]
    assert g["objective"] == OBJECTIVES["nll"]
    loaded = load_model(str(tiny_hf_dir))
    items = [s for s in load_samples(data) if s.id not in json.loads((cal / "metadata.json").read_text())["sample_ids"]]
    losses = Objective(loaded.model, prepare_samples(loaded, items, 256))
    plan = Plan.load(out / "avg8.json")
    measured = losses.per_sample_losses([choices(plan)])
    assert measured["nll"].mean() == pytest.approx(g["chosen_loss"], rel=1e-4, abs=1e-7)
    # the full cache costs the gold answer nothing and matches itself
    full = losses.per_sample_losses([[("full", 0)] * len(plan.layers)])
    assert np.allclose(full["nll"], 0, atol=1e-5) and np.allclose(full["kl"], 0, atol=1e-5)


def test_unknown_guard_objective_is_one_clear_line(calibrated, tmp_path):
    _, data, cal = calibrated
    result = runner.invoke(
        app,
        ["solve", "-c", str(cal), "--budget", "8", "--out", str(tmp_path / "p.json"), "--guard-data", str(data),
         "--guard-objective", "bleu"],
    )  # fmt: skip
    assert result.exit_code == 2 and "unknown guard objective 'bleu'" in result.stderr
    assert not (tmp_path / "p.json").exists()


# --- the full cache's own answer ---------------------------------------------------------------------------------


def test_missed_share_counts_from_the_first_wrong_argmax():
    from polykv.answer_loss import missed_share

    targets = torch.tensor([[1, 2, 0, 3]])
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0, 3], [1, 0, 0, 3], [3, 2, 0, 3], [1, 2, 0, 1]]), 4)
    # all right; wrong at 1 (later positions right again do not count); wrong at 0; wrong at the last
    assert missed_share(logits.float(), targets).tolist() == [0.0, 0.75, 1.0, 0.25]


def test_own_answer_is_what_the_full_cache_generates(calibrated, tiny_hf_dir):
    from polykv.calibrate.sample import prepare
    from polykv.prompts import encode

    _, data, _ = calibrated
    loaded = load_model(str(tiny_hf_dir))
    item = load_samples(data)[0]
    sample = prepare(loaded.model, loaded.tokenizer, item.context, item.question, None, 256, 16, greedy_tokens=6)
    ids = encode(loaded.tokenizer, item.context, item.question, max_tokens=256).ids
    with torch.no_grad():
        ref = loaded.model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0)
    generated = ref[0, ids.shape[1] :]
    assert sample.answer_in[0].tolist() == generated[:6].tolist()  # the chunk ...
    assert sample.targets[0].tolist() == generated[1:7].tolist()  # ... predicts its own next tokens
    assert sample.full_logprobs.argmax(-1).tolist() == generated[1:7].tolist()


def test_own_miss_is_where_greedy_decoding_under_the_plan_leaves_the_full_answer(calibrated, tiny_hf_dir):
    from polykv.generation import greedy
    from polykv.policies import make_policy
    from polykv.settings import LayerSetting

    _, data, _ = calibrated
    loaded = load_model(str(tiny_hf_dir))
    items = load_samples(data)[:3]
    samples = prepare_samples(loaded, items, 256, own_answers=True)
    layers = loaded.model.config.num_hidden_layers
    plans = [[("full", 0)] * layers, [("streaming", 8)] * layers, [("knorm", 4)] * layers, [("snapkv", 16)] * layers]
    losses = Objective(loaded.model, samples).per_sample_losses(plans)
    assert np.allclose(losses["miss"][:, 0], 0) and np.allclose(losses["kl"][:, 0], 0, atol=1e-5)
    for s, sample in enumerate(samples):
        m = sample.targets.shape[1]
        for p, plan in enumerate(plans[1:], start=1):
            settings = [LayerSetting(make_policy(policy), budget) for policy, budget in plan]
            cache = sample.capture.compress(settings)
            own = greedy(loaded.model, cache, sample.capture.last_logits, m + 1)[0, 1:]
            agree = int((own == sample.targets[0]).int().cumprod(0).sum())
            assert losses["miss"][s, p] == pytest.approx((m - agree) / m)
    assert (losses["miss"][:, 1:] > 0).any()  # the comparison saw plans that leave the full answer


def test_guard_by_own_answer_records_that_objective(calibrated):
    root, data, cal = calibrated
    out = root / "plans-own" / "avg8.json"
    result = runner.invoke(
        app,
        ["solve", "-c", str(cal), "--budget", "8", "--out", str(out), "--guard-data", str(data),
         "--guard-objective", "own-miss"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    g = Plan.load(out).provenance["guard"]
    assert g["objective"] == OBJECTIVES["own-miss"]
    assert all(0.0 <= v <= 1.0 for v in g["losses"].values())
