"""The ragged per-layer compressed KV cache, on transformers' `Cache` interface.

Each layer stores only the tokens it kept, with the sequence column each came from (RoPE is already applied to the
keys, so a kept key needs nothing else), so layers may hold different numbers of tokens and each KV head its own
set. Because the layers are ragged, the single attention mask that transformers builds for all layers cannot be
right for every layer; `polykv.attention` builds each layer's mask from the columns stored here instead:
key j is visible to query column c iff its column is <= c, the column is not padding, the entry is real (not filler
in a ragged batch) and, for sliding-window layers, c - column < window. A sliding layer also drops, after each
forward, the tokens no later query can attend to (`polykv.sliding`), so it never holds more than window - 1.

A layer whose setting windows the attention itself (`policies.window`: engine semantics) carries a *span*: per
row, a window and the column before which tokens are sinks (the row's first `sinks` real tokens). Its mask is
c - column < window or column a sink, in the prefill too (`polykv.attention`); rows of one batch may have different
spans (a stacked eval batch, a calibration batch of options). It drops what falls behind the window, sinks
excepted, once `SPAN_SLACK` such tokens have gathered (one gather, instead of a copy per decoded token).

A layer with `bits` < 16 (KV precision; 16 = the model's dtype) stores what it kept at compression quantized
(`polykv.quantized_tokens`: keys per channel, values per token, KIVI); `keys`/`values` then hold only the residual,
the tokens decoded since the last full group of `group`, in the model's dtype, and attention reads every token
dequantized followed by the residual (`stored()`), so every attention path works unchanged. Its `columns` (and
`entry_valid`) still cover every stored token, quantized ones first.

`get_seq_length()` is the logical length (columns seen), so new tokens get the right positions and the caller's
2-D attention mask keeps its usual meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from polykv.precision import GROUP
from polykv.quantized_tokens import QuantizedTokens
from polykv.sliding import reach

#: out-of-window tokens a spanned layer lets gather before it drops them
SPAN_SLACK = 64
#: the window of a row that has none in a spanned layer (a column distance no sequence reaches)
NO_WINDOW = 2**62


def append_tokens(buffer: Tensor | None, stored: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """`stored` followed by `new` along the sequence (dim 2): (the buffer holding them, a view of its filled part).

    Decoding appends a token per step; copying the whole cache each time would cost O(length) per token. So entries
    live in a buffer with slack: when `stored` is a slice of `buffer` along the sequence (a sliding layer's view
    moves forward as it drops old tokens) and the buffer has room after it, `new` is written in place; otherwise a
    fresh buffer of the filled size plus max(64, 1/8 of it) is allocated and `stored` copied to its start. A tensor
    set from elsewhere (compression, stacking) is thus never written through, so buffers are never shared between
    layers, and writes only ever go past the end of the view.
    """
    n, m = stored.shape[2], new.shape[2]
    start = _slice_start(buffer, stored)
    if start is None or start + n + m > buffer.shape[2]:
        shape = list(stored.shape)
        shape[2] = n + m + max(64, (n + m) // 8)
        buffer, start = stored.new_empty(shape), 0
        buffer[:, :, :n] = stored
    buffer[:, :, start + n : start + n + m] = new
    return buffer, buffer[:, :, start : start + n + m]


def _slice_start(buffer: Tensor | None, view: Tensor) -> int | None:
    """Where `view` starts along dim 2 of `buffer` when it is `buffer[:, :, s : s + n]`, else None."""
    if (
        buffer is None
        or buffer.shape[:2] != view.shape[:2]
        or buffer.shape[3:] != view.shape[3:]
        or buffer.dtype != view.dtype
        or view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        or (view.shape[2] > 0 and view.stride() != buffer.stride())
    ):
        return None
    start, rest = divmod(view.storage_offset() - buffer.storage_offset(), buffer.stride(2))
    return start if rest == 0 and 0 <= start and start + view.shape[2] <= buffer.shape[2] else None


class SeenColumnsLayer(CacheLayerMixin):
    """A transformers cache layer whose positions and mask sizes follow `seen` (every column the model has been fed,
    kept or not), however few entries it holds: eviction must not shift positions."""

    seen: int

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class PolyKVLayer(SeenColumnsLayer):
    """One layer's kept keys/values (B, Hkv, N, D) with their columns (B, Hkv, N) and optional entry validity."""

    is_compileable = False
    is_croppable = False

    def __init__(self, sliding_window: int | None = None):
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.columns: Tensor | None = None
        self.entry_valid: Tensor | None = None
        self.seen = 0
        self.uniform_heads = True
        self.fresh = False
        self.compressed = False
        self._buffers: dict[str, Tensor] = {}
        #: a column that some row/head's first entry is at or after (None: unknown), so `drop_unreachable` can
        #: skip reading the columns back while nothing can be dropped
        self._front: int | None = None
        #: every row and head holds exactly the real columns _front .. seen - 1 (a plain sliding layer), so
        #: `drop_unreachable` knows what to drop without reading the columns back
        self._dense = False
        #: (window, sinks) the layer's setting imposes on its attention, before its rows are known (`start_span`)
        self.span: tuple[int, int] | None = None
        #: per row (B,): the window of a spanned layer, and the column below which the row's tokens are sinks
        self.row_window: Tensor | None = None
        self.sink_end: Tensor | None = None
        #: KV precision of what compression keeps (16: the model's dtype, unquantized), and its group size
        self.bits = 16
        self.group = GROUP
        #: the quantized tokens (the oldest ones) of a layer with bits < 16 once compressed, else None
        self.quantized: QuantizedTokens | None = None

    def start_span(self, batch: int, column_valid: Tensor | None, device) -> None:
        """Turn `span` into per-row tensors for a batch of `batch` rows (`column_valid` (B, T) marks left padding:
        a row's sinks are its first real tokens). The window never exceeds the layer's own sliding window."""
        window, sinks = self.span
        if self.sliding_window is not None:
            window = min(window, self.sliding_window)
        self.row_window = torch.full((batch,), window, dtype=torch.long, device=device)
        first = torch.zeros(batch, dtype=torch.long, device=device)
        if column_valid is not None and sinks:
            first = column_valid.to(device=device, dtype=torch.int32).argmax(1).long()
        self.sink_end = first + sinks

    def row_spans(self, batch: int) -> tuple[Tensor, Tensor]:
        """(row_window, sink_end) of every row; rows without a span get the layer's own window and no sinks."""
        if self.row_window is not None:
            return self.row_window, self.sink_end
        device = self.keys.device if self.keys is not None else None
        window = self.sliding_window or NO_WINDOW
        return (
            torch.full((batch,), window, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append new tokens; returns every stored key/value of this layer (the wrapper masks what is not visible)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, new, _ = key_states.shape
        cols = torch.arange(self.seen, self.seen + new, device=key_states.device, dtype=torch.int32)
        cols = cols.expand(batch, heads, new)
        self.fresh = self.keys is None
        if self.fresh:
            self.keys, self.values, self.columns = key_states, value_states, cols.contiguous()
            self._front, self._dense = self.seen, True
        else:
            self._append("keys", key_states)
            self._append("values", value_states)
            self._append("columns", cols)
            if self.entry_valid is not None:
                self._append("entry_valid", torch.ones(batch, heads, new, dtype=torch.bool, device=key_states.device))
        self.seen += new
        if self.quantized is not None:
            return self._flush_residual()
        return self.keys, self.values

    def _flush_residual(self) -> tuple[Tensor, Tensor]:
        """Quantize the residual's full groups into the store; returns every stored key/value (`stored()`)."""
        full = self.keys.shape[2] - self.keys.shape[2] % self.group
        if full:
            self.quantized = self.quantized.append(self.keys[:, :, :full], self.values[:, :, :full])
            self.keys, self.values = self.keys[:, :, full:], self.values[:, :, full:]
        return self.stored()

    def stored(self) -> tuple[Tensor, Tensor]:
        """Every stored key and value (B, Hkv, N, D) in token order: on a quantized layer, the quantized tokens
        dequantized and then the residual."""
        if self.quantized is None:
            return self.keys, self.values
        return self.quantized.followed_by(self.keys, self.values)

    def _append(self, name: str, new: Tensor) -> None:
        """Append to `self.<name>` in place when it can (`append_tokens`); it stays a view of its buffer."""
        self._buffers[name], view = append_tokens(self._buffers.get(name), getattr(self, name), new)
        setattr(self, name, view)

    def keep(self, indices: Tensor, entry_valid: Tensor | None = None) -> None:
        """Keep only `indices` (B, Hkv, K) of the stored tokens (from `policies.select`); with bits < 16 what is
        kept is then quantized (re-quantized, on a layer already quantized: a spanned layer dropping its oldest)."""
        from polykv.kernels import gather_kv

        if self.quantized is not None:
            self.keys, self.values = self.stored()
            self.quantized = None
        self.keys, self.values = gather_kv(self.keys, self.values, indices)
        self.columns = torch.gather(self.columns, -1, indices)
        if self.entry_valid is not None:
            self.entry_valid = torch.gather(self.entry_valid, -1, indices)
        if entry_valid is not None:
            self.entry_valid = entry_valid if self.entry_valid is None else self.entry_valid & entry_valid
        self.uniform_heads = bool((indices == indices[:, :1]).all())
        self.compressed = True
        self._front, self._dense = None, False
        if self.bits < 16:
            self._quantize_kept()

    def _quantize_kept(self) -> None:
        """Move every stored token into the quantized store; the residual starts empty (and owns no old buffer)."""
        keys, values = self.keys, self.values
        self.quantized = QuantizedTokens(self.bits, self.group).append(keys, values)
        self.keys = keys.new_empty(*keys.shape[:2], 0, keys.shape[3])
        self.values = values.new_empty(*values.shape[:2], 0, values.shape[3])
        self._buffers.pop("keys", None)
        self._buffers.pop("values", None)

    def drop_unreachable(self) -> None:
        """On a sliding layer, drop the stored tokens that no query from column `seen` on can attend to.

        Only a leading run of entries that is out of reach (or filler) in every row and KV head is dropped, so the
        layer stays rectangular; each row's real entries ascend by column, so once heads agree that run is all of
        them, and anything left out of reach is masked by `visible`. The views advance inside their buffers, so
        dropping copies nothing; the columns are read back (one sync) only when something may have left the window
        and the layer is not a plain run of consecutive columns.
        """
        if self.row_window is not None:
            return self._drop_outside_span()
        if self.sliding_window is None or not self.kept_tokens:
            return
        first = self.seen - reach(self.sliding_window)  # the oldest column still reachable
        if self._front is not None and self._front >= first:
            return
        if self._dense:
            self._drop_first(min(first - self._front, self.kept_tokens))
            self._front = first if self.kept_tokens else None
            self._dense = self.kept_tokens > 0
            return
        cols = self.columns
        out = cols < first
        if self.entry_valid is not None:
            out = out | ~self.entry_valid
        runs = out.to(torch.int32).cumprod(-1).sum(-1)  # (B, Hkv) leading out-of-reach entries per row and head
        drop = runs.min()
        after = cols.gather(-1, drop.clamp_max(self.kept_tokens - 1).long().expand(*runs.shape, 1))[..., 0]
        front = torch.where(runs == drop, after, torch.full_like(after, -1)).max()
        dense = (
            (cols[..., 1:] - cols[..., :-1] == 1).all() & (cols[..., :1] == cols[:1, :1, :1]).all()
            if self.entry_valid is None
            else torch.zeros((), dtype=torch.bool, device=cols.device)
        ) & (cols[..., -1] == self.seen - 1).all()
        drop, front, dense = torch.stack([drop.to(front.dtype), front, dense.to(front.dtype)]).tolist()
        self._drop_first(drop)
        # some row/head now starts at column `front`, reachable until `first` passes it (dense: every one does)
        self._front = front if self.kept_tokens else None
        self._dense = bool(dense) and self.kept_tokens > 0

    def _drop_first(self, count: int) -> None:
        """Drop the first `count` entries of every row and head (the views move forward in their buffers)."""
        if count > 0:
            names = ("keys", "values", "columns", "entry_valid")
            if self.quantized is not None:  # the oldest tokens are the quantized ones; the residual loses the rest
                taken = min(count, self.quantized.tokens)
                self.quantized = self.quantized.drop_first(taken)
                self.keys, self.values = self.keys[:, :, count - taken :], self.values[:, :, count - taken :]
                names = names[2:]
            for name in names:
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name)[:, :, count:])

    def _drop_outside_span(self) -> None:
        """Drop, once `SPAN_SLACK` (or 1/8 of the layer) have gathered in every row and head, the tokens behind each
        row's window that are not sinks (filler too): the first that many of each row and head, by one gather."""
        if not self.kept_tokens:
            return
        first = self.seen - (self.row_window - 1).clamp_min(1)  # per row, the oldest column still reachable
        out = (self.columns < first[:, None, None]) & (self.columns >= self.sink_end[:, None, None])
        if self.entry_valid is not None:
            out = out | ~self.entry_valid
        n = int(out.sum(-1).min())
        if n < max(SPAN_SLACK, self.kept_tokens // 8):
            return
        drop = out & (out.cumsum(-1) <= n)
        order = torch.sort(drop.to(torch.int8), dim=-1, stable=True).indices[..., : self.kept_tokens - n]
        self.keep(torch.sort(order, dim=-1).values)

    @property
    def kept_tokens(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.shape[-2] + (0 if self.quantized is None else self.quantized.tokens)

    @property
    def full_tokens(self) -> int:
        """Tokens a plain transformers cache would hold for this layer now (window - 1 at most on a sliding one)."""
        return min(self.seen, reach(self.sliding_window)) if self.sliding_window else self.seen

    def bytes_per_token(self) -> int:
        """Bytes one stored token costs over the batch and KV heads: its key plus its value, each at its own head dim
        and dtype (V's head dim may differ from K's, as in MLA). Kept entries own their storage (`keep` copies), so
        this times `kept_tokens` is the memory an unquantized layer holds right after compression (`kv_bytes`)."""
        if self.keys is None:
            return 0
        return sum(t.shape[0] * t.shape[1] * t.shape[3] * t.element_size() for t in (self.keys, self.values))

    def kv_bytes(self) -> int:
        """Bytes of K and V the layer holds: `bytes_per_token` per stored token, except that quantized tokens count
        the storage of their packed codes, scales and zero points (`QuantizedTokens.nbytes`)."""
        if self.quantized is None:
            return self.bytes_per_token() * self.kept_tokens
        return self.quantized.nbytes + self.bytes_per_token() * self.keys.shape[2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._front, self._dense = None, False
        if self.quantized is not None:
            self.quantized = self.quantized.select_rows(beam_idx)
        if self.columns is not None:
            self.columns = self.columns.index_select(0, beam_idx.to(self.columns.device))
        if self.entry_valid is not None:
            self.entry_valid = self.entry_valid.index_select(0, beam_idx.to(self.entry_valid.device))
        if self.row_window is not None:
            self.row_window = self.row_window.index_select(0, beam_idx.to(self.row_window.device))
            self.sink_end = self.sink_end.index_select(0, beam_idx.to(self.sink_end.device))

    def visible(self, query_columns: Tensor, column_valid: Tensor | None) -> Tensor | None:
        """(B, Hkv or 1, q, N) bool visibility of the stored tokens for the given query columns, or None if all."""
        cols = self.columns[:, :1] if self.uniform_heads else self.columns
        heads = cols.shape[1]
        need = (
            query_columns.numel() > 1
            or column_valid is not None
            or self.entry_valid is not None
            or self.sliding_window is not None
            or self.row_window is not None
        )
        if not need:
            return None
        q = query_columns.view(1, 1, -1, 1)
        k = cols.unsqueeze(-2).long()
        vis = k <= q
        if self.row_window is not None:
            near = (q - k < self.row_window.view(-1, 1, 1, 1)) | (k < self.sink_end.view(-1, 1, 1, 1))
            vis = vis & near
        elif self.sliding_window is not None:
            vis = vis & (q - k < self.sliding_window)
        if column_valid is not None:  # kept on the input's device; this layer may sit on another (device_map)
            valid = column_valid.to(cols.device)
            vis = vis & torch.gather(valid, 1, cols.reshape(cols.shape[0], -1).long()).view(cols.shape[0], heads, 1, -1)
        if self.entry_valid is not None:
            ev = self.entry_valid if not self.uniform_heads else self.entry_valid[:, :1]
            if ev.shape[1] != heads:
                vis = vis.expand(-1, ev.shape[1], -1, -1)
            vis = vis & ev.unsqueeze(-2)
        return vis


@dataclass
class CacheStats:
    """Exact accounting of one cache: per layer kept and full tokens, and K+V bytes kept vs full (K and V each at
    their own head dim and dtype)."""

    kept_tokens: list[int] = field(default_factory=list)
    full_tokens: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    index_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 1.0


class PolyKVCache(Cache):
    """A `Cache` of `PolyKVLayer`s; build it with `PolyKVCache.for_model(model)` or let `polykv.apply` do it.

    `settings` (one `LayerSetting` or None per layer) makes each layer compress right after its prefill attention
    ran; `observer` (see `polykv.capture`) records what policies need instead. Both are driven by the attention
    wrapper in `polykv.attention`.
    """

    def __init__(self, layers: list[PolyKVLayer], settings=None, observer=None):
        super().__init__(layers=layers)
        self.settings = settings
        self.observer = observer
        self.column_valid: Tensor | None = None

    @classmethod
    def for_config(cls, config, settings=None, observer=None) -> PolyKVCache:
        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        window = getattr(text, "sliding_window", None)
        layers = [PolyKVLayer(window if t == "sliding_attention" else None) for t in types]
        if settings is not None and len(settings) != len(layers):
            raise ValueError(f"{len(settings)} layer settings for a model with {len(layers)} layers")
        for layer, setting in zip(layers, settings or [], strict=False):
            layer.span = None if setting is None else setting.policy.attention_span(setting.budget)
            layer.bits = 16 if setting is None else setting.bits
        return cls(layers, settings=settings, observer=observer)

    def track_padding(self, attention_mask: Tensor | None, new_tokens: int, batch: int, device) -> None:
        """Record which columns are padding, from the caller's 2-D mask (None: all new columns are real)."""
        seen = self.layers[0].seen
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if mask.shape[1] != seen + new_tokens:
                raise ValueError(
                    f"attention_mask covers {mask.shape[1]} columns but the cache has seen {seen} and "
                    f"{new_tokens} are new; pass the mask of the whole sequence so far"
                )
            self.column_valid = None if bool(mask.all()) and self.column_valid is None else mask
        elif self.column_valid is not None:
            ones = torch.ones(batch, new_tokens, dtype=torch.bool, device=device)
            self.column_valid = torch.cat([self.column_valid[:, :seen], ones], dim=1)

    def stats(self) -> CacheStats:
        out = CacheStats()
        for layer in self.layers:
            out.kept_tokens.append(layer.kept_tokens)
            out.full_tokens.append(layer.full_tokens)
            out.kv_bytes += layer.kv_bytes()
            out.kv_bytes_full += layer.bytes_per_token() * layer.full_tokens
            if layer.columns is not None:
                out.index_bytes += layer.columns.numel() * layer.columns.element_size()
        return out

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep/reorder batch rows (beam search, or dropping finished rows from a batched decode)."""
        super().reorder_cache(beam_idx)
        if self.column_valid is not None:
            self.column_valid = self.column_valid.index_select(0, beam_idx.to(self.column_valid.device))

    @property
    def is_compileable(self) -> bool:
        return False


def _padded_rows(parts: list[Tensor], size: int, fill) -> Tensor:
    """One batch of single-row tensors (1, H, n_r, ...), each written at the start of a row of `size` entries along
    the sequence; the rest is `fill`."""
    shape = list(parts[0].shape)
    shape[0], shape[2] = len(parts), size
    buf = torch.full(shape, fill, dtype=parts[0].dtype, device=parts[0].device)
    for row, part in enumerate(parts):
        buf[row : row + 1, :, : part.shape[2]] = part
    return buf


def stack(caches: list[PolyKVCache], slack: int = 0) -> PolyKVCache:
    """One batch from single-row caches of one capture: per layer, pad to the widest row with masked entries.

    Each tensor is built inside a buffer with room for `slack` more tokens, so decoding appends in place instead of
    copying the whole batch on its first step.
    """
    layers = []
    for per_row in zip(*(c.layers for c in caches), strict=True):
        if any(layer.quantized is not None for layer in per_row):
            raise ValueError("quantized layers (bits < 16) cannot be stacked into one batch; decode their rows alone")
        width = max(layer.keys.shape[2] for layer in per_row)
        first = per_row[0]
        dst = PolyKVLayer(first.sliding_window)
        dst.is_initialized, dst.dtype, dst.device = True, first.keys.dtype, first.keys.device
        dst.seen, dst.compressed = first.seen, True
        ragged = any(layer.keys.shape[2] != width or layer.entry_valid is not None for layer in per_row)
        parts = {name: [getattr(layer, name) for layer in per_row] for name in ("keys", "values", "columns")}
        if ragged:
            parts["entry_valid"] = [
                layer.entry_valid if layer.entry_valid is not None else torch.ones_like(layer.columns, dtype=torch.bool)
                for layer in per_row
            ]
        for name, rows in parts.items():
            dst._buffers[name] = _padded_rows(rows, width + slack, False if name == "entry_valid" else 0)
            setattr(dst, name, dst._buffers[name][:, :, :width])
        cols = dst.columns
        dst.uniform_heads = bool((cols == cols[:, :1]).all())
        if any(layer.row_window is not None for layer in per_row):
            spans = [layer.row_spans(1) for layer in per_row]
            dst.row_window = torch.cat([w for w, _ in spans])
            dst.sink_end = torch.cat([e for _, e in spans])
        layers.append(dst)
    return PolyKVCache(layers)


def dequantized(cache: PolyKVCache) -> PolyKVCache:
    """`cache` with every quantized layer holding, in the model's dtype, what attention reads from it (`stored()`),
    so that it can be stacked with others (`stack`); changed in place and returned."""
    for layer in cache.layers:
        if layer.quantized is not None:
            layer.keys, layer.values = layer.stored()
            layer.quantized, layer.bits = None, 16
    return cache
