"""kvpress side of `benchmarks/kvpress_parity.py`: runs inside kvpress's own venv (kvpress 0.5.5, transformers < 5.3).

It must not import polykv. It reads one JSON request file and writes one JSON answer file:

    request: {"model": DIR, "threads": 2,
              "kept": [{"prompt": name, "ids": [...], "press": "snapkv", "params": {...}, "label": str,
                        "budgets": [64, 256]}, ...],
              "answers": [{"id": str, "context": [...], "question": [...], "mode": "query-aware" | "context-only",
                           "press": str | "none", "params": {...}, "budget": int, "max_new_tokens": int}, ...]}
    answer:  {"hello": {...versions...},
              "kept": [{"prompt", "label", "budget", "n_kept", "ratio", "press", "layers": [[[idx, ...] per KV head]
                        per layer]}, ...],
              "answers": [{"id", "mode", "press", "budget", "tokens": [...]}, ...]}

Kept indices are captured by wrapping the press's `score`: `ScorerPress.compress` keeps
`scores.topk(compute_n_kept(T, ratio)).indices`, so the same top-k on the recorded scores is exactly its kept set
(checked against the compressed cache's keys). Indices are returned sorted ascending, as PolyKV stores them.

    /path/to/kvpress-venv/bin/python benchmarks/kvpress_parity_runner.py request.json answer.json
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

PRESSES = {  # PolyKV policy name -> kvpress press class name, attention implementation it needs
    "streaming": ("StreamingLLMPress", "sdpa"),
    "knorm": ("KnormPress", "sdpa"),
    "snapkv": ("SnapKVPress", "sdpa"),
    "tova": ("TOVAPress", "sdpa"),
    "h2o": ("ObservedAttentionPress", "eager"),  # reads the attention weights
    "expected_attention": ("ExpectedAttentionPress", "sdpa"),
}


def ratio_for(tokens: int, budget: int) -> float:
    """The compression_ratio that keeps exactly `budget` of `tokens` (kvpress keeps max(1, int(T * (1 - ratio))))."""
    from kvpress.utils import compute_n_kept

    ratio = 1.0 - budget / tokens
    if compute_n_kept(tokens, ratio) != budget:  # float rounding: aim at the middle of the interval
        ratio = 1.0 - (budget + 0.5) / tokens
    assert compute_n_kept(tokens, ratio) == budget, (tokens, budget, ratio)
    return max(ratio, 0.0)


def make_press(name: str, ratio: float, params: dict):
    import kvpress

    cls, attn = PRESSES[name]
    return getattr(kvpress, cls)(compression_ratio=ratio, **params), attn


def run_press(model, ids: torch.Tensor, press, attn: str):
    """Prefill `ids` under `press` (switching attention implementation if it needs to); the output."""
    base = model.config._attn_implementation
    if attn != base:
        model.set_attn_implementation(attn)
    try:
        with press(model):
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)
    finally:
        if attn != base:
            model.set_attn_implementation(base)


@torch.no_grad()
def kept(model, job: dict) -> list[dict]:
    """Per budget: the indices each layer and KV head keeps under the job's press."""
    from kvpress.utils import compute_n_kept

    ids = torch.tensor([job["ids"]], dtype=torch.long)
    tokens = ids.shape[1]
    out = []
    for budget in job["budgets"]:
        ratio = ratio_for(tokens, budget)
        press, attn = make_press(job["press"], ratio, job.get("params") or {})
        recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        original = press.score

        def score(module, hidden_states, keys, values, attentions, kwargs, _orig=original, _rec=recorded):
            s = _orig(module, hidden_states, keys, values, attentions, kwargs)
            _rec[module.layer_idx] = (s.detach().clone(), keys.detach().clone())
            return s

        object.__setattr__(press, "score", score)
        result = run_press(model, ids, press, attn)
        n_kept = compute_n_kept(tokens, ratio)
        layers = []
        for i, layer in enumerate(result.past_key_values.layers):
            s, keys = recorded[i]
            top = s.topk(n_kept, dim=-1).indices  # exactly ScorerPress.compress
            expect = keys.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            if layer.keys.shape != expect.shape or not torch.equal(layer.keys, expect):
                raise RuntimeError(f"layer {i}: recorded top-k does not reproduce the compressed cache")
            layers.append(torch.sort(top[0], dim=-1).values.tolist())
        out.append(
            {
                "prompt": job["prompt"],
                "label": job["label"],
                "budget": budget,
                "n_kept": n_kept,
                "ratio": ratio,
                "press": repr(press),
                "layers": layers,
            }
        )
    return out


@torch.no_grad()
def answer(model, job: dict) -> dict:
    """Greedy answer tokens, as kvpress's pipeline decodes: explicit positions after a compressed cache.

    query-aware: the press compresses context + question, then decoding starts. context-only: the press compresses
    the context, the question is fed as one chunk (uniform compression keeps every layer the same length)."""
    ctx = torch.tensor([job["context"]], dtype=torch.long)
    q = torch.tensor([job["question"]], dtype=torch.long)
    full = torch.cat([ctx, q], dim=1)
    prefill = full if job["mode"] == "query-aware" else ctx
    name = job["press"]
    if name == "none" or job["budget"] >= prefill.shape[1]:
        out = model(input_ids=prefill, use_cache=True, logits_to_keep=1)
    else:
        press, attn = make_press(name, ratio_for(prefill.shape[1], job["budget"]), job.get("params") or {})
        out = run_press(model, prefill, press, attn)
    cache = out.past_key_values
    pos = prefill.shape[1]
    if job["mode"] == "context-only":
        position_ids = torch.arange(pos, full.shape[1]).unsqueeze(0)
        out = model(input_ids=q, past_key_values=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        pos = full.shape[1]
    token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    tokens = [int(token)]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i in range(job["max_new_tokens"] - 1):
        if tokens[-1] in eos:
            break
        position_ids = torch.tensor([[pos + i]], dtype=torch.long)
        logits = model(input_ids=token, past_key_values=cache, position_ids=position_ids, use_cache=True).logits
        token = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
    return {"id": job["id"], "mode": job["mode"], "press": name, "budget": job["budget"], "tokens": tokens}


def main() -> int:
    req = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(int(req.get("threads", 2)))
    import kvpress  # noqa: F401  (patches attention functions on import)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    res = {
        "hello": {
            "kvpress": version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "kept": [],
        "answers": [],
    }
    for job in req.get("kept", []):
        res["kept"].extend(kept(model, job))
        print(f"kvpress kept: {job['prompt']} {job['label']}", file=sys.stderr, flush=True)
    for n, job in enumerate(req.get("answers", [])):
        res["answers"].append(answer(model, job))
        print(f"kvpress answer {n + 1}/{len(req['answers'])}", file=sys.stderr, flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
