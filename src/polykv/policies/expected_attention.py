"""`expected_attention`: score keys by the attention that future queries are expected to give them.

Following Expected Attention (kvpress), the real (non-padding) queries of the observation window are summarised per
query head by a Gaussian with mean mu and diagonal population variance var. A future query q drawn from it gives key k
the logit s q.k, whose exponential has expectation exp(s mu.k + s^2 / 2 sum(var k^2)) (the Gaussian's moment
generating function). A softmax of these expected logits over the row's real keys is each query head's expected
attention; it is summed over the GQA group and weighted by the value norm |v_k|, since a token's contribution to the
output scales with its value. RoPE is not extrapolated to future positions; the window is kept (unless
`keep_window` is False), as in SnapKV.
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
        mean, var = query_gaussian(queries, obs.valid[:, -queries.shape[2] :])
        mean = mean.view(batch, kv_heads, obs.groups, dim)
        var = var.view(batch, kv_heads, obs.groups, dim)
        keys = obs.keys.float()
        s = obs.scaling
        logits = s * torch.einsum("bhgd,bhtd->bhgt", mean, keys)
        logits = logits + 0.5 * s * s * torch.einsum("bhgd,bhtd->bhgt", var, keys * keys)
        logits = logits.masked_fill(~obs.valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(dim=2)
        scores = probs * obs.values.float().norm(dim=-1)
        return protect_last(scores, min(self.window, tokens)) if self.keep_window else scores


def query_gaussian(queries: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance (B, Hq, D) of the window queries (B, Hq, W, D) over the real positions (B, W).

    Left padding inside the window (a row shorter than the window) is left out: its queries are no prompt's.
    """
    if bool(real.all()):
        return queries.mean(dim=2), queries.var(dim=2, unbiased=False)
    weight = real.to(queries.dtype)[:, None, :, None]
    count = weight.sum(dim=2).clamp_min(1.0)
    mean = (queries * weight).sum(dim=2) / count
    var = ((queries - mean[:, :, None]) ** 2 * weight).sum(dim=2) / count
    return mean, var
