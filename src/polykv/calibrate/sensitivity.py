"""Sensitivity of each layer to each (policy, budget, bits): the loss when only that layer is compressed that way.

- proxy: relative error of the layer's attention output for the answer-token queries (teacher-forced under the full
  cache) when its prompt KV is reduced to the kept set, plus the share of attention mass the kept set holds. Pure
  tensor work on the captured K, V, Q: nothing is re-run.
- e2e: the rise in answer NLL (and KL to the full-cache next-token distributions) when only that layer is
  compressed, by teacher-forcing the answer chunk over a cache where that one layer is compressed; the prefill is
  reused, and the options of one layer run as one batch (ragged kept sets padded with masked entries).
Options whose kept sets are identical (e.g. `full` and any budget >= context) are computed once and shared.

An option below 16 bits (KV precision) reads its kept keys and values as the quantised storage would hand them to
attention: quantised then dequantised (`polykv.quantize.round_trip`), keys per channel and values per token over the
kept tokens in order, as `PolyKVLayer.keep` stores them. The answer tokens stay at the model's dtype, as decoded
tokens do in the storage until a group of them fills (an answer shorter than `polykv.precision.GROUP` tokens is
measured exactly as a quantised cache would serve it).

`window` options (engine sliding-window attention, `policies.window`) are measured from the same full prefill: the
layer keeps its sinks and window, and in e2e the answer tokens attend through the sliding window and the sinks
exactly as an engine's decode does. What is approximated is the prefill of that one layer, which an engine windows
too: the prompt tokens' own attention there, and so the prompt keys and values of every later layer, are the
full-attention ones. The proxy also scores the kept set as if it did not slide along the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polykv.attention import polykv_attention
from polykv.cache import NO_WINDOW, PolyKVCache, dequantized, stack
from polykv.calibrate.sample import PreparedSample
from polykv.capture import clone_layer
from polykv.compat import with_cache
from polykv.precision import FULL_PRECISION
from polykv.quantize import KEY_AXIS, VALUE_AXIS, round_trip
from polykv.settings import LayerSetting


@dataclass(frozen=True)
class Option:
    policy: str
    budget: int
    setting: LayerSetting

    @property
    def bits(self) -> int:
        return self.setting.bits


def kept_sets(
    sample: PreparedSample, layer: int, options: list[Option]
) -> tuple[list[Tensor], list[int], list[tuple[int, int] | None], list[int]]:
    """Unique kept-index tensors (1, Hkv, K) for this layer, per option which unique set it maps to, the span
    (window, sinks) each unique set attends through afterwards (None: it keeps what it kept), and the bits it is
    stored at."""
    obs = sample.capture.observation(layer)
    unique: list[Tensor] = []
    spans: list[tuple[int, int] | None] = []
    widths: list[int] = []
    keys: dict[bytes, int] = {}
    which = []
    for opt in options:
        idx = opt.setting.kept_indices(obs)
        span = opt.setting.span
        key = bytes(f"{tuple(idx.shape)}{span}{opt.bits}", "ascii") + idx.cpu().numpy().tobytes()
        if key not in keys:
            keys[key] = len(unique)
            unique.append(idx)
            spans.append(span)
            widths.append(opt.bits)
        which.append(keys[key])
    return unique, which, spans, widths


def answer_attention(sample: PreparedSample, layer: int) -> tuple[Tensor, Tensor, int]:
    """Full-cache attention probabilities (Hq, m, T+m) of the answer queries, and the values repeated per head."""
    obs = sample.capture.observation(layer)
    q = sample.answer_queries[layer][0].float()
    keys, values = sample.answer_keys[layer]
    groups = q.shape[0] // keys.shape[1]
    k = keys[0].float().repeat_interleave(groups, dim=0)
    v = values[0].float().repeat_interleave(groups, dim=0)
    tokens, m = obs.num_tokens, q.shape[1]
    logits = torch.matmul(q, k.transpose(-1, -2)) * obs.scaling
    if obs.softcap is not None:
        logits = obs.softcap * torch.tanh(logits / obs.softcap)
    cols = torch.arange(tokens + m, device=q.device)
    qcols = torch.arange(tokens, tokens + m, device=q.device)[:, None]
    allowed = cols[None, :] <= qcols
    window = sample.capture.cache.layers[layer].sliding_window
    if window is not None:
        allowed &= qcols - cols[None, :] < window
    prompt_valid = torch.cat([obs.valid[0], torch.ones(m, dtype=torch.bool, device=q.device)])
    allowed &= prompt_valid[None, :]
    probs = torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), dim=-1)
    return probs, v, tokens


def proxy_losses(sample: PreparedSample, layer: int, options: list[Option]) -> list[tuple[float, float]]:
    """(relative output error, kept attention mass) per option for this layer.

    Only kept columns are touched: each kept set gathers its K prompt columns of the answer queries' attention and
    values (cost grows with the budget, not the context), and sets of the same size run as one batch. The answer
    tokens themselves are never evicted, so their share of each query's output is computed once. A set below 16
    bits reweighs its columns' probabilities by the change of their logits and reads its values as stored
    (`_as_stored`).
    """
    probs, v, tokens = answer_attention(sample, layer)
    full_out = torch.matmul(probs, v)
    full_norm = full_out.norm().clamp_min(1e-12)
    p_prompt, v_prompt = probs[..., :tokens], v[:, :tokens]
    prompt_mass = p_prompt.sum().clamp_min(1e-12)
    answer_num = torch.matmul(probs[..., tokens:], v[:, tokens:])  # (Hq, m, D)
    answer_den = probs[..., tokens:].sum(-1, keepdim=True)
    q_heads, m, _ = probs.shape
    dim = v.shape[-1]
    groups = q_heads // sample.capture.observation(layer).keys.shape[1]
    unique, which, _, widths = kept_sets(sample, layer, options)
    by_size: dict[int, list[int]] = {}
    for i, idx in enumerate(unique):
        by_size.setdefault(idx.shape[-1], []).append(i)
    results: list[tuple[float, float]] = [(0.0, 0.0)] * len(unique)
    for size, members in by_size.items():
        idx = torch.stack([unique[i][0] for i in members]).repeat_interleave(groups, dim=1)  # (U, Hq, K)
        n = len(members)
        p = p_prompt[None].expand(n, -1, -1, -1).gather(3, idx[:, :, None, :].expand(n, q_heads, m, size))
        vk = v_prompt[None].expand(n, -1, -1, -1).gather(2, idx[..., None].expand(n, q_heads, size, dim))
        for row, i in enumerate(members):
            if widths[i] != FULL_PRECISION:
                factor, vk[row] = _as_stored(sample, layer, unique[i], widths[i])
                p[row] = p[row] * factor
        out = (torch.matmul(p, vk) + answer_num) / (p.sum(-1, keepdim=True) + answer_den).clamp_min(1e-30)
        err = (out - full_out[None]).flatten(1).norm(dim=1) / full_norm
        mass = p.flatten(1).sum(1) / prompt_mass
        for i, e, k in zip(members, err.tolist(), mass.tolist(), strict=False):
            results[i] = (e, k)
    return [results[w] for w in which]


def _as_stored(sample: PreparedSample, layer: int, idx: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """For the kept set `idx` (1, Hkv, K) stored at `bits`: the factor (Hq, m, K) by which each kept column's
    full-cache attention probability changes once its key is read dequantized (exp of the logit change), and its
    values as read (Hq, K, Dv), fp32."""
    obs = sample.capture.observation(layer)
    keys, values = (t[:, :, : obs.num_tokens] for t in sample.answer_keys[layer])
    k = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
    v = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
    q = sample.answer_queries[layer][0].float()
    groups = q.shape[0] // k.shape[1]

    def logits(key: Tensor) -> Tensor:
        out = torch.matmul(q, key[0].float().repeat_interleave(groups, dim=0).transpose(-1, -2)) * obs.scaling
        return out if obs.softcap is None else obs.softcap * torch.tanh(out / obs.softcap)

    factor = torch.exp(logits(round_trip(k, bits, KEY_AXIS)) - logits(k))
    return factor, round_trip(v, bits, VALUE_AXIS)[0].float().repeat_interleave(groups, dim=0)


def _batched_cache(
    sample: PreparedSample,
    layer: int,
    sets: list[Tensor],
    spans: list[tuple[int, int] | None] | None = None,
    widths: list[int] | None = None,
) -> PolyKVCache:
    """A cache of len(sets) rows: every layer full (shared, expanded) except `layer`, compressed per row (and
    windowed per row where `spans` gives a row's (window, sinks); read at a row's `widths` bits, `_read_at`)."""
    rows = len(sets)
    layers = []
    for i, src in enumerate(sample.capture.cache.layers):
        dst = clone_layer(src)
        if i == layer:
            width = max(s.shape[-1] for s in sets)
            idx = torch.zeros(rows, src.keys.shape[1], width, dtype=torch.long, device=src.keys.device)
            valid = torch.zeros(rows, src.keys.shape[1], width, dtype=torch.bool, device=src.keys.device)
            for r, s in enumerate(sets):
                idx[r, :, : s.shape[-1]] = s[0]
                valid[r, :, : s.shape[-1]] = True
            dst.keys, dst.values, dst.columns = (
                t.expand(rows, *t.shape[1:]) for t in (src.keys, src.values, src.columns)
            )
            dst.keep(idx, entry_valid=valid)
            if widths is not None and any(w != FULL_PRECISION for w in widths):
                _read_at(dst, [s.shape[-1] for s in sets], widths)
            if spans is not None and any(spans):
                _set_row_spans(dst, spans, sample.capture.cache.column_valid)
        else:
            dst.keys, dst.values, dst.columns = (
                t.expand(rows, *t.shape[1:]) for t in (src.keys, src.values, src.columns)
            )
        layers.append(dst)
    return PolyKVCache(layers)


def _read_at(layer, kept: list[int], widths: list[int]) -> None:
    """Replace each row's first `kept[r]` keys and values by what attention reads once they are stored at
    `widths[r]` bits (`round_trip`, over that row's kept tokens alone, as a one-row cache stores them)."""
    keys, values = layer.keys.clone(), layer.values.clone()
    for row, (n, bits) in enumerate(zip(kept, widths, strict=True)):
        if bits != FULL_PRECISION:
            keys[row : row + 1, :, :n] = round_trip(keys[row : row + 1, :, :n], bits, KEY_AXIS)
            values[row : row + 1, :, :n] = round_trip(values[row : row + 1, :, :n], bits, VALUE_AXIS)
    layer.keys, layer.values = keys, values


def _set_row_spans(layer, spans: list[tuple[int, int] | None], column_valid: Tensor | None) -> None:
    """Give each row of a one-prompt batch its own window and sinks (rows without a span keep the layer's own)."""
    first = 0 if column_valid is None else int(column_valid[0].to(torch.int32).argmax())
    native = layer.sliding_window
    windows, ends = [], []
    for span in spans:
        if span is None:
            windows.append(native or NO_WINDOW)
            ends.append(0)
        else:
            windows.append(span[0] if native is None else min(span[0], native))
            ends.append(first + span[1])
    device = layer.keys.device
    layer.row_window = torch.tensor(windows, dtype=torch.long, device=device)
    layer.sink_end = torch.tensor(ends, dtype=torch.long, device=device)


def answer_losses(sample: PreparedSample, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of (rows, m, V) teacher-forced answer logits: mean NLL of the targets, mean KL(full || row)."""
    lp = torch.log_softmax(logits, dim=-1)
    nll = -lp.gather(-1, sample.targets.expand(len(lp), -1)[..., None])[..., 0].mean(-1)
    full_lp = sample.full_logprobs
    kl = (full_lp.exp()[None] * (full_lp[None] - lp)).sum(-1).mean(-1)
    return nll, kl


@torch.no_grad()
def e2e_losses(
    model: nn.Module, sample: PreparedSample, layer: int, options: list[Option], batch: int = 8
) -> list[tuple[float, float]]:
    """(NLL rise, KL to full) per option when only `layer` is compressed, in batches of `batch` kept sets."""
    unique, which, spans, widths = kept_sets(sample, layer, options)
    results: list[tuple[float, float]] = []
    with polykv_attention(model):
        for start in range(0, len(unique), batch):
            sets = unique[start : start + batch]
            cache = _batched_cache(sample, layer, sets, spans[start : start + batch], widths[start : start + batch])
            inputs = sample.answer_in.expand(len(sets), -1)
            logits = model(input_ids=inputs, **with_cache(model, cache), use_cache=True).logits.float()
            nll, kl = answer_losses(sample, logits)
            results.extend((float(n) - sample.full_nll, float(k)) for n, k in zip(nll, kl, strict=False))
    return [results[w] for w in which]


@torch.no_grad()
def uniform_losses(model: nn.Module, sample: PreparedSample, options: list[Option], batch: int = 8) -> list[float]:
    """KL to full per answer token when EVERY layer is compressed with one option (the uniform configuration).

    These whole-model anchors tell `solve` how per-layer losses (each measured with one layer compressed) add up
    when all layers are compressed at once, per policy, budget and bits (metric `proxy_anchored`). An option below
    16 bits compresses with real quantised storage, whose layers are then read back dequantized
    (`polykv.cache.dequantized`) so that the options stack into one batch.
    """
    layers = sample.capture.num_layers
    results: list[float] = []
    with polykv_attention(model):
        for start in range(0, len(options), batch):
            group = options[start : start + batch]
            cache = stack([dequantized(sample.capture.compress([o.setting] * layers)) for o in group])
            inputs = sample.answer_in.expand(len(group), -1)
            logits = model(input_ids=inputs, **with_cache(model, cache), use_cache=True).logits.float()
            results.extend(float(k) for k in answer_losses(sample, logits)[1])
    return results
