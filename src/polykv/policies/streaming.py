"""`streaming` (StreamingLLM): the first `sinks` real tokens plus the most recent ones.

The sinks come first: with a budget below `sinks` the first `budget` real tokens are kept (not the most recent
ones), because StreamingLLM's attention sinks, the first tokens that every query attends to, are what keeps the
model stable; recent tokens only fill the budget left after them. Each sink scores above every position, the earliest
highest, so the sinks are kept in order of position.
"""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import LayerObservation, Policy, recent_scores


@dataclass(frozen=True)
class Streaming(Policy):
    name = "streaming"
    sinks: int = 4

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        scores = recent_scores(obs)  # 0 .. T-1
        rel = obs.relative_positions()
        sink = (rel < self.sinks) & obs.valid
        sink_scores = (2 * obs.num_tokens - rel).to(scores.dtype)  # T+1 .. 2T, the first real token highest
        return scores.where(~sink[:, None, :], sink_scores[:, None, :])
