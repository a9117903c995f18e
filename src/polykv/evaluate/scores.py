"""Scores of an evaluation's results: the mean per (method, budget, task) and the task selection a report covers.

Shared by the report (`polykv.evaluate.report`) and the predicted-loss check (`polykv.evaluate.prediction`), which
must average the same way for their numbers to agree.
"""

from __future__ import annotations

import pandas as pd

from polykv.errors import InputError


def task_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Mean score per (method, budget, task), and the average over tasks (each task weighs the same)."""
    df = results.assign(budget=results.budget.fillna(-1).astype(int))
    per_task = df.groupby(["method", "budget", "task"], as_index=False)["score"].mean()
    avg = per_task.groupby(["method", "budget"], as_index=False)["score"].mean().assign(task="average")
    return pd.concat([per_task, avg], ignore_index=True)


def select_tasks(results: pd.DataFrame, tasks: list[str] | None) -> pd.DataFrame:
    """Only these tasks (e.g. the ones a small model can solve with the full cache, or a transfer check's held-out
    half); an unknown task name is an error, not an empty report."""
    if not tasks:
        return results
    unknown = sorted(set(tasks) - set(results.task))
    if unknown:
        raise InputError(
            f"task(s) {', '.join(unknown)} are not in these results (they have "
            f"{', '.join(sorted(results.task.unique()))})"
        )
    return results[results.task.isin(tasks)]
