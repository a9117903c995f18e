"""Decode many compressions of one prompt together without copying its keys and values: a shared-prefix batch.

Every configuration the eval engine scores on an instance keeps a subset of the same captured prefill cache. A
stacked batch (`cache.stack`) copies each row's kept keys and values and pads them to the batch's widest layer, so
a decode step reads rows x width bytes per layer. Here the prefix is stored once, (Hkv, T, D) per layer, and each
row is only a mask of the columns it kept plus its own newly decoded tokens. One attention call multiplies every
row's queries against the shared keys in a single matmul (each prefix key is read once per step, not once per
row), masks each row to its kept columns, and adds the row's own new tokens. In exact arithmetic this is the
compressed row's attention; in floating point the sums differ by rounding (the engine's `--verify-prefill` checks
that predictions equal compression during prefill).

`shared_batch` builds the cache from a `Capture`'s full cache and compressed single-row caches of it;
`polykv.attention` routes layers whose cache is a `SharedPrefixCache` to `shared_prefix_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polykv.cache import PolyKVCache, SeenColumnsLayer, append_tokens


class SharedPrefixLayer(SeenColumnsLayer):
    """One layer: the shared prefix (Hkv, T, D), each row's kept-column bias (B, Hkv, T), each row's new tokens."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, bias: Tensor, sliding_window: int | None, slack: int):
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values
        self.bias = bias  # 0 where the row kept the column, -inf where it evicted it
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.prefix_len = keys.shape[1]
        batch, heads = bias.shape[:2]
        self._key_buf = keys.new_empty(batch, heads, slack, keys.shape[2])
        self._value_buf = values.new_empty(batch, heads, slack, values.shape[2])
        self.new = 0
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = self._key_buf[:, :, :0], self._value_buf[:, :, :0]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # built initialised
        pass

    @property
    def seen(self) -> int:
        return self.prefix_len + self.new

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the rows' new tokens; returns only the new-token part (the prefix is read from the layer)."""
        self._key_buf, self.keys = append_tokens(self._key_buf, self.keys, key_states)
        self._value_buf, self.values = append_tokens(self._value_buf, self.values, value_states)
        self.new += key_states.shape[2]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep/reorder rows: the masks and new tokens move, the shared prefix does not."""
        idx = beam_idx.to(self.bias.device)
        self.bias = self.bias.index_select(0, idx)
        self._key_buf = self._key_buf.index_select(0, idx)
        self._value_buf = self._value_buf.index_select(0, idx)
        self.keys, self.values = self._key_buf[:, :, : self.new], self._value_buf[:, :, : self.new]


class SharedPrefixCache(PolyKVCache):
    """A batch of compressed caches of one prompt, stored as one prefix plus per-row masks (see the module doc)."""

    def track_padding(self, attention_mask: Tensor | None, new_tokens: int, batch: int, device) -> None:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a shared-prefix batch has no padding; decode it without a padded attention mask")


def shareable(full: PolyKVCache) -> bool:
    """Whether `full` (a capture's cache) can be a shared prefix: one unpadded row, every column stored in order."""
    if full.column_valid is not None:
        return False
    for layer in full.layers:
        if layer.keys is None or layer.keys.shape[0] != 1 or layer.compressed or layer.entry_valid is not None:
            return False
        cols = layer.columns[0]
        if not bool((cols == torch.arange(layer.seen, device=cols.device, dtype=cols.dtype)).all()):
            return False
    return True


def has_sinks(model) -> bool:
    """Whether any attention module has learned attention sinks (gpt-oss's `sinks`, passed as `s_aux`), which the
    shared-prefix attention does not implement: such models decode from stacked copies instead."""
    return any(getattr(m, "sinks", None) is not None for m in model.modules())


def shared_batch(full: PolyKVCache, rows: list[PolyKVCache], slack: int) -> SharedPrefixCache:
    """One batch of `rows` (single-row compressions of `full`, e.g. from `Capture.compress`) over `full`'s prefix."""
    kept = []
    for r, cache in enumerate(rows):
        per_layer = []
        for idx, (layer, src) in enumerate(zip(cache.layers, full.layers, strict=True)):
            if layer.quantized is not None:
                raise ValueError(f"row {r} layer {idx} is quantized; a shared prefix holds full-precision keys only")
            if layer.seen != src.seen:
                raise ValueError(f"row {r} layer {idx} has seen {layer.seen} columns, the prefix {src.seen}")
            per_layer.append((layer.columns[0], None if layer.entry_valid is None else layer.entry_valid[0]))
        kept.append(per_layer)
    return from_kept(full, kept, slack)


Kept = tuple[Tensor, Tensor | None] | Tensor | None


def from_kept(full: PolyKVCache, kept: list[list[Kept]], slack: int) -> SharedPrefixCache:
    """A batch over `full`'s prefix where row r keeps, in layer l, `kept[r][l]`.

    Each entry is None (the whole layer), the kept columns (Hkv, K), or (columns, validity) with validity (Hkv, K)
    marking real entries (as `PolyKVLayer.entry_valid`). `slack`: room for that many new tokens before regrowing.
    """
    if not shareable(full):
        raise ValueError("the cache is not a single unpadded full prefill; use polykv.cache.stack")
    layers = []
    for idx, src in enumerate(full.layers):
        keys, values = src.keys[0], src.values[0]
        heads, length = keys.shape[0], keys.shape[1]
        visible = torch.zeros(len(kept), heads, length, dtype=torch.bool, device=keys.device)
        for r, row in enumerate(kept):
            entry = row[idx]
            if entry is None:
                visible[r] = True
                continue
            cols, valid = entry if isinstance(entry, tuple) else (entry, None)
            visible[r].scatter_(-1, cols.long(), True if valid is None else valid)
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=keys.device).masked_fill_(~visible, float("-inf"))
        layers.append(SharedPrefixLayer(keys, values, bias, src.sliding_window, slack))
    return SharedPrefixCache(layers)


def shared_prefix_attention(
    layer: SharedPrefixLayer, query: Tensor, scaling: float, softcap: float | None = None
) -> Tensor:
    """(B, q, Hq, Dv) like transformers' sdpa path: `query` (B, Hq, q, D) for the layer's last q columns.

    Query i sits at column seen - q + i. It sees the prefix columns its row kept (all prefix columns precede it)
    and the row's new tokens up to itself; sliding-window layers also drop columns >= window behind it.
    Queries and keys are upcast to fp32 for the logits, softmax and the weighted sum of values are fp32 (as in
    `kernels.reference.decode_attention`), and only the output is cast back to the query's dtype: 16-bit logits
    would round a large shared offset (e.g. 900 +- 2) by more than the differences that decide the softmax.
    """
    batch, q_heads, q_len, dim = query.shape
    k_pre, v_pre = layer.prefix_keys, layer.prefix_values  # (Hkv, T, D)
    kv_heads, length = k_pre.shape[0], k_pre.shape[1]
    groups = q_heads // kv_heads
    q_cols = torch.arange(layer.seen - q_len, layer.seen, device=query.device)
    # prefix: (Hkv, B*G*q, D) @ (Hkv, D, T): every prefix key read once for all rows
    q32 = query.float().reshape(batch, kv_heads, groups * q_len, dim)
    qh = q32.transpose(0, 1).reshape(kv_heads, -1, dim)
    pre = torch.matmul(qh, k_pre.float().transpose(1, 2)).view(kv_heads, batch, groups * q_len, length)
    pre = pre.transpose(0, 1) * scaling  # (B, Hkv, G*q, T)
    if softcap:
        pre = softcap * torch.tanh(pre / softcap)
    pre = pre + layer.bias[:, :, None, :]
    # the rows' own new tokens: (B, Hkv, G*q, D) @ (B, Hkv, D, S), causal
    k_new, v_new = layer.keys, layer.values
    new_cols = torch.arange(layer.prefix_len, layer.seen, device=query.device)
    own = torch.matmul(q32, k_new.float().transpose(2, 3)) * scaling
    if softcap:
        own = softcap * torch.tanh(own / softcap)
    hidden = new_cols[None, :] > q_cols[:, None]  # (q, S)
    if layer.sliding_window is not None:
        hidden = hidden | (q_cols[:, None] - new_cols[None, :] >= layer.sliding_window)
        far = q_cols[:, None] - torch.arange(length, device=query.device)[None, :] >= layer.sliding_window
        pre = pre.view(batch, kv_heads, groups, q_len, length).masked_fill(far, float("-inf"))
        pre = pre.view(batch, kv_heads, groups * q_len, length)
    own = own.view(batch, kv_heads, groups, q_len, -1).masked_fill(hidden, float("-inf"))
    own = own.view(batch, kv_heads, groups * q_len, -1)
    probs = torch.softmax(torch.cat([pre, own], dim=-1), dim=-1)
    p_pre, p_own = probs[..., :length], probs[..., length:]
    out = torch.matmul(p_pre.transpose(0, 1).reshape(kv_heads, -1, length), v_pre.float())  # (Hkv, B*G*q, Dv)
    out = out.view(kv_heads, batch, groups * q_len, -1).transpose(0, 1) + torch.matmul(p_own, v_new.float())
    # (B, Hkv, G, q, Dv) -> (B, q, Hq, Dv)
    out = out.reshape(batch, kv_heads, groups, q_len, -1).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, q_heads, -1).to(query.dtype)
