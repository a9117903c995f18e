"""PolyKV: per-layer KV-cache compression (calibrate -> solve -> apply).

`polykv.apply(model, plan_or_policy)` is the public way to compress a model; it is imported lazily so that the
torch-free parts (`polykv.plan`, `polykv.solve`) stay importable without loading torch.
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "apply":
        from polykv.apply import apply

        return apply
    if name == "load_model":
        from polykv.models import load_model

        return load_model
    raise AttributeError(f"module 'polykv' has no attribute {name!r}")
