"""`polykv run` as a library call: prefill with a plan (or one policy), decode, and account for the cache."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from polykv.apply import apply
from polykv.cache import PolyKVCache
from polykv.compat import output_cache, with_cache
from polykv.errors import InputError
from polykv.generation import decode_text, eos_ids, greedy
from polykv.models import LoadedModel
from polykv.prompts import MODES, check_fits, encode
from polykv.settings import LayerSetting


@dataclass
class RunResult:
    """What one run produced and what its cache cost (the `--json` output of `polykv run`)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    kept_tokens: list[int]
    full_tokens: list[int]
    kv_bytes: int
    kv_bytes_full: int
    index_bytes: int
    prefill_s: float
    decode_s: float
    mode: str
    #: what actually served each path, e.g. {"prefill": "torch sdpa", "score": "triton", "gather": "triton",
    #: "decode": "triton"}; a path that did not run is absent, one served two ways lists both ("torch masked + triton")
    kernels: dict[str, str]
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def run(
    loaded: LoadedModel,
    settings: list[LayerSetting],
    context: str,
    question: str | None = None,
    max_new_tokens: int = 64,
    mode: str = "query-aware",
    max_context: int | None = None,
) -> RunResult:
    """Compress the prompt's cache with `settings` and greedily generate an answer.

    query-aware: context and question are prefilled together, then compressed (the question steers attention-based
    policies). context-only: the context alone is prefilled and compressed, then the question is fed as a chunk.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    from polykv.kernels import describe_ran, recording

    model, tok = loaded.model, loaded.tokenizer
    prompt = encode(tok, context, question, max_tokens=max_context)
    check_fits(model, prompt.length, max_new_tokens)
    device = next(model.parameters()).device
    eos = eos_ids(tok, model)
    t0 = time.perf_counter()
    with recording() as ran:
        with apply(model, settings) as settings:  # budgets as the layers hold them (sliding: window - 1)
            first = prompt.ids if mode == "query-aware" or prompt.question.shape[1] == 0 else prompt.context
            out = model(input_ids=first.to(device), use_cache=True, logits_to_keep=1)
            cache: PolyKVCache = output_cache(out)
            stats = cache.stats()  # the compressed prompt, before any chunk or generated token is appended
            logits = out.logits[:, -1, :]
            if first.shape[1] < prompt.length:
                question_ids = prompt.question.to(device)
                logits = model(input_ids=question_ids, **with_cache(model, cache), use_cache=True).logits[:, -1, :]
        t1 = time.perf_counter()
        tokens = greedy(model, cache, logits, max_new_tokens, eos)
        t2 = time.perf_counter()
    return RunResult(
        text=decode_text(tok, tokens, eos)[0],
        prompt_tokens=prompt.length,
        new_tokens=int(tokens.shape[1]),
        kept_tokens=stats.kept_tokens,
        full_tokens=stats.full_tokens,
        kv_bytes=stats.kv_bytes,
        kv_bytes_full=stats.kv_bytes_full,
        index_bytes=stats.index_bytes,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        mode=mode,
        kernels=describe_ran(ran),
        layers=[s.describe() for s in settings],
    )
