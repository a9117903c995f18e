"""The policy contract: score every prompt token per KV head, keep the top `budget`.

A policy sees only what is known once the prompt has been prefilled (a `LayerObservation`): the layer's keys and
values, the queries of the last prompt tokens (the observation window), the softmax scaling, which columns are
left padding, and, for policies that ask for it, the attention each token received from every prompt query.
`select` turns scores into kept indices with the same rule for every policy, so that compressing during prefill and
compressing a captured cache afterwards give identical kept sets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from polykv.sliding import reach

PROTECT = float("inf")


@dataclass
class LayerObservation:
    """What one layer exposes to a policy after prefill.

    keys, values: (B, Hkv, T, D), RoPE already applied to keys.
    window_queries: (B, Hq, W, D), the queries of the last W prompt tokens (W >= every policy's window).
    valid: (B, T) bool, False on left padding.
    cumulative_attention: (B, Hkv, T) fp32, attention each token received summed over all prompt queries and the
    GQA group (only computed when a policy needs it; see `needs_cumulative`).
    sliding_window: the layer's window, None on full-attention layers. Policies score `in_window()`, never the
    tokens a sliding layer can no longer attend to.
    """

    layer: int
    keys: Tensor
    values: Tensor
    window_queries: Tensor
    scaling: float
    valid: Tensor
    softcap: float | None = None
    cumulative_attention: Tensor | None = None
    sliding_window: int | None = None
    #: scores already computed from this observation (e.g. window attention per window size), reused across budgets
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[-2]

    @property
    def groups(self) -> int:
        return self.window_queries.shape[1] // self.keys.shape[1]

    def in_window(self) -> LayerObservation:
        """The observation of the tokens the layer can still attend to: itself on a full-attention layer, the last
        `sliding.reach(window)` tokens on a sliding one (as if the prompt began there; the window queries and
        cumulative attention are cut to them too). Its token i is token `num_tokens - view.num_tokens + i` here."""
        if self.sliding_window is None or self.num_tokens <= reach(self.sliding_window):
            return self
        if "in_window" not in self.memo:
            keep = reach(self.sliding_window)
            queries = min(keep, self.window_queries.shape[2])
            cum = self.cumulative_attention
            self.memo["in_window"] = LayerObservation(
                layer=self.layer,
                keys=self.keys[:, :, -keep:],
                values=self.values[:, :, -keep:],
                window_queries=self.window_queries[:, :, self.window_queries.shape[2] - queries :],
                scaling=self.scaling,
                valid=self.valid[:, -keep:],
                softcap=self.softcap,
                cumulative_attention=None if cum is None else cum[..., -keep:],
            )
        return self.memo["in_window"]

    def relative_positions(self) -> Tensor:
        """(B, T) position of each token among the real tokens of its row (-1 on padding)."""
        rel = torch.cumsum(self.valid.long(), dim=-1) - 1
        return rel.masked_fill(~self.valid, -1)


@dataclass(frozen=True)
class Policy(ABC):
    """An eviction policy: subclasses are small frozen dataclasses whose fields are their parameters."""

    name: ClassVar[str]
    needs_cumulative: ClassVar[bool] = False
    #: True when `score` depends on the budget (then scores are not shared across budgets)
    budget_dependent: ClassVar[bool] = False
    #: How many trailing prompt queries the policy reads (0 = none).
    window_size: ClassVar[int] = 0

    @abstractmethod
    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        """(B, Hkv, T) float scores; higher is kept first, `PROTECT` (+inf) is kept before anything else.

        `budget` is passed because some policies split it (H2O: heavy hitters + recent tokens).
        """

    def params(self) -> dict[str, Any]:
        """The policy's parameters as stored in a plan."""
        return asdict(self)

    def queries_needed(self) -> int:
        return self.window_size

    def attention_span(self, budget: int) -> tuple[int, int] | None:
        """(window, sinks) when the policy changes the layer's attention itself, in prefill and decode (engine
        sliding-window semantics, `policies.window`); None for eviction policies, which only choose what to keep.
        ValueError when `budget` cannot hold the span."""
        return None


def ranking(scores: Tensor, valid: Tensor) -> Tensor:
    """(B, Hkv, T) token indices from most to least kept; any budget's kept set is a prefix of it.

    Padding scores -inf (kept last, only when a row has fewer real tokens than the budget). Ties are broken in
    favour of the later token (a stable sort over the reversed sequence), so the result is deterministic and, among
    protected tokens, the most recent win when the budget is smaller than what a policy protects.
    """
    tokens = scores.shape[-1]
    scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    return tokens - 1 - torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices


def select(scores: Tensor, budget: int, valid: Tensor, order: Tensor | None = None) -> Tensor:
    """Indices (B, Hkv, K) of kept tokens, ascending, K = min(budget, T): the top of `ranking` (pass `order` when
    it is already known, e.g. to select several budgets from one score without sorting it again)."""
    batch, heads, tokens = scores.shape
    keep = min(budget, tokens)
    if keep >= tokens:
        return torch.arange(tokens, device=scores.device).expand(batch, heads, tokens).contiguous()
    if order is None:
        order = ranking(scores, valid)
    return torch.sort(order[..., :keep], dim=-1).values


def recent_scores(obs: LayerObservation) -> Tensor:
    """(B, Hkv, T) scores that rank later tokens higher (used for recency and as a tie-breaker)."""
    pos = torch.arange(obs.num_tokens, device=obs.keys.device, dtype=torch.float32)
    return pos.expand(obs.keys.shape[0], obs.keys.shape[1], -1).clone()


def protect_last(scores: Tensor, count: int) -> Tensor:
    """Mark the last `count` tokens as always kept."""
    if count > 0:
        scores[..., -count:] = PROTECT
    return scores


__all__ = ["LayerObservation", "Policy", "PROTECT", "ranking", "select", "recent_scores", "protect_last", "field"]
