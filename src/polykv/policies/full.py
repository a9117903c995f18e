"""`full`: keep every token (the uncompressed reference)."""

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv.policies.base import PROTECT, LayerObservation, Policy


@dataclass(frozen=True)
class Full(Policy):
    name = "full"

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        return torch.full(obs.keys.shape[:3], PROTECT, device=obs.keys.device)
