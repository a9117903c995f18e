"""Layer-level attention statistics: the signals that say which eviction policy suits a layer.

Per layer and KV head, from the observation window's attention (A_w) and the answer tokens' attention (A_a) over
the prompt, each normalised to sum to 1:
- `stat_entropy`: entropy of A_w divided by log(T) (1 = uniform, 0 = one token);
- `stat_sink_mass`: A_w mass on the first 4 tokens; `stat_recent_mass`: on the last 64;
- `stat_topk_mass@k`: A_w mass on its k largest tokens (k = 16, 64, 256): concentration;
- `stat_answer_overlap@k`: |topk(A_w) & topk(A_a)| / k (k = 16, 64): how well the window predicts what the answer
  will read, i.e. whether query-aware scoring can work for this layer.
"""

from __future__ import annotations

import math

import torch

from polykv.calibrate.sample import PreparedSample
from polykv.calibrate.sensitivity import answer_attention
from polykv.policies.scoring import window_attention

TOPK = (16, 64, 256)
OVERLAP = (16, 64)


def layer_statistics(sample: PreparedSample, layer: int, window: int = 32) -> list[tuple[int, str, float]]:
    """(kv head, metric, value) rows for one layer."""
    obs = sample.capture.observation(layer)
    tokens = obs.num_tokens
    a_w = window_attention(obs, window)[0]
    a_w = a_w / a_w.sum(-1, keepdim=True).clamp_min(1e-30)
    probs, _, _ = answer_attention(sample, layer)
    groups = probs.shape[0] // obs.keys.shape[1]
    a_a = probs[..., :tokens].sum(1).view(obs.keys.shape[1], groups, tokens).sum(1)
    a_a = a_a / a_a.sum(-1, keepdim=True).clamp_min(1e-30)
    rows = []
    for h in range(a_w.shape[0]):
        p = a_w[h]
        entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum() / math.log(max(tokens, 2)))
        rows.append((h, "stat_entropy", entropy))
        rows.append((h, "stat_sink_mass", float(p[:4].sum())))
        rows.append((h, "stat_recent_mass", float(p[-64:].sum())))
        for k in TOPK:
            rows.append((h, f"stat_topk_mass@{k}", float(p.topk(min(k, tokens)).values.sum())))
        for k in OVERLAP:
            n = min(k, tokens)
            top_w = set(p.topk(n).indices.tolist())
            top_a = set(a_a[h].topk(n).indices.tolist())
            rows.append((h, f"stat_answer_overlap@{k}", len(top_w & top_a) / n))
    return rows
