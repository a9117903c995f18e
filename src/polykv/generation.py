"""A greedy decoding loop over a (compressed) cache, short enough to read in one sitting.

`model.generate` works inside `polykv.apply` too; this loop exists for the engine paths that start from a captured
or already-compressed cache and for exact timing of prefill vs decode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polykv.attention import polykv_attention
from polykv.cache import PolyKVCache
from polykv.compat import with_cache


@torch.no_grad()
def greedy(
    model: nn.Module,
    cache: PolyKVCache,
    first_logits: Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    shrink: float = 0.25,
) -> Tensor:
    """Greedy tokens (B, n <= max_new_tokens) continuing from `first_logits` (B, V), the prefill's last logits.

    A row's tokens after its first EOS are that EOS id. Finished rows leave the batch (and the cache) once they
    are at least `shrink` of it, so a batch of short answers does not keep paying for its longest one.
    """
    eos = sorted(eos_token_ids or ())
    device = first_logits.device
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    token = first_logits.argmax(dim=-1, keepdim=True)
    out = torch.full((token.shape[0], max_new_tokens), eos[0] if eos else 0, dtype=torch.long, device=device)
    out[:, 0] = token[:, 0]
    rows = torch.arange(token.shape[0], device=device)  # the output row of each row still in the batch
    done = torch.isin(token[:, 0], eos_t) if eos else torch.zeros(token.shape[0], dtype=torch.bool, device=device)
    steps = 1
    with polykv_attention(model):
        for step in range(1, max_new_tokens):
            finished = int(done.sum())
            if finished == len(rows):
                break
            if finished and finished >= shrink * len(rows):
                live = (~done).nonzero()[:, 0]
                cache.reorder_cache(live)
                rows, token, done = rows[live], token[live], done[live]
            logits = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1, :]
            token = logits.argmax(dim=-1, keepdim=True)
            if eos:
                token = torch.where(done[:, None], eos_t[0], token)
                done = done | torch.isin(token[:, 0], eos_t)
            out[rows, step] = token[:, 0]
            steps = step + 1
    return out[:, :steps]


def eos_ids(tokenizer, model) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def decode_text(tokenizer, tokens: Tensor, eos: set[int]) -> list[str]:
    """Decode each row up to its first EOS."""
    texts = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
