"""The evaluation engine (prefill once, compress many), gap-recovery arithmetic and the CLI on the bundled model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import tiny_loaded
from polykv.evaluate.engine import evaluate_instance, reprefill_instance
from polykv.evaluate.methods import parse_methods
from polykv.evaluate.report import summary
from polykv.evaluate.tasks import TaskInstance


def _instances(n=2):
    return [TaskInstance(f"i{k}", "retrieval", "alpha beta gamma " * 30 + f"the code is {700 + k}. " + "delta " * 20,
                         "What is the code?", [str(700 + k)], "substring", 6) for k in range(n)]


@pytest.mark.parametrize("mode", ["query-aware", "context-only"])
def test_engine_equals_compressing_during_prefill(mode):
    loaded = tiny_loaded()
    methods = parse_methods("full,uniform:snapkv,uniform:streaming,uniform:h2o,pyramid", None)
    for inst in _instances():
        fast = evaluate_instance(loaded, inst, methods, [16, 48], mode=mode, max_rows=3)
        slow, _ = reprefill_instance(loaded, inst, methods, [16, 48], mode=mode)
        assert len(fast.rows) == len(slow) == 1 + 4 * 2
        got = {(r["method"], r["budget"]): r["prediction"] for r in fast.rows}
        for r in slow:
            assert got[(r["method"], r["budget"])] == r["prediction"], (r["method"], r["budget"])


def test_gap_recovery_arithmetic():
    rows = []
    for task, base in (("a", 0), ("b", 10)):
        for method, budget, s in [("full", None, 90), ("uniform:x", 64, 50), ("uniform:y", 64, 60), ("plan", 64, 75),
                                  ("uniform:x", 128, 80), ("plan", 128, 70)]:
            rows.append({"task": task, "method": method, "budget": budget, "score": s + base, "instance_id": task})
    summ = summary(pd.DataFrame(rows), "m")
    b64 = summ["budgets"]["64"]
    assert b64["full"] == 95 and b64["best_uniform"] == {"method": "uniform:y", "score": 65.0} and b64["plan"] == 80
    assert b64["gap_recovery"] == pytest.approx((80 - 65) / (95 - 65))
    assert summ["budgets"]["128"]["gap_recovery"] == pytest.approx((75 - 85) / (95 - 85))
    rows = [r for r in rows if not (r["method"] == "full")] + [
        {"task": t, "method": "full", "budget": None, "score": 80.0 + (10 if t == "b" else 0), "instance_id": t} for t in "ab"]
    assert summary(pd.DataFrame(rows), "m")["budgets"]["128"]["gap_recovery"] is None


def test_unknown_method_is_a_clear_error():
    from polykv.errors import InputError

    with pytest.raises(InputError, match="unknown method 'snap'"):
        parse_methods("full,snap", None)


@pytest.mark.bundled
def test_eval_cli_on_bundled_model(tmp_path):
    """A short end-to-end eval in CI: full >= heavy compression on retrieval, with JSON on stdout."""
    from polykv_cli.main import app

    tasks = tmp_path / "tasks.jsonl"
    context = (__import__("pathlib").Path(__file__).parents[1] / "examples" / "passkey.txt").read_text()
    lines = [json.dumps({"id": f"p{k}", "task": "passkey", "context": context.replace("pineapple", word),
                         "question": "What is the passkey for the archive? Answer with the passkey only.",
                         "answers": [word], "metric": "substring", "max_new_tokens": 12})
             for k, word in enumerate(["pineapple", "lighthouse"])]
    tasks.write_text("\n".join(lines) + "\n{not json\n")
    result = CliRunner().invoke(app, ["eval", "--tasks", str(tasks), "--budgets", "16,128",
                                      "--methods", "full,uniform:snapkv,uniform:streaming", "--out",
                                      str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    summ = json.loads(result.stdout.strip().splitlines()[-1])
    assert summ["budgets"]["16"]["full"] == 100.0
    assert summ["budgets"]["16"]["full"] >= summ["budgets"]["16"]["scores"]["uniform:streaming"]
    assert summ["budgets"]["16"]["scores"]["uniform:streaming"] == 0.0
    assert (tmp_path / "ev" / "report.md").exists() and (tmp_path / "ev" / "scores_vs_budget.png").exists()
    assert "tasks.jsonl:3: skipped, not valid JSON" in result.stderr
