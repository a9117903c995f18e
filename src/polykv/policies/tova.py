"""`tova` (TOVA): keep the tokens the last prompt query attends to most (averaged over the GQA group)."""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import LayerObservation, Policy
from polykv.policies.scoring import window_attention


@dataclass(frozen=True)
class TOVA(Policy):
    name = "tova"
    window_size = 1

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        return window_attention(obs, 1)
