"""A greedy decoding loop over a (compressed) cache, short enough to read in one sitting.

`model.generate` works inside `polykv.apply` too; this loop exists for the engine paths that start from a captured
or already-compressed cache and for exact timing of prefill vs decode.
"""

from __future__ import annotations

from collections.abc import Callable

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
    stop: Callable[[list[int]], bool] | None = None,
) -> Tensor:
    """Greedy tokens (B, n <= max_new_tokens) continuing from `first_logits` (B, V), the prefill's last logits.

    A row's tokens after its first EOS are that EOS id. Finished rows leave the batch (and the cache) once they
    are at least `shrink` of it, so a batch of short answers does not keep paying for its longest one.
    `stop(tokens)` (needs an EOS id) ends a row early, as if it had emitted EOS after `tokens`: the evaluation
    passes "the score is settled" (`polykv.evaluate.tasks.settled`), so rows stop once more tokens cannot matter.
    """
    eos = sorted(eos_token_ids or ())
    device = first_logits.device
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    token = first_logits.argmax(dim=-1, keepdim=True)
    out = torch.full((token.shape[0], max_new_tokens), eos[0] if eos else 0, dtype=torch.long, device=device)
    out[:, 0] = token[:, 0]
    rows = torch.arange(token.shape[0], device=device)  # the output row of each row still in the batch
    done = torch.isin(token[:, 0], eos_t) if eos else torch.zeros(token.shape[0], dtype=torch.bool, device=device)
    stop = stop if eos else None
    if stop:
        done = _stopped(out, rows, done, 1, stop)
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
            if stop:
                done = _stopped(out, rows, done, steps, stop)
    return out[:, :steps]


def _stopped(out: Tensor, rows: Tensor, done: Tensor, steps: int, stop: Callable[[list[int]], bool]) -> Tensor:
    """`done` with the live rows whose first `steps` tokens satisfy `stop` marked finished."""
    live = (~done).nonzero()[:, 0]
    if not len(live):
        return done
    flags = [stop(toks) for toks in out[rows[live], :steps].tolist()]
    if any(flags):
        done = done.clone()
        done[live[torch.tensor(flags, device=done.device)]] = True
    return done


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
