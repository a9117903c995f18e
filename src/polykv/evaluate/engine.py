"""Prefill once, compress many: every method and budget decodes from one captured prefill per instance.

For each instance the prompt is prefilled once with the full cache (`polykv.capture`); each (method, budget)
compresses that capture (the same code as compression during prefill, so the kept sets are identical) and they
decode together as one shared-prefix batch (`polykv.shared_prefix`: the prompt's K/V stored once, each row a mask of
its kept columns plus its own new tokens); finished rows leave early. Greedy decoding, so results are deterministic.
A capture that cannot be shared falls back to stacked copies batched by `batching.partition`. A job whose settings
window the attention itself (`policies.window`, engine semantics: the prefill is windowed too) cannot reuse the full
capture: it prefills on its own, compressing during its prefill as `polykv run` does, and decodes in stacked batches.
A job with a layer below 16 bits (a plan's KV precision, or `quant:<bits>`) holds its quantized storage, which neither
a shared prefix nor a stacked batch can hold: it decodes on its own, from its real quantized cache, so that its
answers and its `kv_bytes` are those of that storage. `hf-quant:<bits>` shares nothing with the capture: each
instance is answered by `model.generate` over transformers' own quantized cache (`hf_quantized`), timed as decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from polykv.apply import apply
from polykv.attention import polykv_attention
from polykv.cache import PolyKVCache, stack
from polykv.capture import capture
from polykv.compat import output_cache, with_cache
from polykv.evaluate import hf_quantized
from polykv.evaluate.batching import partition
from polykv.evaluate.methods import Method
from polykv.evaluate.tasks import TaskInstance, score
from polykv.generation import decode_text, eos_ids, greedy
from polykv.models import LoadedModel, fingerprint
from polykv.prompts import PromptIds, encode
from polykv.settings import LayerSetting
from polykv.shared_prefix import has_sinks, shareable, shared_batch


@dataclass
class Job:
    method: str
    budget: int | None
    settings: list[LayerSetting] | None


def weight_tokens(model: torch.nn.Module, cache: PolyKVCache) -> float:
    """The weights' bytes in units of one layer-token of K+V: what one more decode batch costs per step."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    keys = cache.layers[0].keys
    return weights / (2 * keys.shape[1] * keys.shape[3] * keys.element_size())


def windowed_prefill(model: torch.nn.Module, ids: torch.Tensor, settings: list[LayerSetting]):
    """(cache, last logits (1, V)) of a prefill compressed during itself with `settings`: what a job with a
    windowed layer needs, since the capture's prefill was full on every layer."""
    with apply(model, settings):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return output_cache(out), out.logits[:, -1, :]


def _windowed(job: Job) -> bool:
    return bool(job.settings) and any(s.span is not None for s in job.settings)


def _quantized(cache: PolyKVCache) -> bool:
    return any(layer.quantized is not None for layer in cache.layers)


def result_row(
    inst: TaskInstance, method: str, budget: int | None, text: str, kv: tuple[int, int], prompt_tokens: int
) -> dict:
    """One result row; `kv` is (kv_bytes, kv_bytes_full)."""
    return {
        "instance_id": inst.id,
        "task": inst.task,
        "method": method,
        "budget": budget,
        "score": score(inst.metric, text, inst.answers),
        "prediction": text,
        "kv_bytes": kv[0],
        "kv_bytes_full": kv[1],
        "prompt_tokens": prompt_tokens,
    }


def anchor_row(
    loaded: LoadedModel, inst: TaskInstance, method: Method, prompt: PromptIds, mode: str, max_new: int
) -> dict:
    """The row of an `hf-quant:<bits>` method: transformers' quantized cache, outside PolyKV's."""
    got = hf_quantized.answer(loaded.model, loaded.tokenizer, prompt, method.bits, max_new, mode)
    return result_row(inst, method.name, None, got.text, (got.kv_bytes, got.kv_bytes_full), prompt.length)


@dataclass
class InstanceResult:
    instance: TaskInstance
    prompt_tokens: int
    rows: list[dict]
    prefill_s: float
    decode_s: float


@torch.no_grad()
def evaluate_instance(
    loaded: LoadedModel,
    inst: TaskInstance,
    methods: list[Method],
    budgets: list[int],
    mode: str = "query-aware",
    max_context: int | None = None,
    max_rows: int = 64,
    max_tokens: int = 60_000,
    default_new_tokens: int = 24,
    shared_prefix: bool = True,
) -> InstanceResult:
    """Score every (method, budget) on one instance from a single prefill.

    With `shared_prefix` (and a capture and model that allow it: one unpadded prompt, no attention sinks) the rows
    decode as masks over the one captured prefix (`polykv.shared_prefix`); otherwise as stacked copies of their
    kept tokens, batched by `batching.partition`.
    """
    model, tok = loaded.model, loaded.tokenizer
    fp = fingerprint(model.config)
    prompt = encode(tok, inst.context, inst.question, max_tokens=max_context)
    max_new = inst.max_new_tokens or default_new_tokens
    anchors = [m for m in methods if m.kind == "hf-quant"]
    methods = [m for m in methods if m.kind != "hf-quant"]
    if not methods:  # no capture to share
        t0 = time.perf_counter()
        rows = [anchor_row(loaded, inst, m, prompt, mode, max_new) for m in anchors]
        return InstanceResult(inst, prompt.length, rows, 0.0, time.perf_counter() - t0)
    device = next(model.parameters()).device
    jobs = [Job(m.name, b, m.settings(b, fp)) for m in methods for b in m.budgets(budgets)]
    needs_cum = any(s is not None and any(x.policy.needs_cumulative for x in s) for s in (j.settings for j in jobs))
    window = max([64] + [x.policy.queries_needed() for j in jobs if j.settings for x in j.settings])
    t0 = time.perf_counter()
    first = prompt.ids if mode == "query-aware" else prompt.context
    cap = capture(model, first.to(device), window=window, cumulative=needs_cum)
    own = {i: windowed_prefill(model, first.to(device), j.settings) for i, j in enumerate(jobs) if _windowed(j)}
    compressed = [
        own[i][0] if i in own else cap.compress(j.settings or [None] * cap.num_layers) for i, j in enumerate(jobs)
    ]
    t1 = time.perf_counter()
    eos = eos_ids(tok, model)
    widths = [[layer.kept_tokens for layer in c.layers] for c in compressed]
    stats = [c.stats() for c in compressed]  # before decoding: a job decoded alone decodes into its own cache
    alone = [i for i, c in enumerate(compressed) if _quantized(c)]
    rows: list[dict] = [{} for _ in jobs]
    slack = max_new + prompt.length - first.shape[1]
    shared = shared_prefix and shareable(cap.cache) and not has_sinks(model)
    captured = [i for i in range(len(jobs)) if i not in own and i not in alone]
    weight = weight_tokens(model, cap.cache)

    def stacked(idx: list[int]) -> list[list[int]]:
        parts = partition([widths[i] for i in idx], weight, max_rows, max_tokens * cap.num_layers)
        return [[idx[k] for k in part] for part in parts]

    if shared:  # rows are masks over one prefix: cost per row is small and alike, so batches are just max_rows
        batches = [captured[i : i + max_rows] for i in range(0, len(captured), max_rows)]
    else:
        batches = stacked(captured) if captured else []
    windowed = sorted(set(own) - set(alone))
    batches += stacked(windowed) if windowed else []
    batches += [[i] for i in alone]
    for batch in batches:
        rows_in = [compressed[i] for i in batch]
        if batch[0] in alone:
            cache = rows_in[0]
        elif shared and batch[0] not in own:
            cache = shared_batch(cap.cache, rows_in, slack)
        else:
            cache = stack(rows_in, slack=slack)
        if mode == "query-aware":
            logits = torch.cat([own[i][1] if i in own else cap.last_logits for i in batch])
        else:
            q = prompt.question.to(device).expand(len(batch), -1)
            with polykv_attention(model):
                logits = model(input_ids=q, **with_cache(model, cache), use_cache=True).logits[:, -1, :]
        tokens = greedy(model, cache, logits, max_new, eos)
        for i, text in zip(batch, decode_text(tok, tokens, eos), strict=True):
            kv = (stats[i].kv_bytes, stats[i].kv_bytes_full)
            rows[i] = result_row(inst, jobs[i].method, jobs[i].budget, text, kv, prompt.length)
    rows += [anchor_row(loaded, inst, m, prompt, mode, max_new) for m in anchors]
    return InstanceResult(inst, prompt.length, rows, t1 - t0, time.perf_counter() - t1)


def evaluate(
    loaded: LoadedModel,
    instances: list[TaskInstance],
    methods: list[Method],
    budgets: list[int],
    mode: str = "query-aware",
    max_context: int | None = None,
    on_instance: Callable[[InstanceResult], None] | None = None,
    **kw,
) -> list[dict]:
    """All result rows (one per instance x method x budget; `full` has budget None)."""
    rows: list[dict] = []
    for inst in instances:
        res = evaluate_instance(loaded, inst, methods, budgets, mode, max_context, **kw)
        rows.extend(res.rows)
        if on_instance:
            on_instance(res)
    return rows


def reprefill_instance(
    loaded: LoadedModel,
    inst: TaskInstance,
    methods: list[Method],
    budgets: list[int],
    mode: str = "query-aware",
    max_context: int | None = None,
    default_new_tokens: int = 24,
) -> tuple[list[dict], float]:
    """The slow path the engine replaces: one `polykv run` (compressing during its own prefill) per job.

    Used to check that the engine's answers equal compression during prefill, and to time both.
    """
    from polykv.policies import make_policy
    from polykv.run import run

    fp = fingerprint(loaded.model.config)
    keep_all = [LayerSetting(make_policy("full"), 1)] * fp["num_layers"]
    rows = []
    t0 = time.perf_counter()
    for m in methods:
        for b in m.budgets(budgets):
            if m.kind == "hf-quant":  # already one prefill of its own
                prompt = encode(loaded.tokenizer, inst.context, inst.question, max_tokens=max_context)
                max_new = inst.max_new_tokens or default_new_tokens
                got = anchor_row(loaded, inst, m, prompt, mode, max_new)
                rows.append({k: got[k] for k in ("instance_id", "method", "budget", "prediction", "score")})
                continue
            text = run(
                loaded,
                m.settings(b, fp) or keep_all,
                inst.context,
                inst.question,
                inst.max_new_tokens or default_new_tokens,
                mode,
                max_context,
            ).text
            rows.append(
                {
                    "instance_id": inst.id,
                    "method": m.name,
                    "budget": b,
                    "prediction": text,
                    "score": score(inst.metric, text, inst.answers),
                }
            )
    return rows, time.perf_counter() - t0
