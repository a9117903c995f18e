"""Curves -> option table: one predicted loss per (layer, policy, budget, bits), aggregated over calibration samples.

Input rows are per sample; the solver needs one number per option. Rules:
- metric: `e2e_kl` when present, else `proxy_anchored`, else `proxy_scaled`, else `e2e_dnll`, else `proxy_err`,
  unless one is named; lower
  is better for all. `proxy_scaled` (from `calibrate --measure scaled`) is each layer's mean `proxy_err` curve times
  that layer's scale = sum of `ref_e2e_kl` / sum of `ref_proxy_err` over the reference options and samples: the proxy
  ranks the options within a layer, the e2e KL at the references says how much that layer's errors reach the output.
  KL comes first because it is never negative and far less noisy: on SmolLM2 (8 samples) 47 % of the per-sample
  `e2e_dnll` values were below zero (compressing one layer barely moves one answer's NLL, so the sign is noise)
  and a solver fed with them spent 16-token budgets on layers whose mean happened to be negative.
  `proxy_anchored` (calibrations with `uniform_e2e_kl` rows) further scales each policy's `proxy_scaled` curves so
  that they sum over layers to the measured whole-model KL of that policy used uniformly (see `anchor_factors`);
  it comes first because its plans beat `proxy_scaled`'s on 5 of 8 (model, budget) points of the held-out suite
  and on average (BENCHMARKS.md, "Why `proxy_anchored` became the default"), most where errors compound across
  layers (Qwen at 64-128).
- whole-layer rows (`head` null) are used; if a table has only per-head rows, heads are averaged per layer first.
- `full` rows are ignored: `full` keeps the whole context, it is not a budget option (see runner: pins).
- statistic over samples: `mean` (default), or `quantile:Q` / `max` for a robust plan that guards the bad tail.
  Quantiles use the inverted CDF of the (weighted) samples: the smallest value whose cumulative weight >= Q.
- category weights: with none, every sample weighs the same; with {category: w}, each category counts as a whole,
  i.e. its samples share its weight w equally (unlisted categories weigh 1, weight 0 drops a category).
- completeness: every (layer, policy, budget) of the grid must be present for every sample, else a
  CalibrationError names what is missing; `allow_missing` aggregates what exists and drops empty options.
- sliding layers hold at most window - 1 tokens (`polykv.sliding`; `CostModel.caps`): their options above that
  collapse into one option at budget = window - 1 (the loss of the smallest calibrated budget >= window - 1); they
  need not be calibrated above it.
- NaN or infinite values are an error (naming where), never silently skipped.
- KV precision: curves may carry a `bits` column (16, 8, 4 or 2: the layer's cache stored at that precision,
  `polykv.precision`); absent or null means 16. Each bit width is then an option of its own, to be complete like
  the budgets; a table with any width below 16 prices its options in bytes (`OptionTable.precision`). Anchors
  (`proxy_anchored`) are per (policy, bits), a width without its own taking the policy's 16-bit ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import pandas as pd

from polykv.errors import CalibrationError
from polykv.plan import CostModel
from polykv.precision import FULL_PRECISION, SUPPORTED_BITS, describe_supported

METRIC_PREFERENCE = ("e2e_kl", "proxy_anchored", "proxy_scaled", "e2e_dnll", "proxy_err")
#: metrics that are not curves of their own (rows at reference options only)
REFERENCE_METRICS = ("ref_e2e_kl", "ref_proxy_err")
#: whole-model rows (layer -1): e2e KL with every layer compressed by one option
ANCHOR_METRIC = "uniform_e2e_kl"
KEY = ["sample_id", "layer", "policy", "budget", "bits"]


@dataclass(frozen=True)
class Aggregation:
    """How per-sample losses become one loss per option: a statistic and optional category weights."""

    statistic: str = "mean"
    q: float | None = None
    category_weights: tuple[tuple[str, float], ...] | None = None

    @classmethod
    def parse(cls, spec: str = "mean", category_weights: Mapping[str, float] | None = None) -> Aggregation:
        """`mean`, `max` or `quantile:Q` (0 <= Q <= 1), plus {category: weight >= 0}."""
        spec = spec.strip().lower()
        if spec == "mean":
            stat, q = "mean", None
        elif spec == "max":
            stat, q = "quantile", 1.0
        elif spec.startswith("quantile:"):
            try:
                stat, q = "quantile", float(spec.split(":", 1)[1])
            except ValueError:
                stat, q = "quantile", float("nan")
            if not 0.0 <= q <= 1.0:
                raise CalibrationError(
                    f"aggregate {spec!r}: the quantile must be a number in [0, 1], e.g. quantile:0.9"
                )
        else:
            raise CalibrationError(f"unknown aggregate {spec!r}; use mean, max or quantile:Q (e.g. quantile:0.9)")
        weights = None
        if category_weights:
            bad = {k: v for k, v in category_weights.items() if not (np.isfinite(v) and v >= 0)}
            if bad:
                raise CalibrationError(f"category weights must be finite and >= 0, got {bad}")
            weights = tuple(sorted((str(k), float(v)) for k, v in category_weights.items()))
        return cls(stat, q, weights)

    def describe(self) -> dict:
        d: dict = {"statistic": self.statistic}
        if self.q is not None:
            d["q"] = self.q
        if self.category_weights:
            d["category_weights"] = dict(self.category_weights)
        return d


@dataclass(frozen=True, eq=False)
class OptionTable:
    """Per layer, the aggregated loss of every available (policy, budget, bits) option for one model.

    `frame` columns: layer, policy, budget (tokens the layer holds), bits, loss, samples; sorted by layer, policy,
    bits, budget. `grid` is the calibrated budget grid (before sliding layers were capped).
    """

    model: str
    fingerprint: dict
    metric: str
    aggregation: Aggregation
    frame: pd.DataFrame
    grid: tuple[int, ...]
    policy_params: dict[str, dict] = field(default_factory=dict)
    allow_missing: bool = False

    @property
    def num_layers(self) -> int:
        return int(self.fingerprint["num_layers"])

    @property
    def policies(self) -> tuple[str, ...]:
        return tuple(sorted(self.frame["policy"].unique()))

    @property
    def bits(self) -> tuple[int, ...]:
        """The calibrated bit widths, widest first (16 alone for a calibration without precision)."""
        return tuple(sorted({int(b) for b in self.frame["bits"]}, reverse=True))

    @property
    def precision(self) -> bool:
        """Whether some option is below 16 bits: then costs are bytes and plans may be schema_version 2."""
        return any(b != FULL_PRECISION for b in self.bits)

    @cached_property
    def cost_model(self) -> CostModel:
        return CostModel.for_fingerprint(self.fingerprint, self.precision)

    def full_precision(self) -> OptionTable:
        """The table without its options below 16 bits (itself when it has none): for plans that cannot state bits
        (allocations, engine targets)."""
        if not self.precision:
            return self
        frame = self.frame[self.frame["bits"] == FULL_PRECISION].reset_index(drop=True)
        if frame.empty:
            raise CalibrationError("the calibration has no 16-bit options; calibrate the policies at 16 bits too")
        return replace(self, frame=frame)

    @cached_property
    def _curves(self) -> dict[tuple[int, str, int], tuple[np.ndarray, np.ndarray]]:
        out = {}
        for (layer, policy, bits), g in self.frame.groupby(["layer", "policy", "bits"], sort=True):
            out[(int(layer), str(policy), int(bits))] = (
                g["budget"].to_numpy(np.int64),
                g["loss"].to_numpy(np.float64),
            )
        return out

    def params(self, policy: str) -> dict:
        return dict(self.policy_params.get(policy, {}))

    def predicted_loss(self, layer: int, policy: str, budget: int, bits: int = FULL_PRECISION) -> float | None:
        """Loss of `policy` at `budget` and `bits` on `layer`: exact on the grid, linear between grid points, else
        None.

        `full` always predicts 0 at 16 bits (nothing is evicted); sliding layers are read at min(budget, window - 1).
        """
        if policy == "full" and bits == FULL_PRECISION:
            return 0.0
        curve = self._curves.get((layer, policy, bits))
        if curve is None:
            return None
        budgets, losses = curve
        b = self.cost_model.effective(layer, budget)
        if b < budgets[0] or b > budgets[-1]:
            return None
        return float(np.interp(b, budgets, losses))


def available_metrics(curves: pd.DataFrame) -> list[str]:
    """Curve metrics a plan can be solved for: the table's own (reference rows excluded), plus `proxy_scaled` when
    the reference rows and `proxy_err` are there."""
    have = set(curves["metric"].astype(str).unique())
    out = sorted(have - set(REFERENCE_METRICS) - {ANCHOR_METRIC})
    if "proxy_err" in have and set(REFERENCE_METRICS) <= have:
        out.append("proxy_scaled")
        if ANCHOR_METRIC in have:
            out.append("proxy_anchored")
    return out


def anchor_factors(curves: pd.DataFrame, scaled: OptionTable) -> pd.DataFrame:
    """Per (policy, bits, budget) with whole-model rows: measured uniform KL / the sum of the layers' predicted
    losses.

    The per-layer losses are each measured with one layer compressed; summing them assumes errors add up across
    layers, which holds better for some policies than others (e.g. errors that later layers repair). Scaling each
    policy's curves by this factor makes the predicted loss of every calibrated uniform configuration equal its
    measured whole-model loss, so a plan is only preferred to a uniform policy where the per-layer differences
    say it should be. Columns: policy, bits, budget, measured, predicted, factor.
    """
    rows = _with_bits(curves[(curves["metric"] == ANCHOR_METRIC) & (curves["policy"] != "full")])
    measured = rows.groupby(["policy", "bits", "budget"], as_index=False)["value"].mean()
    out = []
    for r in measured.itertuples():
        losses = [
            scaled.predicted_loss(layer, str(r.policy), int(r.budget), int(r.bits))
            for layer in range(scaled.num_layers)
        ]
        if any(x is None for x in losses):
            continue
        predicted = float(sum(losses))
        value = max(float(r.value), 0.0)  # a KL; tiny negatives are rounding
        factor = value / predicted if predicted > 0 else 1.0
        out.append((str(r.policy), int(r.bits), int(r.budget), value, predicted, factor))
    return pd.DataFrame(out, columns=["policy", "bits", "budget", "measured", "predicted", "factor"])


def _anchored(curves: pd.DataFrame, scaled: OptionTable) -> pd.DataFrame:
    """The scaled frame with each option's loss times its (policy, bits) anchor factor, interpolated in
    log2(budget) between anchored budgets and held constant beyond them; a width without anchors takes the policy's
    16-bit ones, and a policy without any keeps factor 1."""
    factors = anchor_factors(curves, scaled)
    if factors.empty:
        raise CalibrationError(f"no usable {ANCHOR_METRIC} rows; recalibrate with --measure scaled")
    frame = scaled.frame.copy()
    anchors = dict(tuple(factors.groupby(["policy", "bits"])))
    for policy, bits in frame[["policy", "bits"]].drop_duplicates().itertuples(index=False):
        g = anchors.get((policy, bits), anchors.get((policy, FULL_PRECISION)))
        if g is None:
            continue
        g = g.sort_values("budget")
        at = (frame["policy"] == policy) & (frame["bits"] == bits)
        f = np.interp(
            np.log2(frame.loc[at, "budget"].to_numpy(np.float64)),
            np.log2(g["budget"].to_numpy(np.float64)),
            g["factor"].to_numpy(np.float64),
        )
        frame.loc[at, "loss"] = frame.loc[at, "loss"].to_numpy() * f
    return frame


def layer_scales(curves: pd.DataFrame, num_layers: int) -> np.ndarray:
    """Per layer: sum of `ref_e2e_kl` / sum of `ref_proxy_err` over reference options and samples (0 when the
    references evicted nothing)."""
    ref = _whole_layer_rows(curves[curves["metric"].isin(REFERENCE_METRICS)])
    sums = ref.groupby(["layer", "metric"])["value"].sum().unstack("metric")
    missing = sorted(set(range(num_layers)) - set(int(i) for i in sums.dropna().index))
    if missing:
        raise CalibrationError(
            f"reference rows (ref_e2e_kl, ref_proxy_err) are missing for layer(s) "
            f"{', '.join(map(str, missing[:8]))}; recalibrate with --measure scaled"
        )
    kl = sums["ref_e2e_kl"].reindex(range(num_layers)).to_numpy(np.float64)
    err = sums["ref_proxy_err"].reindex(range(num_layers)).to_numpy(np.float64)
    if not (np.isfinite(kl).all() and np.isfinite(err).all()):
        raise CalibrationError("reference rows hold NaN or infinite values; recalibrate with --measure scaled")
    return np.where(err > 0, np.maximum(kl, 0.0) / np.where(err > 0, err, 1.0), 0.0)


def choose_metric(available: list[str], requested: str | None) -> str:
    if requested is not None:
        if requested not in available:
            raise CalibrationError(
                f"metric {requested!r} is not in the calibration (it has {', '.join(available)}); "
                "pick one of those with --metric"
            )
        return requested
    for metric in METRIC_PREFERENCE:
        if metric in available:
            return metric
    raise CalibrationError(
        f"calibration has none of the metrics {', '.join(METRIC_PREFERENCE)} "
        f"(it has {', '.join(available) or 'none'}); pass --metric NAME"
    )


def _with_bits(curves: pd.DataFrame) -> pd.DataFrame:
    """`curves` with an integer `bits` column: 16 where the column is absent or null; CalibrationError for a width
    a plan cannot state."""
    if "bits" not in curves.columns:
        return curves.assign(bits=FULL_PRECISION)
    bits = curves["bits"]
    numeric = pd.to_numeric(bits, errors="coerce")
    filled = numeric.fillna(FULL_PRECISION)
    bad = (bits.notna() & numeric.isna()) | ~filled.isin(SUPPORTED_BITS)
    if bad.any():
        found = sorted({str(b) for b in bits[bad].unique()})
        raise CalibrationError(
            f"the curves' bits column holds {', '.join(found[:5])}; KV precision must be {describe_supported()} "
            "bits, re-run calibration"
        )
    return curves.assign(bits=filled.astype(np.int64))


def _option(layer: int, policy: str, budget: int, bits: int) -> str:
    """`layer 2 h2o@64`, with ` at 4 bits` below 16 bits (for messages)."""
    return f"layer {layer} {policy}@{budget}" + ("" if bits == FULL_PRECISION else f" at {bits} bits")


def _whole_layer_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "head" not in df.columns:
        return df
    whole = df[df["head"].isna()]
    if len(whole) or not len(df):
        return whole
    keys = [c for c in ("sample_id", "category", "layer", "policy", "budget", "bits") if c in df.columns]
    return df.groupby(keys, as_index=False, sort=True)["value"].mean()


def _check_rows(df: pd.DataFrame, num_layers: int) -> None:
    bad = df[~np.isfinite(df["value"].to_numpy(np.float64))]
    if len(bad):
        where = "; ".join(
            f"{_option(r.layer, r.policy, r.budget, r.bits)} sample {r.sample_id}" for r in bad.head(3).itertuples()
        )
        raise CalibrationError(
            f"{len(bad)} NaN/infinite loss value(s) in the curves (e.g. {where}); fix or re-run calibration for them"
        )
    out_of_range = sorted(set(df["layer"][(df["layer"] < 0) | (df["layer"] >= num_layers)].tolist()))
    if out_of_range:
        raise CalibrationError(
            f"curves have layer(s) {out_of_range[:5]} but the model has {num_layers} layers; "
            "the curves come from another model"
        )
    if (df["budget"] < 1).any():
        raise CalibrationError("curves have budgets < 1 token; re-run calibration with a positive budget grid")
    cats = df.groupby("sample_id")["category"].nunique()
    if (cats > 1).any():
        raise CalibrationError(
            f"sample(s) {', '.join(cats[cats > 1].index[:3])} have several categories; give each sample one category"
        )
    dup = df[df.duplicated(KEY, keep=False)]
    if len(dup):
        r = dup.iloc[0]
        raise CalibrationError(
            f"{len(dup)} duplicate rows (e.g. {_option(r.layer, r.policy, r.budget, r.bits)} sample "
            f"{r.sample_id}); each (sample, layer, policy, budget, bits) must appear once, "
            "remove duplicated part files"
        )


def _sample_weights(mask: np.ndarray, sample_cats: np.ndarray, categories: list[str], agg: Aggregation) -> np.ndarray:
    """(options, samples) weights: 1 per present value, or category weight shared by the category's samples."""
    if not agg.category_weights:
        return mask.astype(np.float64)
    weights = dict(agg.category_weights)
    unknown = sorted(set(weights) - set(categories))
    if unknown:
        raise CalibrationError(
            f"category weights name {', '.join(unknown)}, not in the calibration "
            f"(categories: {', '.join(categories)}); fix the names"
        )
    cat_w = np.array([weights.get(c, 1.0) for c in categories])
    onehot = np.eye(len(categories))[sample_cats]  # (S, C)
    counts = mask.astype(np.float64) @ onehot  # (O, C) present samples per category
    per_sample = counts[:, sample_cats]  # (O, S)
    return np.where(mask, cat_w[sample_cats] / np.maximum(per_sample, 1.0), 0.0)


def _statistic(values: np.ndarray, weights: np.ndarray, agg: Aggregation) -> np.ndarray:
    total = weights.sum(axis=1)
    if agg.statistic == "mean":
        return (np.where(weights > 0, values, 0.0) * weights).sum(axis=1) / total
    order = np.argsort(np.where(weights > 0, values, np.inf), axis=1, kind="stable")
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(weights, order, axis=1)
    cum = np.cumsum(w, axis=1)
    reached = (cum >= agg.q * total[:, None] * (1 - 1e-12)) & (w > 0)
    return v[np.arange(len(v)), reached.argmax(axis=1)]


def _collapse_sliding(frame: pd.DataFrame, caps: np.ndarray) -> pd.DataFrame:
    """On sliding layers the one kept option at or above the cap (window - 1) becomes budget = cap (module doc)."""
    cap = caps[frame["layer"].to_numpy()]
    over = frame["budget"].to_numpy() > cap
    frame.loc[over, "budget"] = cap[over]
    return frame


def aggregate(
    curves: pd.DataFrame,
    fingerprint: dict,
    model: str,
    metric: str | None = None,
    aggregation: Aggregation = Aggregation(),
    allow_missing: bool = False,
    policy_params: Mapping[str, dict] | None = None,
) -> OptionTable:
    """Aggregate tidy calibration curves into an OptionTable (rules in the module docstring)."""
    cm = CostModel.for_fingerprint(fingerprint)
    n = cm.num_layers
    metric = choose_metric(available_metrics(curves), metric)
    if metric == "proxy_scaled":
        base = aggregate(curves, fingerprint, model, "proxy_err", aggregation, allow_missing, policy_params)
        scale = layer_scales(curves, n)
        frame = base.frame.assign(loss=base.frame["loss"].to_numpy() * scale[base.frame["layer"].to_numpy()])
        return replace(base, metric="proxy_scaled", frame=frame)
    if metric == "proxy_anchored":
        scaled = aggregate(curves, fingerprint, model, "proxy_scaled", aggregation, allow_missing, policy_params)
        return replace(scaled, metric="proxy_anchored", frame=_anchored(curves, scaled))
    df = _with_bits(curves[(curves["metric"] == metric) & (curves["policy"] != "full")])
    df = _whole_layer_rows(df)[["sample_id", "category", "layer", "policy", "budget", "bits", "value"]]
    if df.empty:
        raise CalibrationError(f"no {metric} curves for any policy other than full; calibrate some policies")
    df = df.astype(
        {
            "sample_id": str,
            "category": str,
            "policy": str,
            "layer": np.int64,
            "budget": np.int64,
            "bits": np.int64,
            "value": np.float64,
        }
    )
    _check_rows(df, n)

    policies = sorted(df["policy"].unique())
    widths = np.array(sorted(df["bits"].unique()), dtype=np.int64)
    grid = np.array(sorted(df["budget"].unique()), dtype=np.int64)
    samples = sorted(df["sample_id"].unique())
    categories = sorted(df["category"].unique())
    cat_of = df.drop_duplicates("sample_id").set_index("sample_id")["category"]
    sample_cats = np.searchsorted(categories, cat_of.loc[samples].to_numpy())

    # options are indexed ((layer x P + policy) x Q + bits) x B + budget
    P, Q, B, S = len(policies), len(widths), len(grid), len(samples)
    opt = (
        (df["layer"].to_numpy() * P + np.searchsorted(policies, df["policy"].to_numpy())) * Q
        + np.searchsorted(widths, df["bits"].to_numpy())
    ) * B + np.searchsorted(grid, df["budget"].to_numpy())
    values = np.full((n * P * Q * B, S), np.nan)
    values[opt, np.searchsorted(samples, df["sample_id"].to_numpy())] = df["value"].to_numpy()
    mask = ~np.isnan(values)

    layer_of = np.repeat(np.arange(n), P * Q * B)
    policy_of = np.tile(np.repeat(np.arange(P), Q * B), n)
    bits_of = np.tile(np.repeat(widths, B), n * P)
    budget_of = np.tile(grid, n * P * Q)
    caps = np.array([c if c is not None else np.iinfo(np.int64).max for c in cm.caps], dtype=np.int64)
    cap_of = caps[layer_of]
    # sliding layers need no calibration above their cap, window - 1 (only the first budget >= it is used)
    first_over = np.zeros_like(budget_of, dtype=bool)
    for layer, cap in enumerate(cm.caps):
        if cap is not None and (grid >= cap).any():
            first_over[layer_of == layer] = np.tile(grid == grid[grid >= cap][0], P * Q)
    required = (budget_of <= cap_of) | first_over
    missing = required[:, None] & ~mask
    if missing.any() and not allow_missing:
        per_option = missing.sum(axis=1)
        gaps = np.nonzero(per_option)[0]
        examples = ", ".join(
            f"{_option(layer_of[i], policies[policy_of[i]], budget_of[i], bits_of[i])} ({per_option[i]} of {S} samples)"
            for i in gaps[:4]
        )
        what = "(layer, policy, budget, bits)" if Q > 1 else "(layer, policy, budget)"
        raise CalibrationError(
            f"calibration lacks {len(gaps)} {what} option(s) for some samples: "
            f"{examples}{', ...' if len(gaps) > 4 else ''}; complete it or pass --allow-missing"
        )

    weights = _sample_weights(mask, sample_cats, categories, aggregation)
    keep = required & (weights.sum(axis=1) > 0)
    loss = _statistic(np.where(mask, values, 0.0)[keep], weights[keep], aggregation)
    frame = pd.DataFrame(
        {
            "layer": layer_of[keep],
            "policy": np.array(policies, dtype=object)[policy_of[keep]],
            "budget": budget_of[keep],
            "bits": bits_of[keep],
            "loss": loss,
            "samples": mask[keep].sum(axis=1),
        }
    )
    frame = _collapse_sliding(frame, caps).sort_values(["layer", "policy", "bits", "budget"], ignore_index=True)
    return OptionTable(
        model,
        fingerprint,
        metric,
        aggregation,
        frame,
        tuple(int(b) for b in grid),
        {k: dict(v) for k, v in (policy_params or {}).items()},
        allow_missing,
    )
