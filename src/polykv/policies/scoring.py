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
    queries: Tensor, keys: Tensor, scaling: float, valid: Tensor, softcap: float | None = None, chunk: int = 512
) -> Tensor:
    """(B, Hkv, T) fp32: attention each key receives summed over all T causal queries and the GQA group.

    Computed in chunks of query rows against only the keys they can see (causality halves the work), so at most
    B x Hq x chunk x T logits exist at once (never T x T per head).
    """
    batch, q_heads, tokens, dim = queries.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    k = keys.float()
    total = torch.zeros(batch, kv_heads, tokens, dtype=torch.float32, device=keys.device)
    padded = not bool(valid.all())
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        rows = stop - start
        # (B, Hkv, G*rows, D) x (B, Hkv, D, stop): each KV head's keys serve its whole query group
        q = queries[:, :, start:stop].float().reshape(batch, kv_heads, groups * rows, dim)
        logits = torch.matmul(q, k[:, :, :stop].transpose(-1, -2)) * scaling
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.view(batch, kv_heads, groups, rows, stop)
        causal = torch.ones(rows, stop, dtype=torch.bool, device=keys.device).tril(diagonal=start)
        allowed = causal[None, None, None]
        if padded:
            allowed = allowed & valid[:, None, None, None, :stop]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        if padded:  # padding rows see nothing (softmax of all -inf is nan): drop them
            probs = torch.nan_to_num(probs, nan=0.0) * valid[:, None, None, start:stop, None]
        total[:, :, :stop] += probs.sum(dim=(2, 3))
    return total
