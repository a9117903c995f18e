"""Scores, gap recovery, the Markdown report and the plots of an evaluation directory.

Gap recovery at a budget = (plan - best uniform) / (full - best uniform), where best uniform is the single policy
with the best average score at that budget; it is null when the best uniform scores at least as
much as full (no gap to recover). Each plan's difference from the best uniform policy, and its gap recovery, come
with a paired bootstrap interval (`polykv.evaluate.uncertainty`): on a suite of 30 instances per task, a difference
of a few points is often noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from polykv.errors import InputError
from polykv.evaluate.prediction import prediction_check
from polykv.evaluate.scores import select_tasks, task_scores
from polykv.evaluate.uncertainty import paired_interval
from polykv.io import atomic_write_json, atomic_write_text


def _gap(plan: float | None, best: float | None, full: float | None) -> float | None:
    """(plan - best) / (full - best); None when there is no gap: the best uniform policy scores at least the full
    cache (equal, or above it by sampling noise; the ratio's sign would flip and its size mean nothing)."""
    if plan is None or best is None or full is None or full <= best:
        return None
    return round((plan - best) / (full - best), 4)


def _interval(results: pd.DataFrame, plan: str, best: str | None, budget: int) -> dict | None:
    """Plan minus best uniform in average points, and the gap recovery, each with a paired 95 % bootstrap interval
    over the suite's instances (`polykv.evaluate.uncertainty`)."""
    if best is None:
        return None
    iv = paired_interval(results, plan, best, int(budget))
    if iv is None:
        return None
    return {
        "diff": iv.diff,
        "diff_ci95": list(iv.diff_ci),
        "gap_recovery_ci95": None if iv.gap_ci is None else list(iv.gap_ci),
        "gap_draws": iv.gap_draws,
    }


def summary(results: pd.DataFrame, model: str, tasks: list[str] | None = None) -> dict:
    """The `--json` object: per budget every method's average, full, best uniform, plan and gap recovery.

    `plan` / `gap_recovery` are the method named `plan` (else the first plan method); `plans` gives every plan
    method (`plan`, `plan-<name>`) its score and gap recovery.
    """
    results = select_tasks(results, tasks)
    scores = task_scores(results)
    avg = scores[scores.task == "average"]
    full = avg[avg.method == "full"].score
    full_score = float(full.iloc[0]) if len(full) else None
    plan_names = sorted(m for m in avg.method.unique() if m == "plan" or m.startswith("plan-"))
    main = "plan" if "plan" in plan_names else (plan_names[0] if plan_names else None)
    out: dict = {"model": model, "tasks": sorted(results.task.unique()), "budgets": {}}
    for budget in sorted(b for b in avg.budget.unique() if b >= 0):
        at = avg[avg.budget == budget]
        methods = {r.method: round(float(r.score), 4) for r in at.itertuples()}
        uniform = at[at.method.str.startswith("uniform:")]
        best = uniform.loc[uniform.score.idxmax()] if len(uniform) else None
        best_score = None if best is None else float(best.score)
        plans = {
            name: {
                "score": methods[name],
                "gap_recovery": _gap(methods[name], best_score, full_score),
                "vs_best_uniform": _interval(results, name, None if best is None else best.method, budget),
            }
            for name in plan_names
            if name in methods
        }
        for p in plans.values():  # no gap, no interval for it (the draws' ratio would be as meaningless)
            if p["gap_recovery"] is None and p["vs_best_uniform"] is not None:
                p["vs_best_uniform"]["gap_recovery_ci95"] = None
        plan = methods.get(main) if main else None
        out["budgets"][str(int(budget))] = {
            "scores": methods,
            "full": full_score,
            "best_uniform": None if best is None else {"method": best.method, "score": round(best_score, 4)},
            "plan": plan,
            "gap_recovery": _gap(plan, best_score, full_score),
            "plans": plans,
        }
    return out


def markdown(results: pd.DataFrame, info: dict, summ: dict) -> str:
    """The report: setup, average score per method x budget, gap recovery, per-task table."""
    scores = task_scores(results)
    lines = [f"# PolyKV evaluation: {summ['model']}", ""]
    for key in ("command", "machine", "mode", "instances", "tasks", "seconds", "workers", "max_context"):
        if key in info:
            lines.append(f"- {key}: `{info[key]}`" if key == "command" else f"- {key}: {info[key]}")
    lines += ["", "## Average score (0-100) per method and average budget", ""]
    avg = scores[scores.task == "average"].pivot(index="method", columns="budget", values="score")
    lines.append(_md_table(avg))
    lines += [
        "",
        "## Gap recovery: (plan - best uniform) / (full - best uniform)",
        "",
        "Intervals: paired bootstrap over instances (resampled within each task, 2000 draws), 95 %. A plan "
        "matches the best uniform policy where the interval of their difference holds 0.",
        "",
        "| budget | full | best uniform | plan method | plan | plan - best (95 % CI) | gap recovery | "
        "gap recovery 95 % CI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, v in summ["budgets"].items():
        best = v["best_uniform"]
        full = "n/a" if v["full"] is None else f"{v['full']:.2f}"
        best_s = "n/a" if best is None else f"{best['method']} {best['score']:.2f}"
        for name, p in v["plans"].items():
            gap = "n/a" if p["gap_recovery"] is None else f"{100 * p['gap_recovery']:.1f}%"
            iv = p.get("vs_best_uniform")
            diff = "n/a" if iv is None else f"{iv['diff']:+.2f} [{iv['diff_ci95'][0]:+.2f}, {iv['diff_ci95'][1]:+.2f}]"
            g_ci = (
                "n/a"
                if iv is None or iv["gap_recovery_ci95"] is None or p["gap_recovery"] is None
                else f"[{100 * iv['gap_recovery_ci95'][0]:.0f}%, {100 * iv['gap_recovery_ci95'][1]:.0f}%]"
            )
            lines.append(f"| {b} | {full} | {best_s} | {name} | {p['score']:.2f} | {diff} | {gap} | {g_ci} |")
    if summ.get("prediction"):
        pred = summ["prediction"]
        lines += [
            "",
            "## Does the calibration predict the scores?",
            "",
            f"Spearman rank correlation between a configuration's predicted loss (sum over layers of the "
            f"calibration's aggregated `{pred['metric']}`) and its measured average score, over "
            f"{pred['points']} compressed (method, budget) points: **{_fmt(pred['spearman_all'])}** (negative = "
            f"lower predicted loss, higher score). Within each budget, across methods:",
            "",
            "| budget | methods | Spearman |",
            "|---|---|---|",
        ]
        for b, r in pred["per_budget"].items():
            lines.append(f"| {b} | {r['methods']} | {_fmt(r['spearman'])} |")
        for name, r in pred["plans"].items():
            lines.append(f"\nAlong the frontier of `{name}` ({r['points']} budgets): Spearman {_fmt(r['spearman'])}.")
    lines += ["", "## Per task", ""]
    for task, group in scores[scores.task != "average"].groupby("task"):
        lines += [f"### {task}", "", _md_table(group.pivot(index="method", columns="budget", values="score")), ""]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _md_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    head = "| method | " + " | ".join("all" if c == -1 else str(c) for c in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    for method, row in frame.iterrows():
        cells = ["" if pd.isna(row[c]) else f"{row[c]:.1f}" for c in cols]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plots(
    results: pd.DataFrame, out: Path, plan_paths: dict[int, str] | None = None, calibration: Path | None = None
) -> list[Path]:
    """PNG plots: score vs budget per method; each plan per layer; the calibration heatmap (if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scores = task_scores(results)
    avg = scores[scores.task == "average"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted(b for b in avg.budget.unique() if b >= 0)
    for method, group in avg.groupby("method"):
        if (group.budget < 0).all():  # budget-independent: full, and quant:<bits> (the whole context quantised)
            style = dict(color="black", linestyle="--") if method == "full" else dict(linestyle=":", linewidth=1.5)
            ax.axhline(float(group.score.iloc[0]), label=method, **style)
            continue
        g = group.sort_values("budget")
        if method == "plan":
            style = dict(linewidth=2.5, color="crimson")
        elif method.startswith("plan-"):
            style = dict(linewidth=2.0, linestyle="-.")
        else:
            style = dict(linewidth=1, alpha=0.8)
        ax.plot(g.budget, g.score, marker="o", label=method, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("average budget (tokens per layer)")
    ax.set_ylabel("average score")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "scores_vs_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    for budget, plan_path in sorted((plan_paths or {}).items()):
        written.append(plot_plan(plan_path, out / f"plan_avg{budget}.png"))
    if calibration is not None and (Path(calibration) / "curves").exists():
        written.append(plot_heatmap(Path(calibration), out / "calibration_heatmap.png"))
    return written


def _colors(names: list[str]) -> dict[str, str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    from polykv.policies import policy_names

    return {n: matplotlib.colors.to_hex(cmap(i % 10)) for i, n in enumerate(policy_names())} | {
        n: "#999999" for n in names if n not in policy_names()
    }


def plot_plan(plan_path: str | Path, path: Path) -> Path:
    """Budget bars per layer, coloured by policy; each bar is labelled with its KV bits when a layer is below 16."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plan = json.loads(Path(plan_path).read_text())
    layers = plan["layers"]
    colors = _colors([layer["policy"] for layer in layers])
    with_bits = any(layer.get("bits", 16) != 16 for layer in layers)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bars = ax.bar(
        [layer["layer"] for layer in layers],
        [layer["budget"] for layer in layers],
        color=[colors[layer["policy"]] for layer in layers],
    )
    if with_bits:
        ax.bar_label(bars, labels=[str(layer.get("bits", 16)) for layer in layers], fontsize=6)
    ax.axhline(plan["average_budget"], color="black", linestyle=":", linewidth=1)
    used = sorted({layer["policy"] for layer in layers})
    ax.legend(handles=[Patch(color=colors[p], label=p) for p in used], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("budget (tokens)")
    ax.set_yscale("log", base=2)
    bits_note = " (bar labels: KV bits)" if with_bits else ""
    ax.set_title(f"{plan['model']}: plan at average budget {plan['average_budget']}{bits_note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(calibration: Path, path: Path, metric: str = "proxy_err") -> Path:
    """Layer x budget: the best policy (colour) and its mean loss (text)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    curves = pd.read_parquet(calibration / "curves")
    if metric not in set(curves.metric):
        metric = sorted(set(curves.metric))[0]
    df = curves[(curves.metric == metric) & (curves.policy != "full")]
    mean = df.groupby(["layer", "budget", "policy"], as_index=False)["value"].mean()
    best = mean.loc[mean.groupby(["layer", "budget"])["value"].idxmin()]
    layers = sorted(best.layer.unique())
    budgets = sorted(best.budget.unique())
    names = sorted(best.policy.unique())
    colors = _colors(names)
    grid = np.ones((len(layers), len(budgets), 3))
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(budgets), 0.3 * len(layers) + 1.5))
    import matplotlib

    for r in best.itertuples():
        i, j = layers.index(r.layer), budgets.index(r.budget)
        grid[i, j] = matplotlib.colors.to_rgb(colors[r.policy])
        ax.text(j, i, f"{r.value:.2f}", ha="center", va="center", fontsize=6)
    ax.imshow(grid, aspect="auto")
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("budget")
    ax.set_ylabel("layer")
    ax.set_title(f"best policy per layer and budget (mean {metric})", fontsize=9)
    ax.legend(
        handles=[Patch(color=colors[p], label=p) for p in names], fontsize=6, loc="upper left", bbox_to_anchor=(1, 1)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(out: str | Path, tasks: list[str] | None = None, calibration: str | Path | None = None) -> dict:
    """(Re)write report.md, summary.json and the plots of an evaluation directory from its results.

    With `tasks`, the report covers only those tasks and is written as report-<tasks>.md / summary-<tasks>.json
    (the plots are left as they are). `calibration` replaces the evaluation's own for the predicted-loss check
    (e.g. to ask whether another measure predicts the scores better); it is recorded in info.json.
    """
    out = Path(out)
    results = pd.read_parquet(out / "results.parquet")
    info = json.loads((out / "info.json").read_text())
    if calibration is not None:
        if not Path(calibration).is_dir():
            raise InputError(f"calibration {calibration} is not a directory; pass a polykv calibrate --out directory")
        info["calibration"] = str(calibration)
        atomic_write_json(out / "info.json", info)
    summ = summary(results, info["model"], tasks)
    cal = info.get("calibration")
    if cal and info.get("methods") and Path(cal).exists():
        summ["prediction"] = prediction_check(select_tasks(results, tasks), info, Path(cal))
    if tasks:
        suffix = "-" + "+".join(sorted(tasks))
        atomic_write_json(out / f"summary{suffix}.json", summ)
        atomic_write_text(out / f"report{suffix}.md", markdown(select_tasks(results, tasks), info, summ))
        return summ
    atomic_write_json(out / "summary.json", summ)
    plan_paths = {int(k): v for k, v in info.get("plans", {}).items() if Path(v).exists()}
    plots(results, out, plan_paths, Path(cal) if cal else None)
    atomic_write_text(out / "report.md", markdown(results, info, summ))
    return summ
