"""Read a calibration back: the best policy per layer at a few budgets (for the end-of-run table and reports)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from polykv.precision import FULL_PRECISION


def read_curves(out: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(out) / "curves")


def best_policies(curves: pd.DataFrame, budgets: list[int], metric: str = "proxy_err") -> pd.DataFrame:
    """Rows per layer, columns per budget: the policy (other than full) with the lowest mean `metric`, at 16 bits
    (the rows of a calibration without a `bits` column)."""
    df = curves[(curves.metric == metric) & (curves.policy != "full") & curves.budget.isin(budgets)]
    if "bits" in df.columns:
        df = df[df.bits == FULL_PRECISION]
    mean = df.groupby(["layer", "budget", "policy"], as_index=False)["value"].mean()
    best = mean.loc[mean.groupby(["layer", "budget"])["value"].idxmin()]
    table = best.assign(cell=best.policy + " " + best.value.map("{:.3f}".format))
    return table.pivot(index="layer", columns="budget", values="cell").sort_index()
