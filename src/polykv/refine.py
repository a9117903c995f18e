"""Refine a solved plan against the model itself: local search on the measured whole-model loss.

`polykv solve` adds up per-layer losses, each measured with only that layer compressed. That misses how layers
interact: a mid-context needle that one layer drops is still read through the others, so dropping it in any single
layer looks cheap, yet dropping it in all of them loses the answer (the session-4 diagnosis in BENCHMARKS.md:
SmolLM2's 256 plan used streaming on a layer that the 512 plan keeps nearly whole, and no layer alone shows why).

Here the objective is what the plan does as a whole: the mean KL between the full cache's and the plan's next-token
distributions over teacher-forced calibration answers, every layer compressed at once. Each round measures every
single-layer move (one budget step up or down, or another policy at the same budget) from the current plan, picks
the best combination of moves under the total budget with the same multiple-choice knapsack as `solve` (the
measured changes as losses, assumed additive only within one round), measures that combination and the best
single move, and keeps the better if it lowers the measured loss. Candidates are rows of one shared-prefix batch
(`polykv.shared_prefix`), so a round costs a few batched answer forwards per sample, not a prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from polykv.attention import polykv_attention
from polykv.calibrate.sample import PreparedSample
from polykv.calibrate.sensitivity import _answer_losses
from polykv.compat import with_cache
from polykv.plan import CostModel, LayerPlan, Plan
from polykv.policies import make_policy
from polykv.settings import LayerSetting
from polykv.shared_prefix import from_kept
from polykv.solve.mckp import solve_dp

Choice = tuple[str, int]  # (policy, budget) of one layer


@dataclass
class RefineResult:
    plan: Plan
    losses: list[float]  # measured loss of the accepted plan after each round (first: the starting plan)
    moves: list[list[str]] = field(default_factory=list)  # what each accepted round changed
    seconds: float = 0.0


class Objective:
    """Mean KL (full cache || plan) over the samples' teacher-forced answers, for many plans at once."""

    def __init__(self, model: nn.Module, samples: list[PreparedSample], max_rows: int = 48):
        self.model, self.samples, self.max_rows = model, samples, max_rows
        self._kept: list[dict[tuple[int, str, int], torch.Tensor | None]] = [{} for _ in samples]
        self.evaluated = 0

    def _kept_columns(self, s: int, layer: int, choice: Choice) -> torch.Tensor | None:
        policy, budget = choice
        key = (layer, policy, budget)
        memo = self._kept[s]
        if key not in memo:
            sample = self.samples[s]
            if policy == "full" or budget >= sample.prompt_tokens:
                memo[key] = None
            else:
                obs = sample.capture.observation(layer)
                memo[key] = LayerSetting(make_policy(policy), budget).kept_indices(obs)[0]
        return memo[key]

    @torch.no_grad()
    def __call__(self, plans: list[list[Choice]]) -> np.ndarray:
        total = np.zeros(len(plans))
        with polykv_attention(self.model):
            for s, sample in enumerate(self.samples):
                for start in range(0, len(plans), self.max_rows):
                    group = plans[start : start + self.max_rows]
                    kept = [[self._kept_columns(s, l, c) for l, c in enumerate(p)] for p in group]
                    cache = from_kept(sample.capture.cache, kept, slack=sample.answer_in.shape[1])
                    inputs = sample.answer_in.expand(len(group), -1)
                    logits = self.model(input_ids=inputs, **with_cache(self.model, cache), use_cache=True).logits
                    total[start : start + len(group)] += _answer_losses(sample, logits.float())[1].cpu().numpy()
        self.evaluated += len(plans)
        return total / len(self.samples)


def neighbours(choice: Choice, grid: list[int], policies: list[str]) -> list[Choice]:
    """One step from `choice`: the same policy one grid budget up or down, or another policy at the same budget."""
    policy, budget = choice
    out: list[Choice] = []
    below = [b for b in grid if b < budget]
    above = [b for b in grid if b > budget]
    if policy != "full":
        if below:
            out.append((policy, below[-1]))
        if above:
            out.append((policy, above[0]))
    out += [(p, budget) for p in policies if p != policy and p != "full"]
    return out


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
) -> RefineResult:
    """Local search from `plan` (see the module doc); stops after `rounds` or when a round gains < `min_gain`
    (relative). The returned plan keeps the source plan's budget, fingerprint and unit; its provenance records the
    samples, rounds and measured losses."""
    started = time.perf_counter()
    cm: CostModel = plan.cost_model
    capacity = plan.total_budget
    objective = Objective(model, samples, max_rows)
    current: list[Choice] = [(l.policy, l.budget) for l in plan.layers]
    loss = float(objective([current])[0])
    result = RefineResult(plan, [loss])
    say = log or (lambda _msg: None)
    say(f"avg {plan.average_budget:g}: measured loss {loss:.4f}")
    for round_ in range(rounds):
        moves = [(l, c) for l, choice in enumerate(current) for c in neighbours(choice, grid, policies)]
        trial = [current[:l] + [c] + current[l + 1 :] for l, c in moves]
        delta = objective(trial) - loss
        costs = [[cm.cost(l, current[l][1])] for l in range(len(current))]
        gains = [[0.0] for _ in current]
        options: list[list[Choice]] = [[c] for c in current]
        for (l, c), d in zip(moves, delta):
            costs[l].append(cm.cost(l, c[1]))
            gains[l].append(float(d))
            options[l].append(c)
        picks = solve_dp([np.array(c) for c in costs], [np.array(g) for g in gains], capacity)
        combo = [options[l][k] for l, k in enumerate(picks)]
        used = sum(cm.cost(l, c[1]) for l, c in enumerate(current))
        fits = [i for i, (l, c) in enumerate(moves) if used - cm.cost(l, current[l][1]) + cm.cost(l, c[1]) <= capacity]
        finalists, measured_list = [], []
        if fits:  # the best single move that fits was measured with the others: no second forward
            i = min(fits, key=lambda i: delta[i])
            finalists.append(trial[i])
            measured_list.append(loss + float(delta[i]))
        if combo != current and combo not in finalists:
            finalists.append(combo)
            measured_list.append(float(objective([combo])[0]))
        if not finalists:
            say(f"round {round_ + 1}: no move lowers the predicted loss; stop")
            break
        measured = np.array(measured_list)
        best = int(np.argmin(measured))
        if measured[best] > loss * (1 - min_gain):
            say(f"round {round_ + 1}: best candidate {measured[best]:.4f} vs {loss:.4f}; stop")
            break
        changed = [f"L{l}: {a[0]}@{a[1]} -> {b[0]}@{b[1]}" for l, (a, b) in enumerate(zip(current, finalists[best]))
                   if a != b]
        current, loss = finalists[best], float(measured[best])
        result.losses.append(loss)
        result.moves.append(changed)
        say(f"round {round_ + 1}: {loss:.4f} ({len(changed)} layers: {'; '.join(changed)})")
    result.seconds = time.perf_counter() - started
    result.plan = _with_choices(plan, current, result, len(samples), objective.evaluated)
    return result


def _with_choices(plan: Plan, choices: list[Choice], result: RefineResult, samples: int, evaluated: int) -> Plan:
    params = {l.policy: l.params for l in plan.layers}
    layers = [
        LayerPlan(l, p, b, params.get(p, make_policy(p).params()) if p != "full" else {},
                  old.predicted_loss if (old.policy, old.budget) == (p, b) else None)
        for l, ((p, b), old) in enumerate(zip(choices, plan.layers))
    ]
    refine = {
        "objective": "mean KL(full || plan) over teacher-forced calibration answers, all layers compressed",
        "samples": samples, "rounds": len(result.moves), "measured_loss": [float(f"{x:.6g}") for x in result.losses],
        "moves": result.moves, "plans_measured": evaluated, "source_predicted_loss": plan.predicted_loss,
    }
    return replace(plan, layers=layers, predicted_loss=None, provenance={**plan.provenance, "refine": refine})


def prepare_samples(loaded, items: list, max_context: int | None, on_sample: Callable[[int], None] | None = None
                    ) -> list[PreparedSample]:
    """Prefill each calibration item once (capture + teacher-forced full-cache answer), as `calibrate` does."""
    from polykv.calibrate.runner import CAPTURE_WINDOW
    from polykv.calibrate.sample import prepare

    out = []
    for i, item in enumerate(items):
        out.append(prepare(loaded.model, loaded.tokenizer, item.context, item.question, item.answers[0],
                           max_context, CAPTURE_WINDOW))
        if on_sample:
            on_sample(i)
    return out
