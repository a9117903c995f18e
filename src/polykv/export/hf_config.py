"""`--to hf-config`: the config.json patch and `from_pretrained` keyword overrides that make transformers run a plan.

Fields, as transformers (5.x) defines them:
- `layer_types`: one of "sliding_attention" / "full_attention" per layer; the modeling files of Qwen2, Qwen2-MoE,
  Qwen3, Gemma 2 and Gemma 3 give a layer `sliding_window=config.sliding_window` iff its type is
  "sliding_attention" (e.g. models/qwen2/modeling_qwen2.py), and `DynamicCache` gives it a
  `DynamicSlidingWindowLayer` (cache_utils.py). Llama and Mistral ignore the list.
- `sliding_window`: the window W; masking_utils.sliding_window_overlay makes key j visible to query i iff
  j > i - W, in prefill and decode: the last W positions, the query's own included (`policies.window`).
- `use_sliding_window` (Qwen configs only): `Qwen2Config.__post_init__` sets `sliding_window = None` unless it is
  true, so it is written as true whenever a layer slides.
Usage: merge `config_patch` into config.json, or pass `from_pretrained(path, **from_pretrained_kwargs)` (keyword
arguments that name config attributes override them). Engines have no sinks; `polykv.engines` refuses plans with.
"""

from __future__ import annotations

import json
from pathlib import Path

from polykv.engines import USE_SLIDING_FLAG, LayerWindow
from polykv.io import atomic_write_text
from polykv.plan import Plan

ENGINE = "hf"


def config_overrides(plan: Plan, windows: list[LayerWindow]) -> dict:
    """The config attributes that run `plan` (one shared window, checked by `polykv.engines`)."""
    sizes = sorted({w.window for w in windows if w.window is not None})
    patch: dict = {"layer_types": ["full_attention" if w.window is None else "sliding_attention" for w in windows]}
    if sizes:
        patch["sliding_window"] = sizes[0]
    if plan.fingerprint["model_type"] in USE_SLIDING_FLAG:
        patch["use_sliding_window"] = bool(sizes)
    return patch


def source(plan: Plan) -> dict:
    """Which plan an artifact came from."""
    return {"model": plan.model, "plan_hash": plan.plan_hash, "fingerprint_hash": plan.fingerprint_hash}


def write(plan: Plan, windows: list[LayerWindow], out: Path, options) -> str:
    patch = config_overrides(plan, windows)
    doc = {"config_patch": patch, "from_pretrained_kwargs": patch, "source": source(plan)}
    atomic_write_text(out, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    sliding = sum(t == "sliding_attention" for t in patch["layer_types"])
    return f"{sliding} of {len(windows)} layers sliding, window {patch.get('sliding_window', '-')}"
