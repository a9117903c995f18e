"""`random`: a seeded random choice, the control every real policy must beat."""

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv.policies.base import LayerObservation, Policy


@dataclass(frozen=True)
class Random(Policy):
    name = "random"
    seed: int = 0

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + obs.layer)
        return torch.rand(obs.keys.shape[:3], generator=gen).to(obs.keys.device)
