"""`window`: sliding-window attention with attention sinks, as serving engines run it natively.

The eviction policies choose, once the prompt has been prefilled with full attention, what a layer keeps. `window`
changes the layer's attention itself, in prefill and decode alike: the token at position p attends to positions
p - window + 1 .. p (itself included) and to the first `sinks` real tokens of its row. This is TensorRT-LLM's
`max_attention_window` with `sink_token_length`, and (sinks 0) the `sliding_attention` layers that transformers,
vLLM and llama.cpp run.

The budget is window + sinks, the tokens an engine allocates for the layer: between steps its cyclic cache holds
the sinks and the last `window` tokens, and so does the layer after the prefill (the oldest of those is masked from
the next token on; the cache drops what falls behind the window in batches). `window` 0 means budget - sinks, the
form calibration and uniform baselines use; plans written for an engine (`polykv solve --target`) state it. On a
layer with its own sliding window the window never exceeds it, and the budget cap of such a layer (window - 1,
`polykv.sliding`) bounds window + sinks. `attention_span` hands (window, sinks) to the
cache and the attention wrapper, which mask the prefill and every later step (`polykv.cache`, `polykv.attention`).
`score` ranks like `streaming` (the sinks first, then the most recent), so `span_kept` takes the top of it.
"""

from dataclasses import dataclass

from torch import Tensor

from polykv.policies.base import LayerObservation, Policy, select
from polykv.policies.streaming import Streaming
from polykv.sliding import reach


@dataclass(frozen=True)
class Window(Policy):
    name = "window"
    window: int = 0
    sinks: int = 0

    def attention_span(self, budget: int) -> tuple[int, int]:
        window = self.window or budget - self.sinks
        if self.window < 0 or self.sinks < 0:
            raise ValueError(f"window policy needs window >= 0 and sinks >= 0, got {self.window} and {self.sinks}")
        if window < 1:
            raise ValueError(
                f"window policy: budget {budget} leaves no window beside {self.sinks} sinks; "
                "a window layer's budget is window + sinks"
            )
        if self.window and self.window + self.sinks != budget:
            raise ValueError(
                f"window policy: window {self.window} + sinks {self.sinks} is not the budget {budget}; "
                "a window layer's budget is window + sinks"
            )
        return window, self.sinks

    def score(self, obs: LayerObservation, budget: int) -> Tensor:
        return Streaming(self.sinks).score(obs, budget)


def span_count(obs: LayerObservation, window: int, sinks: int) -> int:
    """Tokens a `window` layer holds after the prefill: min(T, sinks + window), the window at most what a layer's
    own sliding window still reaches (`sliding.reach`)."""
    if obs.sliding_window is not None:
        window = min(window, reach(obs.sliding_window))
    return min(obs.num_tokens, sinks + window)


def span_kept(obs: LayerObservation, window: int, sinks: int) -> Tensor:
    """(B, Hkv, K) ascending indices a `window` layer holds after the prefill: the first `sinks` real tokens and the
    last `window`, K = `span_count` (the top of the `streaming` ranking)."""
    keep = span_count(obs, window, sinks)
    return select(Streaming(sinks).score(obs, keep), keep, obs.valid)
