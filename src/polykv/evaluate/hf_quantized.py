"""The external anchor for uniform KV quantisation: transformers' own `QuantizedCache`, outside PolyKV's cache.

`hf-quant:<bits>` answers an instance with plain `model.generate` (greedy, the model's own attention) over
transformers' KIVI-style `QuantizedCache` with the optimum-quanto backend, so that PolyKV's own quantizer
(`quant:<bits>`) is compared with an implementation it shares no code with.

Settings are transformers' defaults but one: keys and values are quantised along axis 0, which quanto reads as
groups of `q_group_size` consecutive channels of one token's head vector, each group with a scale and a zero point
at the model's dtype; `q_group_size` is the default 64, or gcd(64, head_dim) when head_dim is not a multiple of 64
(quanto needs the group to divide every head vector). `residual_length` is 128: the prefill is quantised whole
once it has run (its own attention saw full precision, as PolyKV's `quant:<bits>` does), and up to 128 later tokens
(the question in `context-only` mode, the generated ones) stay at full precision before being quantised together.

`kv_bytes` is measured, not computed: every tensor the cache's layers hold once the prompt (query-aware) or the
context (context-only) is in, before the first generated token; quanto's tensors count their stored parts (packed
codes, scales, zero points, reached through the tensor-subclass protocol `__tensor_flatten__`), the full-precision
residual its elements. `kv_bytes_full` counts the same tensors at the model's precision.

quanto compiles its CPU kernels on first use (ninja and a C++ compiler; a few minutes, once per install).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, QuantizedCache

from polykv.compat import with_cache
from polykv.errors import InputError
from polykv.generation import decode_text, eos_ids
from polykv.models import fingerprint
from polykv.prompts import PromptIds

#: the widths the quanto backend stores keys and values at (transformers refuses others for it)
HF_QUANT_BITS = (4, 2)
#: transformers' defaults for the group-wise backends
GROUP_SIZE, RESIDUAL_LENGTH = 64, 128
INSTALL = "pip install 'polykv[quant-anchor]'"

#: argmax at every step, as PolyKV's own decoding loop: a model's generation config may carry a repetition penalty
#: or an n-gram ban, which would make the anchor differ for reasons other than its cache
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


def require_backend() -> None:
    """Raise a one-line `InputError` naming the install command when optimum-quanto cannot be imported."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"hf-quant needs optimum-quanto, the backend of transformers' QuantizedCache; {INSTALL}"
        ) from exc


def cache_config(config, bits: int) -> dict[str, Any]:
    """The `cache_config` (as `generate(cache_implementation="quantized")` takes it) of `hf-quant:<bits>`."""
    head_dim = fingerprint(config)["head_dim"][0]
    return {
        "backend": "quanto",
        "nbits": bits,
        "q_group_size": math.gcd(GROUP_SIZE, head_dim),
        "residual_length": RESIDUAL_LENGTH,
    }


def stored_bytes(tensor: Tensor) -> int:
    """Bytes a tensor really holds: a tensor subclass (a quanto tensor) is the sum of its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def held_bytes(cache: QuantizedCache) -> tuple[int, int]:
    """(stored, full precision) bytes of every tensor the cache's layers hold: quantized K/V and the residual."""
    stored = full = 0
    for layer in cache.layers:
        for tensor in _tensors(list(vars(layer).values())):
            stored += stored_bytes(tensor)
            full += tensor.numel() * tensor.element_size()  # a quanto tensor's element size is its model dtype's
    return stored, full


class _AfterPrefill(LogitsProcessor):
    """Measures the cache when the first logits arrive: it then holds the prompt and nothing generated."""

    def __init__(self, cache: QuantizedCache, held: tuple[int, int] | None = None):
        self.cache, self.held = cache, held

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.held is None:
            self.held = held_bytes(self.cache)
        return scores


@dataclass(frozen=True)
class QuantizedAnswer:
    """The anchor's answer and its cache's bytes after the prefill (see the module docstring)."""

    text: str
    kv_bytes: int
    kv_bytes_full: int


@torch.no_grad()
def answer(
    model: nn.Module, tokenizer, prompt: PromptIds, bits: int, max_new_tokens: int, mode: str = "query-aware"
) -> QuantizedAnswer:
    """Greedy `model.generate` over transformers' `QuantizedCache` at `bits`; `context-only` prefills the context
    into the cache first, so that the question attends to the quantised context."""
    require_backend()
    types = set(fingerprint(model.config)["layer_types"])
    if types != {"full_attention"}:
        raise InputError(
            f"hf-quant needs a model whose layers all use full attention (transformers' QuantizedCache); this one "
            f"has {', '.join(sorted(types - {'full_attention'}))} layers"
        )
    options = cache_config(model.config, bits)
    cache = QuantizedCache(options.pop("backend"), model.config, **options)
    device = next(model.parameters()).device
    ids = prompt.ids.to(device)
    measure = _AfterPrefill(cache)
    if mode == "context-only":
        model(input_ids=prompt.context.to(device), **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        measure.held = held_bytes(cache)
    eos = sorted(eos_ids(tokenizer, model))
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # a prompt may hold the pad (EOS) id, e.g. in a chat template
        **with_cache(model, cache),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else None,
        logits_processor=LogitsProcessorList([measure]),
        **GREEDY,
    )
    text = decode_text(tokenizer, out[:, ids.shape[1] :], set(eos))[0]
    stored, full = measure.held if measure.held is not None else held_bytes(cache)  # None only if nothing ran
    return QuantizedAnswer(text, stored, full)
