"""Which value a model answers on multikey_needles: the one asked for, another needle's, or neither.

Each multikey instance hides 8 "The special magic number for <key> is <7 digits>" needles and asks for one. A
wrong answer that is another needle's value means the model read the needles but bound the wrong key; "neither"
means the value was not read (typically evicted). Run on evaluation directories and the task files they used:

    python benchmarks/multikey_choice.py \
        benchmarks/results/smollm2-suite3-mixedq75-plans=src/polykv/evaluate/suite/data \
        benchmarks/results/smollm2-rep3-headline=runs/rep --methods full,plan,uniform:snapkv_forward

(runs/rep is the replication set of fresh instances: `python -m polykv.evaluate.suite.build --out runs/rep --seed
9000 --tasks passkey multikey_needles code_completion changelog_qa multidoc_retrieval frequent_words --id-prefix rep-`.
BENCHMARKS.md, "Why multikey at 256 goes to the uniform policy", has the result.)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

NEEDLE = re.compile(r"magic number for [\w-]+ is (\d{7})")


def classify(prediction: str, asked: str, needles: set[str]) -> str:
    if asked in prediction:
        return "asked"
    first = re.findall(r"\d{7}", prediction)
    return "other needle" if first and first[0] in needles else "neither"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="EVAL_DIR=TASK_DIR pairs (TASK_DIR holds multikey_needles.jsonl)")
    ap.add_argument("--methods", default="full,plan,uniform:snapkv_forward")
    args = ap.parse_args()
    methods = args.methods.split(",")
    rows = []
    for pair in args.runs:
        run, tasks = (Path(p) for p in pair.split("=", 1))
        instances = {}
        for line in (tasks / "multikey_needles.jsonl").open():
            inst = json.loads(line)
            instances[inst["id"]] = (inst["answers"][0], set(NEEDLE.findall(inst["context"])))
        res = pd.read_parquet(run / "results.parquet")
        res = res[(res.task == "multikey_needles") & res.method.isin(methods)]
        for r in res.itertuples():
            asked, needles = instances[r.instance_id]
            rows.append({"method": r.method, "budget": r.budget, "kind": classify(r.prediction, asked, needles)})
    frame = pd.DataFrame(rows).astype({"budget": "Int64"})
    table = frame.groupby(["method", "budget"], dropna=False).kind.value_counts(normalize=True)
    table = table.unstack().fillna(0).mul(100).round(1)
    counts = frame.groupby(["method", "budget"], dropna=False).size().rename("answers")
    table = table.join(counts).reset_index()
    print("| " + " | ".join(map(str, table.columns)) + " |")
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join("" if v is pd.NA else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
