"""A greedy decoding loop over a (compressed) cache, short enough to read in one sitting.

`model.generate` works inside `polykv.apply` too; this loop exists for the engine paths that start from a captured
or already-compressed cache and for exact timing of prefill vs decode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polykv.attention import polykv_attention
from polykv.cache import PolyKVCache


@torch.no_grad()
def greedy(
    model: nn.Module,
    cache: PolyKVCache,
    first_logits: Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
) -> Tensor:
    """Greedy tokens (B, n <= max_new_tokens) continuing from `first_logits` (B, V), the prefill's last logits.

    Rows that hit EOS keep decoding (batched) but their later tokens are replaced by the first EOS id.
    """
    eos = sorted(eos_token_ids or ())
    eos_t = torch.tensor(eos, device=first_logits.device, dtype=torch.long)
    token = first_logits.argmax(dim=-1, keepdim=True)
    out = [token]
    done = torch.isin(token[:, 0], eos_t) if eos else torch.zeros(token.shape[0], dtype=torch.bool)
    with polykv_attention(model):
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1, :]
            token = logits.argmax(dim=-1, keepdim=True)
            if eos:
                token = torch.where(done[:, None], eos_t[0], token)
                done = done | torch.isin(token[:, 0], eos_t)
            out.append(token)
    return torch.cat(out, dim=1)


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
