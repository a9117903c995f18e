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
    queries: Tensor,
    keys: Tensor,
    scaling: float,
    valid: Tensor,
    softcap: float | None = None,
    sliding_window: int | None = None,
    chunk: int = 128,
) -> Tensor:
    """(B, Hkv, T) fp32: attention each key receives summed over all T causal queries and the GQA group.

    With `sliding_window`, query i sees only keys j > i - sliding_window (as the sliding layer itself attended).
    Computed in chunks of query rows against only the keys they can see (causality halves the work, a window cuts
    it to the window), so at most B x Hq x chunk x T logits exist at once (never T x T per head). Each chunk's
    logits are exponentiated in place and summed over rows by one matmul with the rows' 1 / normaliser (no softmax
    copy, no division pass): about 3x faster than a plain masked softmax on 2 CPU cores, which matters because
    H2O's scores make up most of the calibration pass's overhead over a plain prefill.
    """
    batch, q_heads, tokens, dim = queries.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    k = keys.float()
    total = torch.zeros(batch, kv_heads, 1, tokens, dtype=torch.float32, device=keys.device)
    padded = not bool(valid.all())
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        rows = stop - start
        first = 0 if sliding_window is None else max(start - sliding_window + 1, 0)  # first key any row sees
        # (B, Hkv, G*rows, D) x (B, Hkv, D, stop - first): each KV head's keys serve its whole query group
        q = queries[:, :, start:stop].float().reshape(batch, kv_heads, groups * rows, dim)
        if softcap is None:
            q = q * scaling
        logits = torch.matmul(q, k[:, :, first:stop].transpose(-1, -2))
        if softcap is not None:
            logits.mul_(scaling / softcap).tanh_().mul_(softcap)
        view = logits.view(batch, kv_heads, groups, rows, stop - first)
        future = torch.ones(rows, rows, dtype=torch.bool, device=keys.device).triu(1)
        view[..., start - first : stop - first].masked_fill_(future, float("-inf"))
        if sliding_window is not None:
            rows_at = torch.arange(start, stop, device=keys.device)[:, None]
            keys_at = torch.arange(first, stop, device=keys.device)[None, :]
            view.masked_fill_(keys_at <= rows_at - sliding_window, float("-inf"))
        if padded:
            view.masked_fill_(~valid[:, None, None, None, first:stop], float("-inf"))
        top = logits.amax(-1, keepdim=True)
        if padded:  # a padding row sees nothing: keep its max finite so it exponentiates to zeros, not nan
            top = top.clamp_min(torch.finfo(torch.float32).min)
        logits.sub_(top).exp_()
        inv = 1.0 / logits.sum(-1, keepdim=True).clamp_min(1e-30)
        if padded:  # padding rows contribute nothing
            inv = inv * valid[:, start:stop].repeat(1, groups)[:, None, :, None]
        total[..., first:stop] += torch.matmul(inv.transpose(-1, -2), logits)
    return total[:, :, 0]
