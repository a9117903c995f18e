"""`expected_attention`: score keys by the attention that future queries are expected to give them.

Following the idea of Expected Attention (kvpress), the queries of the observation window are summarised per head by
a Gaussian (mean and diagonal variance); the expected unnormalised attention of key k is then
exp(s * mu.k + s^2 / 2 * sum(var * k^2)) (the moment generating function of a Gaussian), summed over the GQA group
and weighted by the value norm, since a token's contribution to the output scales with its value. This version does
not extrapolate RoPE to future positions; the window is kept, as in SnapKV.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv.policies.base import LayerObservation, Policy, protect_last


@dataclass(frozen=True)
class ExpectedAttention(Policy):
    name = "expected_attention"
    window: int = 32
    keep_window: bool = True

    def queries_needed(self) -> int:
        return self.window

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        batch, kv_heads, tokens, dim = obs.keys.shape
        queries = obs.window_queries[:, :, -self.window :, :].float()
        mean = queries.mean(dim=2).view(batch, kv_heads, obs.groups, dim)
        var = queries.var(dim=2, unbiased=False).view(batch, kv_heads, obs.groups, dim)
        keys = obs.keys.float()
        s = obs.scaling
        logits = s * torch.einsum("bhgd,bhtd->bhgt", mean, keys)
        logits = logits + 0.5 * s * s * torch.einsum("bhgd,bhtd->bhgt", var, keys * keys)
        logits = logits.masked_fill(~obs.valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(dim=2)
        scores = probs * obs.values.float().norm(dim=-1)
        return protect_last(scores, min(self.window, tokens)) if self.keep_window else scores
