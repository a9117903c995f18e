"""`snapkv` (SnapKV): attention of the last `window` prompt queries, pooled, per KV head; the window is kept.

As in the SnapKV paper and kvpress, only the prefix's scores (the columns before the observation window) are pooled:
the window attends strongly to its own columns, and pooling across the boundary would let those columns lift the
last prefix tokens above prefix tokens the window actually attended to. The window itself is always kept.
"""

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
        window = min(self.window, obs.num_tokens)
        scores = window_attention(obs, self.window)
        prefix = obs.num_tokens - window
        if prefix > 0:
            scores[..., :prefix] = pool1d(scores[..., :prefix], self.kernel, self.pooling)
        return protect_last(scores, window)
