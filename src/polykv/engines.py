"""What serving engines run natively per layer, and which plans they can therefore run (no torch).

No engine evicts tokens by score; what they run is a window per layer (`policies.window`: a token attends to the
last W positions, itself included, and to the first `sinks`), or full attention:
- hf (transformers) and vllm: the model config's `layer_types` ("sliding_attention" / "full_attention") with one
  `sliding_window` W; no sinks. transformers reads them for the architectures in `LAYER_TYPES_MODELS` (Llama and
  Mistral do not); vLLM reads the same config keys (passed with `--hf-overrides`).
- trtllm: `KvCacheConfig(max_attention_window=[w_0..w_{L-1}], sink_token_length=s)`: a window per layer (each
  distinct value its own memory pool), one sink count for the whole model; a layer's value is W + s, the cyclic
  cache holding the sinks beside the window.
- llamacpp: GGUF `<arch>.attention.sliding_window` (W) and `<arch>.attention.sliding_window_pattern`, read only by
  the architectures in `LLAMACPP_SWA`: Gemma 3 reads a period n (layer i slides iff n == 0 or i % n < n - 1,
  llama.cpp `set_swa_pattern`), Gemma 4 one bool per layer; no sinks.
`solve.targets` builds plans within these limits and `export` refuses plans outside them, both through `layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("hf", "vllm", "trtllm", "llamacpp")
#: text-config model types whose transformers modeling reads `layer_types` + `sliding_window` per layer
LAYER_TYPES_MODELS = ("qwen2", "qwen2_moe", "qwen3", "gemma2", "gemma3_text")
#: of those, the ones whose config only keeps `sliding_window` when `use_sliding_window` is true
USE_SLIDING_FLAG = ("qwen2", "qwen2_moe", "qwen3")
#: GGUF architecture -> how llama.cpp reads its sliding-window pattern: "period" (one integer) or "layers" (bools)
LLAMACPP_SWA = {"gemma3": "period", "gemma4": "layers"}
#: transformers text model type -> GGUF architecture, where the names differ
GGUF_ARCH = {"gemma3_text": "gemma3", "gemma4_text": "gemma4"}


@dataclass(frozen=True)
class LayerWindow:
    """How one layer of a plan attends: `window` None is full attention; else the last `window` positions and the
    first `sinks` tokens."""

    window: int | None
    sinks: int = 0


def span(policy: str, budget: int, params: dict) -> tuple[int, int] | None:
    """(window, sinks) of a plan layer that windows the attention (`window`: its `window` param, or budget - sinks),
    None for `full`; ValueError for any other policy (an eviction policy no engine runs)."""
    if policy == "full":
        return None
    if policy != "window":
        raise ValueError(policy)
    sinks = int(params.get("sinks", 0))
    return int(params.get("window", 0)) or budget - sinks, sinks


def layout(plan) -> tuple[list[LayerWindow], list[str]]:
    """Each layer's attention under `plan` (a native sliding layer is windowed even when `full`, and never wider
    than its own window), and one line per layer no engine can run (an eviction policy)."""
    fp = plan.fingerprint
    native = fp.get("sliding_window")
    out: list[LayerWindow] = []
    problems: list[str] = []
    for lp, kind in zip(plan.layers, fp["layer_types"], strict=True):
        own = native if "sliding" in kind and native else None
        try:
            found = span(lp.policy, lp.budget, lp.params)
        except ValueError:
            problems.append(f"layer {lp.layer} uses {lp.policy}")
            out.append(LayerWindow(own))
            continue
        if found is None:
            out.append(LayerWindow(own))
        else:
            window, sinks = found
            out.append(LayerWindow(window if own is None else min(window, own), sinks))
    return out, problems


def gguf_arch(model_type: str) -> str:
    return GGUF_ARCH.get(model_type, model_type)


def period_pattern(period: int, num_layers: int) -> list[bool]:
    """llama.cpp's `set_swa_pattern(period)`: layer i slides iff period == 0 or i % period < period - 1."""
    return [period == 0 or i % period < period - 1 for i in range(num_layers)]


def period_of(sliding: list[bool]) -> int | None:
    """The period whose pattern is exactly `sliding`, or None."""
    n = len(sliding)
    for period in range(n + 1):
        if period_pattern(period, n) == sliding:
            return period
    return None


def problems_for(target: str, plan) -> list[str]:
    """Why `target` cannot run `plan` on the plan's model, one entry per kind of problem naming the layers (empty:
    it can): `shape_problems`, and whether the engine reads per-layer windows for that architecture at all."""
    windows, problems = layout(plan)
    if problems:
        return [f"{', '.join(problems)} (engines run only full or window layers)"]
    model_type = plan.fingerprint["model_type"]
    out = []
    if target in ("hf", "vllm") and model_type not in LAYER_TYPES_MODELS:
        out.append(f"{model_type} does not read per-layer layer_types (supported: {', '.join(LAYER_TYPES_MODELS)})")
    if target == "llamacpp" and gguf_arch(model_type) not in LLAMACPP_SWA:
        out.append(
            f"llama.cpp runs no sliding window from GGUF metadata for {gguf_arch(model_type)} "
            f"(it does for {', '.join(LLAMACPP_SWA)})"
        )
    out += shape_problems(target, plan)
    if target == "llamacpp" and LLAMACPP_SWA.get(gguf_arch(model_type)) == "period":
        sliding = [w.window is not None for w in windows]
        if period_of(sliding) is None:
            out.append(
                f"sliding layers {_listed(windows, lambda w: w.window is not None) or 'none'} follow no period "
                f"(llama.cpp reads one period for {gguf_arch(model_type)})"
            )
    return out


def shape_problems(target: str, plan, max_windows: int | None = None) -> list[str]:
    """Why `plan`'s layers are not what `target` expresses on any model: eviction policies, sinks, several window
    sizes where the engine has one, more than `max_windows` distinct windows (full layers' included) for trtllm."""
    windows, problems = layout(plan)
    if problems:
        return [f"{', '.join(problems)} (engines run only full or window layers)"]
    out = []
    if target == "trtllm":
        sinks = {w.sinks for w in windows if w.window is not None}
        if len(sinks) > 1:
            out.append(f"windowed layers use different sink counts {sorted(sinks)} (one sink_token_length per model)")
        distinct = {w.window for w in windows}
        if max_windows is not None and len(distinct) > max_windows:
            out.append(f"{len(distinct)} distinct attention windows, over max_windows {max_windows}")
        return out
    with_sinks = _listed(windows, lambda w: w.window is not None and w.sinks)
    if with_sinks:
        out.append(f"layers {with_sinks} have attention sinks ({target} has none)")
    sizes = sorted({w.window for w in windows if w.window is not None})
    if len(sizes) > 1:
        each = "; ".join(
            f"{size} on layers {_listed(windows, lambda w, size=size: w.window == size)}" for size in sizes
        )
        out.append(f"windows of {len(sizes)} sizes ({each}), but one sliding_window per model")
    return out


def _listed(windows: list[LayerWindow], pred) -> str:
    return ", ".join(str(i) for i, w in enumerate(windows) if pred(w))
