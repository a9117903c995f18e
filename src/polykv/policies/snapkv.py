"""`snapkv` (SnapKV): attention of the last `window` prompt queries, pooled, per KV head; the window is kept."""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import LayerObservation, Policy, protect_last
from polykv.policies.scoring import pool1d, window_attention


@dataclass(frozen=True)
class SnapKV(Policy):
    name = "snapkv"
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    def queries_needed(self) -> int:
        return self.window

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        scores = pool1d(window_attention(obs, self.window), self.kernel, self.pooling)
        return protect_last(scores, min(self.window, obs.num_tokens))
