"""`knorm` (Devoto et al. 2024): keys with a low L2 norm draw more attention, so keep the lowest-norm keys."""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import LayerObservation, Policy


@dataclass(frozen=True)
class KNorm(Policy):
    name = "knorm"

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        return -obs.keys.float().norm(dim=-1)
