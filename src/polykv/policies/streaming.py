"""`streaming` (StreamingLLM): the first `sinks` real tokens plus the most recent ones."""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import PROTECT, LayerObservation, Policy, recent_scores


@dataclass(frozen=True)
class Streaming(Policy):
    name = "streaming"
    sinks: int = 4

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        scores = recent_scores(obs)
        sink = (obs.relative_positions() < self.sinks) & obs.valid
        return scores.masked_fill(sink[:, None, :], PROTECT)
