"""`make plans` regenerates the checked-in plans: its recipe and what the plans record about themselves must agree.

The recipe is read with `make -n` (nothing runs): each `polykv solve` line says which budgets it writes, with which
aggregate, into which directory; a later line overwrites an earlier one's budgets, as the files would be.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from polykv.solve.aggregate import Aggregation

ROOT = Path(__file__).resolve().parents[1]


def _solves(*make_args: str) -> dict[str, dict[int, dict]]:
    """{plan dir: {budget: aggregate as the plan's provenance records it}} from `make -n plans`."""
    text = subprocess.run(["make", "-n", "--no-print-directory", "plans", *make_args], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    written: dict[str, dict[int, dict]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if len(words) < 2 or not words[0].endswith("/polykv") or words[1] != "solve":
            continue
        opts = dict(zip(words[2::2], words[3::2]))
        agg = Aggregation.parse(opts.get("--aggregate", "mean")).describe()
        for b in opts["--budgets"].split(","):
            written.setdefault(opts["--out"], {})[int(b)] = agg
    return written


def test_model_spec_with_budgets_and_aggregate():
    solves = _solves("PLAN_MODELS=m-a:4:64,256@quantile:0.9 m-b:8", "BUDGETS=64,128,256")
    assert solves["plans/m-a"] == {64: {"statistic": "quantile", "q": 0.9}, 128: {"statistic": "mean"},
                                   256: {"statistic": "quantile", "q": 0.9}}
    assert solves["plans/m-b"] == {b: {"statistic": "mean"} for b in (64, 128, 256)}


def test_checked_in_plans_match_the_recipe():
    solves = _solves()
    assert solves, "make -n plans printed no polykv solve line"
    for out, budgets in solves.items():
        for budget, agg in budgets.items():
            plan = json.loads((ROOT / out / f"avg{budget}.json").read_text())
            assert plan["provenance"]["options"]["aggregate"] == agg, f"{out}/avg{budget}.json"
