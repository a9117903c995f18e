"""How sure is a comparison of two methods on a finite suite: paired, task-stratified bootstrap intervals.

A suite of 30 instances per task scores each instance 0 or 100 on the retrieval tasks, so one instance moves a
task's score by 3.3 points and the average by 3.3 / tasks. Whether a plan "matches" the best uniform policy at a
budget, or recovers more than some share of the gap, can only be read against that noise. Every method decodes the
same instances, so the comparison is paired: each bootstrap draw resamples instances (within each task, so every
task keeps its weight and size), and recomputes both methods' averages, their difference and the gap recovery on
that same draw. Draws use a fixed seed, so a report re-renders to the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DRAWS = 2000
SEED = 0


@dataclass(frozen=True)
class PairedInterval:
    """`a - b` in average points with its 95 % interval, and (with a full-cache column) the gap recovery
    (a - b) / (full - b) with its interval over the draws where full > b (`gap_draws` of them)."""

    diff: float
    diff_ci: tuple[float, float]
    gap_ci: tuple[float, float] | None
    gap_draws: int


def _matrix(results: pd.DataFrame, columns: dict[str, tuple[str, int | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance scores, one column per named (method, budget) (budget None: the uncompressed `full` rows), and
    each row's task code; only instances that every column scored are kept (a pairing needs both sides)."""
    frames = []
    for name, (method, budget) in columns.items():
        rows = results[results.method == method]
        rows = rows[rows.budget.isna()] if budget is None else rows[rows.budget == budget]
        frames.append(rows.set_index("instance_id")[["task", "score"]].rename(columns={"score": name}))
    joined = frames[0]
    for frame in frames[1:]:
        joined = joined.join(frame.drop(columns="task"), how="inner")
    tasks = pd.Categorical(joined.task).codes
    return joined[list(columns)].to_numpy(dtype=float), np.asarray(tasks)


def _task_means(scores: np.ndarray, tasks: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Average over tasks of each task's mean over the drawn rows: `index` is (draws, rows) of row numbers."""
    n_tasks = int(tasks.max()) + 1
    drawn, drawn_tasks = scores[index], tasks[index]  # (draws, rows, columns), (draws, rows)
    out = np.zeros((index.shape[0], scores.shape[1]))
    for t in range(n_tasks):
        mask = (drawn_tasks == t)[..., None]
        out += (drawn * mask).sum(1) / mask.sum(1)
    return out / n_tasks


def paired_interval(
    results: pd.DataFrame, a: str, b: str, budget: int, with_full: bool = True, draws: int = DRAWS, seed: int = SEED
) -> PairedInterval | None:
    """Bootstrap `a - b` at `budget` (and the gap recovery against `full` when `with_full`); None when the two
    methods share no instance."""
    columns: dict[str, tuple[str, int | None]] = {"a": (a, budget), "b": (b, budget)}
    if with_full and (results.method == "full").any():
        columns["full"] = ("full", None)
    scores, tasks = _matrix(results, columns)
    if not len(scores):
        return None
    rng = np.random.default_rng(seed)
    # resample within each task: the draw keeps every task's instance count
    index = np.empty((draws, len(scores)), dtype=np.int64)
    for t in np.unique(tasks):
        rows = np.flatnonzero(tasks == t)
        index[:, rows] = rows[rng.integers(0, len(rows), size=(draws, len(rows)))]
    means = _task_means(scores, tasks, index)
    point = _task_means(scores, tasks, np.arange(len(scores))[None, :])[0]
    diff = means[:, 0] - means[:, 1]
    lo, hi = np.percentile(diff, [2.5, 97.5])
    gap_ci, gap_draws = None, 0
    if "full" in columns:
        denom = means[:, 2] - means[:, 1]
        ok = denom > 0
        gap_draws = int(ok.sum())
        if gap_draws:
            g_lo, g_hi = np.percentile(diff[ok] / denom[ok], [2.5, 97.5])
            gap_ci = (round(float(g_lo), 4), round(float(g_hi), 4))
    return PairedInterval(
        round(float(point[0] - point[1]), 4), (round(float(lo), 4), round(float(hi), 4)), gap_ci, gap_draws
    )
