"""The guard: measure every candidate plan on held-out samples before one ships, and keep the best.

`polykv solve` adds up per-layer losses, each measured with only that layer compressed. At tight budgets, with every
layer compressed at once, that sum can mislead badly (a plan that starves most layers to feed a few can lose answers
that a uniform policy keeps; BENCHMARKS.md, Generalization). So before a plan is written, the guard measures the
whole-model loss of each candidate at the same budget: the solved plan, blends that re-solve it with per-layer
budget floors (a fraction of the average budget on every layer, between the free plan and a uniform one), and every
uniform policy (from a calibration with KV precision, also every uniform policy at each calibrated width below 16
bits, with as many tokens as the same bytes hold). Layers below 16 bits are measured as their quantised storage
serves them (`polykv.answer_loss`). The loss is, by default, the mean over held-out samples of KL(full cache ||
candidate) on the teacher-forced gold answer with every layer compressed, the objective `polykv refine` uses
(`OBJECTIVES` lists the others, on the gold answer or on the full cache's own greedy one). The solved plan is written
unless another candidate's loss is clearly lower (by more than `MARGIN` standard errors of the paired difference),
in which case the lowest of those is; the provenance records every candidate's loss, so a plan is never knowingly
worse than the best single policy on the data it was judged on.

The measurement needs the model (a few batched answer forwards per sample); the candidates and the choice need only
plans, so `polykv.solve` builds the candidates and this module judges them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from polykv.errors import InputError
from polykv.plan import Plan
from polykv.solve.aggregate import OptionTable
from polykv.solve.candidates import SOLVED, guard_candidates
from polykv.solve.constraints import SolveOptions

#: Another candidate replaces the solved plan only if its loss is lower by more than this many standard errors of
#: the paired per-sample difference: a prior choice (about a one-sided 84 % level), not tuned on any result.
MARGIN = 1.0
#: The losses the guard can judge by (`polykv solve --guard-objective`), each with the line its provenance records.
OBJECTIVES = {
    "kl": "mean KL(full || plan) over teacher-forced held-out answers, all layers compressed",
    "nll": "mean rise of the gold answer's NLL over the full cache's, teacher-forced held-out answers, all layers "
    "compressed",
    "own-kl": "mean KL(full || plan) over the full cache's own greedy held-out answers, teacher-forced, all layers "
    "compressed",
    "own-miss": "mean share of the full cache's own greedy held-out answer that greedy decoding under the plan does "
    "not reproduce, all layers compressed",
}
#: Each objective as (answer teacher-forced: the full cache's own greedy one or the gold one, loss measured on it).
MEASURES = {"kl": (False, "kl"), "nll": (False, "nll"), "own-kl": (True, "kl"), "own-miss": (True, "miss")}
DEFAULT_OBJECTIVE = "kl"

Measure = Callable[[Sequence[Plan]], np.ndarray]  # plans -> (samples, plans) answer loss


def choices(plan: Plan) -> list[tuple[str, int, int]]:
    """A plan as the (policy, budget, bits) of each layer: what the measurement depends on."""
    return [(layer.policy, layer.budget, layer.bits) for layer in plan.layers]


def distinct(candidates: Mapping[str, Plan]) -> dict[str, Plan]:
    """The candidates without repeats: a later candidate equal to an earlier one (layer by layer) is dropped."""
    seen: set[tuple] = set()
    out: dict[str, Plan] = {}
    for name, plan in candidates.items():
        key = tuple(choices(plan))
        if key not in seen:
            seen.add(key)
            out[name] = plan
    return out


@dataclass(frozen=True)
class Verdict:
    """The guard's measurements at one budget and the candidate it keeps."""

    losses: dict[str, float]  # candidate -> mean answer KL over the samples
    wins: dict[str, int]  # candidate -> samples where it beats the best uniform candidate
    chosen: str
    samples: int
    data_hash: str | None = None
    margin: float = 1.0
    objective: str = DEFAULT_OBJECTIVE

    @property
    def best_uniform(self) -> str | None:
        uniform = [n for n in self.losses if n.startswith("uniform:")]
        return min(uniform, key=lambda n: self.losses[n]) if uniform else None

    def provenance(self) -> dict:
        """The record a written plan carries under `provenance.guard` (deterministic, JSON-ready)."""
        best = self.best_uniform
        return {
            "objective": OBJECTIVES[self.objective],
            "samples": self.samples,
            "data_hash": self.data_hash,
            "chosen": self.chosen,
            "margin_se": self.margin,
            "solved_loss": _round(self.losses.get(SOLVED)),
            "best_uniform": best,
            "best_uniform_loss": None if best is None else _round(self.losses[best]),
            "chosen_loss": _round(self.losses[self.chosen]),
            "losses": {name: _round(value) for name, value in self.losses.items()},
            "wins_over_best_uniform": dict(self.wins),
        }


def clearly_below(per_sample: np.ndarray, i: int, ref: int, margin: float) -> bool:
    """Whether candidate `i`'s loss is below candidate `ref`'s by more than `margin` standard errors of their paired
    per-sample difference (with one sample: strictly below)."""
    d = per_sample[:, i] - per_sample[:, ref]
    se = float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return float(d.mean()) < -margin * se and float(d.mean()) < 0


def judge(
    per_sample: np.ndarray,
    names: Sequence[str],
    data_hash: str | None = None,
    margin: float = MARGIN,
    objective: str = DEFAULT_OBJECTIVE,
) -> Verdict:
    """The candidate to write: the first one (the solved plan) unless others are clearly better (`clearly_below`
    with `margin`), then the one of those with the least mean loss (ties go to the earlier name).

    `per_sample` is (samples, candidates), in the order of `names`. A handful of samples cannot tell apart plans
    whose losses differ by less than their noise, so the solved plan is not swapped for a blend on a coin toss."""
    if per_sample.ndim != 2 or per_sample.shape[1] != len(names) or per_sample.shape[0] == 0:
        raise ValueError(f"per_sample must be (samples >= 1, {len(names)}), got {per_sample.shape}")
    means = per_sample.mean(0)
    losses = {name: float(m) for name, m in zip(names, means, strict=False)}
    better = [i for i in range(1, len(names)) if clearly_below(per_sample, i, 0, margin)]
    chosen = names[min(better, key=lambda i: (means[i], i))] if better else names[0]
    uniform = [i for i, n in enumerate(names) if n.startswith("uniform:")]
    wins: dict[str, int] = {}
    if uniform:
        best = min(uniform, key=lambda i: means[i])
        wins = {n: int((per_sample[:, i] < per_sample[:, best]).sum()) for i, n in enumerate(names) if i != best}
    return Verdict(losses, wins, chosen, int(per_sample.shape[0]), data_hash, margin, objective)


def guard(
    candidates: Mapping[str, Plan],
    measure: Measure,
    data_hash: str | None = None,
    margin: float = MARGIN,
    objective: str = DEFAULT_OBJECTIVE,
) -> tuple[Plan, Verdict]:
    """Measure each distinct candidate once, keep the best one, and record the verdict in its provenance.

    A candidate equal to an earlier one (layer by layer) shares its measured losses, so a solved plan that is
    itself a uniform plan ties with it and is kept as `solved`."""
    pool = distinct(candidates)
    unique = list(pool)
    measured = np.asarray(measure([pool[n] for n in unique]), dtype=np.float64)
    column = {tuple(choices(pool[n])): i for i, n in enumerate(unique)}
    names = list(candidates)
    per_sample = measured[:, [column[tuple(choices(candidates[n]))] for n in names]]
    verdict = judge(per_sample, names, data_hash, margin, objective)
    chosen = candidates[verdict.chosen]
    return replace(chosen, provenance={**chosen.provenance, "guard": verdict.provenance()}), verdict


def guard_all(
    frontier: Sequence[Mapping[str, Plan]],
    measure: Measure,
    data_hash: str | None = None,
    margin: float = MARGIN,
    objective: str = DEFAULT_OBJECTIVE,
) -> list[tuple[Plan, Verdict]]:
    """`guard` for several budgets with one measurement call (one batch of rows per sample for all of them)."""
    pools = [distinct(c) for c in frontier]
    flat = [plan for pool in pools for plan in pool.values()]
    per_sample = np.asarray(measure(flat), dtype=np.float64)
    out, start = [], 0
    for candidates, pool in zip(frontier, pools, strict=False):
        width = len(pool)
        block = per_sample[:, start : start + width]
        start += width
        out.append(guard(candidates, lambda _plans, block=block: block, data_hash, margin, objective))
    return out


def held_out(items: Sequence, used_ids: Sequence[str], n: int, source: str) -> list:
    """The first `n` items of `source` that calibration did not use, taken round-robin across categories.

    InputError naming the fix when none is left: a guard judged on the calibration samples themselves would favour
    the solved plan, which was fitted to them."""
    from polykv.calibrate import round_robin

    if n < 1:
        raise InputError(f"--guard-samples must be at least 1, got {n}; or pass --no-guard")
    used = set(used_ids)
    left = [item for item in round_robin(list(items)) if item.id not in used]
    if not left:
        raise InputError(
            f"every sample of {source} was used to calibrate, none is left to judge plans on; pass "
            "--guard-data with other samples, calibrate on fewer (--samples), or pass --no-guard"
        )
    return left[:n]


def on_shipped_set(sample_ids: Sequence[str]) -> bool:
    """Whether a calibration used only samples of the shipped calibration set (by id)."""
    from polykv.calibrate import default_data_path as calibration_path
    from polykv.data import load_samples

    path = calibration_path()
    return bool(sample_ids) and path.is_file() and set(sample_ids) <= {s.id for s in load_samples(path)}


def default_data_path() -> Path:
    """The shipped held-out set: samples made like the shipped calibration set, disjoint from it and the suite."""
    from polykv.calibrate import default_data_path as calibration_path

    return calibration_path().with_name("holdout.jsonl")


def model_measure(
    loaded,
    items: Sequence,
    max_context: int | None,
    on_sample: Callable[[int], None] | None = None,
    objective: str = DEFAULT_OBJECTIVE,
) -> Measure:
    """Prefill each item once and return the measurement the guard needs: plans -> (samples, plans) loss, the
    `objective` named in `OBJECTIVES`."""
    from polykv.answer_loss import Objective, prepare_samples

    own, loss = MEASURES[objective]
    losses = Objective(loaded.model, prepare_samples(loaded, list(items), max_context, on_sample, own))
    return lambda plans: losses.per_sample_losses([choices(p) for p in plans])[loss]


@dataclass(frozen=True)
class GuardSettings:
    """Where the guard's samples come from and how many judge (`polykv solve --guard-*`)."""

    data: Path | None = None  # JSONL of samples; None: the shipped held-out set
    samples: int = 8
    margin: float = MARGIN
    objective: str = DEFAULT_OBJECTIVE
    model: str | None = None  # None: the model the calibration names
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown guard objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")


def guard_plans(
    table: OptionTable,
    plans: Sequence[Plan],
    options: SolveOptions,
    calibration: Mapping | None,
    metadata: Mapping,
    settings: GuardSettings,
    log: Callable[[str], None] = lambda _m: None,
) -> list[tuple[Plan, Verdict]]:
    """Judge each solved plan against its floor blends and every uniform policy; the kept plan and the verdict.

    `metadata` is the calibration's metadata.json (model, fingerprint, samples used, max context)."""
    from polykv.data import data_hash, load_samples
    from polykv.models import load_model

    used = list(metadata.get("sample_ids", []))
    path = settings.data or default_data_path()
    if settings.data is None and not on_shipped_set(used):
        raise InputError(
            "the calibration was not made on the shipped set, so the shipped held-out samples do not "
            "speak for its workload; pass --guard-data with samples of that workload (the --data file "
            "works: the samples calibration used are skipped), or --no-guard"
        )
    items = held_out(load_samples(path), used, settings.samples, str(path))
    loaded = load_model(settings.model or metadata["model"], device=settings.device, dtype=settings.dtype)
    if loaded.fingerprint != table.fingerprint:
        raise InputError(
            f"the guard's model {loaded.name} is not the calibrated one ({table.model}); pass "
            "--guard-model with the calibrated model, or --no-guard"
        )
    log(f"guard: {len(items)} held-out samples from {path}")
    max_context = (metadata.get("settings") or {}).get("max_context")
    measure = model_measure(loaded, items, max_context, objective=settings.objective)
    frontier = [guard_candidates(table, int(p.average_budget), p, options, calibration) for p in plans]
    return guard_all(frontier, measure, data_hash(items), settings.margin, settings.objective)


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")
