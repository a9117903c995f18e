"""`h2o` (Heavy-Hitter Oracle): attention accumulated over all prompt queries, plus the most recent tokens.

As in H2O, the budget is split between heavy hitters and a recent window (`recent_fraction` of the budget).
The accumulation runs over query chunks (see `scoring.cumulative_attention`); it is computed once per layer.
"""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import LayerObservation, Policy, protect_last


@dataclass(frozen=True)
class H2O(Policy):
    name = "h2o"
    needs_cumulative = True
    budget_dependent = True
    recent_fraction: float = 0.5

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        if obs.cumulative_attention is None:
            raise ValueError("h2o needs cumulative attention; the observation was captured without it")
        scores = obs.cumulative_attention.clone()
        return protect_last(scores, min(int(budget * self.recent_fraction), obs.num_tokens))
