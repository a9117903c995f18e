"""Attention-derived token scores shared by several policies (torch path; kernels may replace the heavy part)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polykv.policies.base import LayerObservation


def window_attention(obs: LayerObservation, window: int) -> Tensor:
    """(B, Hkv, T) fp32: softmax attention of the last `window` prompt queries, summed over them and the GQA group.

    Window query i sits at column T - window + i and sees keys up to its own column (causal); padding is excluded.
    """
    from polykv.kernels import window_scores

    window = min(window, obs.window_queries.shape[2], obs.num_tokens)
    key = ("window_attention", window)
    if key not in obs.memo:
        queries = obs.window_queries[:, :, -window:, :]
        obs.memo[key] = window_scores(queries, obs.keys, obs.scaling, valid=obs.valid, softcap=obs.softcap)
    return obs.memo[key].clone()


def pool1d(scores: Tensor, kernel: int, mode: str) -> Tensor:
    """Smooth scores along the sequence (SnapKV's clustering step); odd kernels keep the length."""
    if kernel <= 1:
        return scores
    batch, heads, tokens = scores.shape
    flat = scores.reshape(batch * heads, 1, tokens)
    pad = kernel // 2
    if mode == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=pad)
    elif mode == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"unknown pooling {mode!r}: use 'avg' or 'max'")
    return out[..., :tokens].reshape(batch, heads, tokens)


def cumulative_attention(
    queries: Tensor, keys: Tensor, scaling: float, valid: Tensor, softcap: float | None = None, chunk: int = 256
) -> Tensor:
    """(B, Hkv, T) fp32: attention each key receives summed over all T causal queries and the GQA group.

    Computed in chunks of query rows, so at most B x Hq x chunk x T logits exist at once (never T x T per head).
    """
    batch, q_heads, tokens, _ = queries.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    keys_rep = keys.float().repeat_interleave(groups, dim=1)
    total = torch.zeros(batch, q_heads, tokens, dtype=torch.float32, device=keys.device)
    cols = torch.arange(tokens, device=keys.device)
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        logits = torch.matmul(queries[:, :, start:stop].float(), keys_rep.transpose(-1, -2)) * scaling
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        allowed = (cols[None, :] <= cols[start:stop, None])[None, None] & valid[:, None, None, :]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        # rows that are padding see nothing: softmax of all -inf is nan, drop them
        probs = torch.nan_to_num(probs, nan=0.0) * valid[:, None, start:stop, None]
        total += probs.sum(dim=2)
    return total.view(batch, kv_heads, groups, tokens).sum(dim=2)
