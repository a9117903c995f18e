"""`--to trtllm`: a TensorRT-LLM `kv_cache_config` with exactly `max_attention_window` and `sink_token_length`.

Fields, as tensorrt_llm/llmapi/llm_args.py `KvCacheConfig` defines them:
- `max_attention_window` (list of int): "Size of the attention window for each sequence. Only the last tokens will
  be stored in the KV cache. If the number of elements in `max_attention_window` is less than the number of layers,
  `max_attention_window` will be repeated multiple times to the number of layers." One entry per layer is written.
  The KV cache keeps the sinks plus the last (value - sinks) tokens (kvCacheUtils.h: cyclic length =
  max attention window - sink tokens), so a window layer's value is W + sinks; a full layer's is `max_seq_len`.
  Each distinct value is its own memory pool.
- `sink_token_length` (int): "Number of sink tokens (tokens to always keep in attention window)", one for the model.
Written as YAML for `trtllm-serve --extra_llm_api_options PATH` when PATH ends in .yaml/.yml, else as JSON (the same
{"kv_cache_config": {...}}, e.g. for `KvCacheConfig(**doc["kv_cache_config"])`). Sinks need a TensorRT-LLM backend
that honours `sink_token_length`.
"""

from __future__ import annotations

import json
from pathlib import Path

from polykv.engines import LayerWindow
from polykv.errors import InputError
from polykv.io import atomic_write_text
from polykv.plan import Plan

ENGINE = "trtllm"


def kv_cache_config(plan: Plan, windows: list[LayerWindow], max_seq_len: int | None) -> dict:
    """{"max_attention_window": [...], "sink_token_length": s} for `plan`; full layers get `max_seq_len` (default:
    the plan's reference context)."""
    if max_seq_len is None and plan.target is not None:
        max_seq_len = plan.target["reference_context"]
    if any(w.window is None for w in windows) and max_seq_len is None:
        raise InputError("the plan has full layers and no reference context; pass --max-seq-len N (their window)")
    if max_seq_len is not None and max_seq_len < 1:
        raise InputError(f"--max-seq-len must be >= 1 token, got {max_seq_len}")
    sinks = max([w.sinks for w in windows if w.window is not None], default=0)
    values = [max_seq_len if w.window is None else w.window + w.sinks for w in windows]
    return {"max_attention_window": values, "sink_token_length": sinks}


def write(plan: Plan, windows: list[LayerWindow], out: Path, options) -> str:
    config = kv_cache_config(plan, windows, options.max_seq_len)
    if out.suffix in (".yaml", ".yml"):
        text = (
            "kv_cache_config:\n"
            f"  max_attention_window: {json.dumps(config['max_attention_window'])}\n"
            f"  sink_token_length: {config['sink_token_length']}\n"
        )
    else:
        text = json.dumps({"kv_cache_config": config}, indent=2) + "\n"
    atomic_write_text(out, text)
    pools = sorted(set(config["max_attention_window"]))
    return f"windows {pools} ({len(pools)} pools), sink_token_length {config['sink_token_length']}"
