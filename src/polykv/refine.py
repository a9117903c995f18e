"""Refine a solved plan against the model itself: local search on the measured whole-model loss.

`polykv solve` adds up per-layer losses, each measured with only that layer compressed. That misses how layers
interact: a mid-context needle that one layer drops is still read through the others, so dropping it in any single
layer looks cheap, yet dropping it in all of them loses the answer (docs/experiments.md, Refinement:
SmolLM2's 256 plan used streaming on a layer that the 512 plan keeps nearly whole, and no layer alone shows why).

Here the objective is what the plan does as a whole: the mean KL between the full cache's and the plan's next-token
distributions over teacher-forced calibration answers, every layer compressed at once. Each round measures every
single-layer move (one budget step up or down, or another policy at the same budget) from the current plan, picks
the best combination of moves under the total budget with the same multiple-choice knapsack as `solve` (the
measured changes as losses, assumed additive only within one round), measures that combination and the best
single move, and keeps the better if it lowers the measured loss. Candidates are rows of one shared-prefix batch
(`polykv.shared_prefix`), so a round costs a few batched answer forwards per sample, not a prefill.

Each round picks the best of hundreds of noisily measured moves, so the search overfits its samples
(docs/experiments.md, Refinement: 8 rounds on 12 samples lowered the measured loss and lost a task). Two guards:
moves are ranked by their mean change plus a multiple of its standard error over the samples (a move must help
consistently, not on one sample), and with held-out samples a round's finalist is accepted only if it also lowers
their loss; the search stops at the first round where no finalist passes, so the returned plan is the one with the
lowest held-out loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from torch import nn

from polykv.answer_loss import Choice, Objective
from polykv.calibrate.sample import PreparedSample
from polykv.errors import PlanError
from polykv.plan import CostModel, LayerPlan, Plan, uniform_plan
from polykv.policies import make_policy
from polykv.precision import FULL_PRECISION
from polykv.solve.mckp import solve_dp


@dataclass
class RefineResult:
    plan: Plan
    losses: list[float]  # measured loss of the accepted plan after each round (first: the starting plan)
    moves: list[list[str]] = field(default_factory=list)  # what each accepted round changed
    seconds: float = 0.0
    held_out: list[float] = field(default_factory=list)  # held-out loss after each accepted round (first: start)
    rejected: list[list[float]] = field(default_factory=list)  # [round, search loss, held-out loss] turned down


def neighbours(choice: Choice, grid: list[int], policies: list[str], reach: int = 1) -> list[Choice]:
    """The moves from `choice`: the same policy up to `reach` grid budgets up or down, and every other policy within
    `reach - 1` grid budgets of this one (reach 1: one budget step, or another policy at the same budget).

    A wider reach measures each layer's options around the operating point (every other layer as it is in the plan),
    not only next to it: from a uniform plan, reach 2 prices each layer's budget quartered, halved, doubled or
    quadrupled with the rest of the model compressed at the target budget."""
    policy, budget = choice
    below = [b for b in grid if b < budget]
    above = [b for b in grid if b > budget]
    steps = below[::-1][:reach][::-1] + above[:reach]
    near = below[::-1][: reach - 1][::-1] + [budget] + above[: reach - 1]
    out: list[Choice] = [] if policy == "full" else [(policy, b) for b in steps]
    out += [(p, b) for p in policies if p != policy and p != "full" for b in near]
    return out


def best_uniform(
    model: nn.Module, samples: list[PreparedSample], like: Plan, policies: list[str], max_rows: int = 48
) -> tuple[Plan, dict[str, float]]:
    """The uniform plan at `like`'s average budget whose measured loss on `samples` is lowest, and every policy's
    loss: the operating point a search with a wide reach starts from."""
    budget = int(like.average_budget)
    plans = {p: uniform_plan(like.model, like.fingerprint, p, budget, make_policy(p).params()) for p in policies}
    losses = Objective(model, samples, max_rows)([[(li.policy, li.budget) for li in p.layers] for p in plans.values()])
    measured = {p: float(v) for p, v in zip(plans, losses, strict=True)}
    return plans[min(measured, key=measured.__getitem__)], measured


def refine_plan(
    model: nn.Module,
    samples: list[PreparedSample],
    plan: Plan,
    grid: list[int],
    policies: list[str],
    rounds: int = 5,
    min_gain: float = 0.01,
    max_rows: int = 48,
    log: Callable[[str], None] | None = None,
    held_out: list[PreparedSample] | None = None,
    caution: float = 1.0,
    reach: int = 1,
) -> RefineResult:
    """Local search from `plan` (see the module doc).

    Moves are ranked by their measured change plus `caution` standard errors over the samples, so that a move which
    helps one sample and hurts the rest does not look like a gain. A round's finalists (the knapsack's combination
    and the best single move) are tried in order of measured loss; one is accepted if it lowers the loss by at least
    `min_gain` (relative) and, with `held_out` samples, also lowers their loss below every earlier round's. The
    search stops after `rounds` or at the first round with nothing accepted. The returned plan keeps the source
    plan's budget, fingerprint and unit; its provenance records the samples, rounds and measured losses."""
    below = [lp.layer for lp in plan.layers if lp.bits != FULL_PRECISION]
    if below:
        raise PlanError(
            f"refine moves policies and budgets of 16-bit layers, but layers {below[:8]} are below 16 bits; "
            "refine a plan solved without bits, or use the solved plan as it is"
        )
    started = time.perf_counter()
    cm: CostModel = plan.cost_model
    capacity = plan.total_budget
    objective = Objective(model, samples, max_rows)
    check = Objective(model, held_out, max_rows) if held_out else None
    current: list[Choice] = [(li.policy, li.budget) for li in plan.layers]
    current_ps = objective.per_sample([current])[:, 0]
    loss = float(current_ps.mean())
    result = RefineResult(plan, [loss])
    if check:
        result.held_out.append(float(check([current])[0]))
    say = log or (lambda _msg: None)
    say(
        f"avg {plan.average_budget:g}: measured loss {loss:.4f}"
        + (f", held-out {result.held_out[0]:.4f}" if check else "")
    )
    for round_ in range(rounds):
        moves = [(li, c) for li, choice in enumerate(current) for c in neighbours(choice, grid, policies, reach)]
        trial = [current[:li] + [c] + current[li + 1 :] for li, c in moves]
        trial_ps = objective.per_sample(trial)
        change = trial_ps - current_ps[:, None]
        spread = change.std(0, ddof=1) / np.sqrt(len(samples)) if len(samples) > 1 else np.zeros(len(moves))
        score = change.mean(0) + caution * spread
        costs = [[cm.cost(li, current[li][1])] for li in range(len(current))]
        gains = [[0.0] for _ in current]
        options: list[list[Choice]] = [[c] for c in current]
        for (li, c), d in zip(moves, score, strict=False):
            costs[li].append(cm.cost(li, c[1]))
            gains[li].append(float(d))
            options[li].append(c)
        picks = solve_dp([np.array(c) for c in costs], [np.array(g) for g in gains], capacity)
        combo = [options[li][k] for li, k in enumerate(picks)]
        used = sum(cm.cost(li, c[1]) for li, c in enumerate(current))
        fits = [
            i for i, (li, c) in enumerate(moves) if used - cm.cost(li, current[li][1]) + cm.cost(li, c[1]) <= capacity
        ]
        finalists: list[tuple[list[Choice], np.ndarray]] = []
        if fits:  # the best single move that fits was measured with the others: no second forward
            i = min(fits, key=lambda i: score[i])
            finalists.append((trial[i], trial_ps[:, i]))
        if combo != current and all(combo != f for f, _ in finalists):
            finalists.append((combo, objective.per_sample([combo])[:, 0]))
        finalists.sort(key=lambda f: float(f[1].mean()))
        accepted = None
        for candidate, per in finalists:
            measured = float(per.mean())
            if measured > loss * (1 - min_gain):
                say(f"round {round_ + 1}: candidate {measured:.4f} vs {loss:.4f}: too small a gain")
                continue
            if check:
                judged = float(check([candidate])[0])
                if judged >= min(result.held_out):
                    say(
                        f"round {round_ + 1}: candidate {measured:.4f}, but held-out {judged:.4f} is not below "
                        f"{min(result.held_out):.4f}"
                    )
                    result.rejected.append([round_ + 1, measured, judged])
                    continue
                result.held_out.append(judged)
            accepted = candidate, per
            break
        if accepted is None:
            say(f"round {round_ + 1}: nothing accepted; stop")
            break
        changed = [
            f"L{li}: {a[0]}@{a[1]} -> {b[0]}@{b[1]}"
            for li, (a, b) in enumerate(zip(current, accepted[0], strict=False))
            if a != b
        ]
        current, current_ps = accepted
        loss = float(current_ps.mean())
        result.losses.append(loss)
        result.moves.append(changed)
        say(
            f"round {round_ + 1}: {loss:.4f}"
            + (f", held-out {result.held_out[-1]:.4f}" if check else "")
            + f" ({len(changed)} layers: {'; '.join(changed)})"
        )
    result.seconds = time.perf_counter() - started
    result.plan = _with_choices(
        plan, current, result, len(samples), len(held_out or []), objective.evaluated, caution, reach
    )
    return result


def _with_choices(
    plan: Plan,
    choices: list[Choice],
    result: RefineResult,
    samples: int,
    held_out: int,
    evaluated: int,
    caution: float,
    reach: int,
) -> Plan:
    params = {li.policy: li.params for li in plan.layers}
    layers = [
        LayerPlan(
            li,
            p,
            b,
            params.get(p, make_policy(p).params()) if p != "full" else {},
            old.predicted_loss if (old.policy, old.budget) == (p, b) else None,
        )
        for li, ((p, b), old) in enumerate(zip(choices, plan.layers, strict=False))
    ]
    refine = {
        "objective": "mean KL(full || plan) over teacher-forced calibration answers, all layers compressed",
        "samples": samples,
        "rounds": len(result.moves),
        "measured_loss": _rounded(result.losses),
        "moves": result.moves,
        "plans_measured": evaluated,
        "caution": caution,
        "reach": reach,
        "start": f"uniform:{plan.layers[0].policy}" if plan.provenance.get("solver") == "uniform" else "plan",
        "source_predicted_loss": plan.predicted_loss,
    }
    if held_out:
        refine["held_out"] = {
            "samples": held_out,
            "loss": _rounded(result.held_out),
            "rejected": [[int(r), *_rounded([a, b])] for r, a, b in result.rejected],
        }
    predicted = plan.predicted_loss if not result.moves else None  # unchanged layers keep the solver's prediction
    return replace(plan, layers=layers, predicted_loss=predicted, provenance={**plan.provenance, "refine": refine})


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{x:.6g}") for x in values]
