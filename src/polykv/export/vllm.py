"""`--to vllm`: the JSON for `vllm serve MODEL --hf-overrides "$(cat PATH)"` (or `LLM(..., hf_overrides=...)`).

vLLM reads the Hugging Face config (`--hf-overrides` updates its attributes before the model is built), so the
fields are transformers' own (see `export.hf_config`): `layer_types`, `sliding_window`, and for Qwen configs
`use_sliding_window`. Its hybrid KV-cache manager serves full attention beside one sliding-window size, the window
W meaning the last W positions; there are no sinks. Check that the model's vLLM implementation builds each layer's
window from `config.layer_types` in the vLLM release you serve with (older Qwen2 code refused per-layer windows).
"""

from __future__ import annotations

import json
from pathlib import Path

from polykv.engines import LayerWindow
from polykv.export.hf_config import config_overrides
from polykv.io import atomic_write_text
from polykv.plan import Plan

ENGINE = "vllm"


def write(plan: Plan, windows: list[LayerWindow], out: Path, options) -> str:
    overrides = config_overrides(plan, windows)
    atomic_write_text(out, json.dumps(overrides, sort_keys=True) + "\n")
    sliding = sum(t == "sliding_attention" for t in overrides["layer_types"])
    return f"{sliding} of {len(windows)} layers sliding, window {overrides.get('sliding_window', '-')}"
