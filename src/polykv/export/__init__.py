"""Engine-native artifacts from a plan: `export_plan(plan, to, out)`, one small module per format.

A plan runs on an engine only if every layer is full or a window the engine can state (`polykv.engines`); any other
plan is refused in one line naming the layers and why, pointing to `polykv solve --target`. Every failure (unknown
format, a plan the engine cannot run, another model, an output that cannot be written) is checked before anything
is written, and outputs are written atomically.

Adding a format: a module with `ENGINE` (its `polykv.engines` target) and `write(plan, windows, out, options)`,
its docstring citing the engine's own definition of every field it writes; an entry in `FORMATS`; a section of
docs/export.md; tests in tests/test_export.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polykv.engines import layout, problems_for
from polykv.errors import InputError
from polykv.export import hf_config, llamacpp, trtllm, vllm
from polykv.io import check_writable
from polykv.plan import Plan

FORMATS = {"hf-config": hf_config, "vllm": vllm, "trtllm": trtllm, "llamacpp": llamacpp}


@dataclass(frozen=True)
class ExportOptions:
    """What some formats need beyond the plan: the model to check against (llamacpp: the GGUF to copy) and the
    window of full layers in TensorRT-LLM (its max_seq_len)."""

    model: str | None = None
    max_seq_len: int | None = None


def check_runs(plan: Plan, fmt: str) -> None:
    """InputError naming the layers and why, unless the format's engine can run `plan`."""
    engine = FORMATS[fmt].ENGINE
    problems = problems_for(engine, plan)
    if problems:
        raise InputError(
            f"{fmt} cannot run this plan: {'; '.join(problems)}; "
            f"solve a plan it runs with `polykv solve --target {engine}`"
        )


def model_fingerprint(name: str) -> dict:
    """The fingerprint of a model's config (an alias, a local directory, a .gguf file or a hub id), weights unread."""
    from transformers import AutoConfig

    from polykv.errors import ModelError
    from polykv.models import ALIASES, GGUF_LOCATORS, fingerprint

    try:
        if name in GGUF_LOCATORS or name.endswith(".gguf"):
            path = GGUF_LOCATORS[name]() if name in GGUF_LOCATORS else Path(name).expanduser()
            if not path.is_file():
                raise ModelError(f"GGUF file {name} does not exist; pass an existing .gguf path or an alias")
            return fingerprint(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
        location = ALIASES[name].hub_id if name in ALIASES else name
        return fingerprint(AutoConfig.from_pretrained(location))
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(
            f"cannot read the config of model {name} ({reason}); pass a model directory or an alias"
        ) from None


def export_plan(plan_path: str | Path, fmt: str, out: str | Path, options: ExportOptions = ExportOptions()) -> str:
    """Write the `fmt` artifact of the plan at `plan_path` to `out`; returns a one-line summary of what was set."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export target {fmt!r}; use one of {', '.join(FORMATS)}")
    plan = Plan.load(plan_path)
    check_writable(out)
    check_runs(plan, fmt)
    if options.model is not None and fmt != "llamacpp":  # llamacpp checks the GGUF it copies itself
        plan.check_model(model_fingerprint(options.model), options.model)
    windows, _ = layout(plan)
    return FORMATS[fmt].write(plan, windows, Path(out), options)


__all__ = ["FORMATS", "ExportOptions", "check_runs", "export_plan", "model_fingerprint"]
