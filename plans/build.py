"""Regenerate the checked-in plans from `plans/recipe.json`: `python plans/build.py` (what `make plans` runs).

The recipe gives, per bundled model, how many shipped calibration samples to calibrate on and the aggregate over
samples each average budget is solved with (each choice was made on a development split: BENCHMARKS.md, Headline).
For each model this runs `polykv calibrate` on the shipped set into runs/<model>/calibration (resumed if done), then
one `polykv solve` per aggregate into plans/<model>/, each guarded on the shipped held-out set (the solve default).
`--dry-run` prints the commands instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "plans" / "recipe.json"


def load_recipe(path: Path = RECIPE) -> dict[str, dict]:
    """The recipe: {model: {"samples": N, "budgets": {budget: aggregate}}}, checked."""
    recipe = json.loads(path.read_text(encoding="utf-8"))
    for model, spec in recipe.items():
        if not isinstance(spec.get("samples"), int) or spec["samples"] < 1 or not spec.get("budgets"):
            raise SystemExit(f"{path}: {model} needs an integer 'samples' >= 1 and a non-empty 'budgets' map")
    return recipe


def commands(recipe: dict[str, dict], polykv: str = "polykv") -> list[list[str]]:
    """The calibrate and solve command lines, in order (budgets grouped by aggregate, in budget order)."""
    out: list[list[str]] = []
    for model, spec in recipe.items():
        cal = f"runs/{model}/calibration"
        out.append([polykv, "calibrate", "--model", model, "--samples", str(spec["samples"]), "--out", cal])
        groups: dict[str, list[int]] = {}
        for budget, aggregate in sorted(spec["budgets"].items(), key=lambda kv: int(kv[0])):
            groups.setdefault(aggregate, []).append(int(budget))
        for aggregate, budgets in groups.items():
            out.append(
                [
                    polykv,
                    "solve",
                    "--calibration",
                    cal,
                    "--budgets",
                    ",".join(map(str, budgets)),
                    "--aggregate",
                    aggregate,
                    "--out",
                    f"plans/{model}",
                ]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--models", nargs="*", help="only these models of the recipe")
    ap.add_argument("--polykv", default=str(Path(sys.executable).with_name("polykv")), help="the polykv command")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe)
    unknown = sorted(set(args.models or []) - set(recipe))
    if unknown:
        raise SystemExit(f"--models {', '.join(unknown)}: not in {args.recipe} (has {', '.join(recipe)})")
    recipe = {m: s for m, s in recipe.items() if not args.models or m in args.models}
    for cmd in commands(recipe, args.polykv):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
