"""kvpress side of `benchmarks/bench_run.py`: runs inside kvpress's own venv (kvpress 0.5.5, transformers < 5.3).

It must not import polykv (polykv needs transformers 5.x). `bench_run.py` starts it once and sends it one JSON request
per line on stdin; it answers one JSON line per request on stdout (everything else the libraries print goes to
stderr), so PolyKV and kvpress measurements can be interleaved round by round on the same shared machine.

Requests:
    {"op": "measure", "ids": [...], "press": "none" | "streaming" | "knorm" | "snapkv" | "tova" | "h2o" |
     "expected_attention" | "random", "budget": 256, "decode_tokens": 32, "params": {...}}
    {"op": "quit"}
Answer to measure: prefill_s, decode_s, decode_steps, kept_tokens (per layer, after prefill), kv_bytes, kv_bytes_full,
tokens (the greedy tokens), press (its repr), load1, threads; or {"ok": false, "error": ...}.

    python benchmarks/kvpress_runner.py --model DIR --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# Keep stdout for the protocol: anything printed by the libraries (C level included) goes to stderr.
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def send(obj: dict) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


def ratio_for(tokens: int, budget: int) -> float:
    """kvpress compression_ratio that keeps exactly `budget` of `tokens` (kvpress keeps int(T * (1 - ratio)))."""
    from kvpress.utils import compute_n_kept

    ratio = 1.0 - budget / tokens
    if compute_n_kept(tokens, ratio) != budget:  # float rounding: aim at the middle of the interval instead
        ratio = 1.0 - (budget + 0.5) / tokens
    return max(ratio, 0.0)


def make_press(name: str, ratio: float, params: dict):
    """The kvpress press closest to PolyKV's policy `name`, and the attention implementation it needs."""
    import kvpress

    table = {
        "streaming": (kvpress.StreamingLLMPress, "sdpa"),
        "knorm": (kvpress.KnormPress, "sdpa"),
        "snapkv": (kvpress.SnapKVPress, "sdpa"),
        "tova": (kvpress.TOVAPress, "sdpa"),
        # H2O's accumulated attention: kvpress reads the attention weights, so it needs eager attention
        "h2o": (kvpress.ObservedAttentionPress, "eager"),
        "expected_attention": (kvpress.ExpectedAttentionPress, "sdpa"),
        "random": (kvpress.RandomPress, "sdpa"),
    }
    if name not in table:
        raise ValueError(f"no kvpress equivalent for policy {name!r}")
    cls, attn = table[name]
    return cls(compression_ratio=ratio, **params), attn


@torch.no_grad()
def measure(model, req: dict) -> dict:
    ids = torch.tensor([req["ids"]], dtype=torch.long)
    tokens = ids.shape[1]
    steps = int(req.get("decode_tokens", 32))
    name = req["press"]
    ratio = None if name == "none" else ratio_for(tokens, int(req["budget"]))
    press, attn = (None, None) if name == "none" else make_press(name, ratio, req.get("params") or {})
    load1 = os.getloadavg()[0]
    base_attn = model.config._attn_implementation

    t0 = time.perf_counter()
    if press is None:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    else:
        if attn != base_attn:
            model.set_attn_implementation(attn)
        try:
            with press(model):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        finally:
            if attn != base_attn:
                model.set_attn_implementation(base_attn)
    t1 = time.perf_counter()

    cache = out.past_key_values
    kept, kv_bytes, kv_full = [], 0, 0
    for layer in cache.layers:
        b, h, n, d = layer.keys.shape
        kept.append(int(n))
        per_token = 2 * b * h * d * layer.keys.element_size()
        kv_bytes += per_token * n
        kv_full += per_token * tokens

    # Greedy decoding as kvpress's own pipeline does it: explicit positions, since a compressed DynamicCache
    # reports its kept length, not the prompt length.
    token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    generated = [int(token)]
    t2 = time.perf_counter()
    for i in range(steps - 1):
        pos = torch.tensor([[tokens + i]], dtype=torch.long)
        logits = model(input_ids=token, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1, :]
        token = logits.argmax(dim=-1, keepdim=True)
        generated.append(int(token))
    t3 = time.perf_counter()
    return {
        "ok": True,
        "press": repr(press) if press is not None else "none",
        "attn": attn or base_attn,
        "compression_ratio": ratio,
        "prefill_s": t1 - t0,
        "decode_s": t3 - t2,
        "decode_steps": steps - 1,
        "kept_tokens": kept,
        "kv_bytes": kv_bytes,
        "kv_bytes_full": kv_full,
        "tokens": generated,
        "load1": load1,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model directory (PolyKV's dequantized copy)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from importlib.metadata import version

        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        import kvpress  # noqa: F401  (patches attention functions on import)

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    except Exception as exc:  # report why, then stop
        send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})
        return 1
    send(
        {
            "ok": True,
            "hello": {
                "kvpress": version("kvpress"),
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": sys.executable,
                "attn": model.config._attn_implementation,
                "dtype": str(model.dtype),
            },
        }
    )
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                send({"ok": True, "bye": True})
                return 0
            if req.get("op") != "measure":
                raise ValueError(f"unknown op {req.get('op')!r}")
            send(measure(model, req))
        except Exception as exc:
            send(
                {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                    "trace": traceback.format_exc()[-2000:],
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
